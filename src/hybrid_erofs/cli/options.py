"""Shared click parameter types and the terminal progress line."""

from __future__ import annotations

import functools
import ipaddress
import re
import sys
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..device import RegistryOptions
from ..sources.failmemory import DEFAULT_TTL_S

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'4MiB' -> 4194304; '1M' and '1MB' are decimal; a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4MiB, 512KiB, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class SizeType(click.ParamType):  # type: ignore[type-arg]
    """A byte count: 4096, 64KiB, 1MiB, 2G... (`minimum` 1 unless told)."""

    name = "size"

    def __init__(self, *, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size < self.minimum:
            self.fail(f"must be at least {self.minimum} byte{'s' if self.minimum != 1 else ''} "
                      f"(got {value!r})", param, ctx)
        return size


class UuidType(click.ParamType):  # type: ignore[type-arg]
    name = "uuid"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> bytes:
        if isinstance(value, bytes):
            return value
        try:
            return uuidlib.UUID(str(value)).bytes
        except ValueError:
            self.fail(f"not a UUID: {value!r}", param, ctx)


def parse_address(text: str, *, param_hint: str) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT' or 'PORT' (127.0.0.1) -> (IP address, port); BadParameter else."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)|(\d+)", text)
    if not match:
        raise click.BadParameter(f"{text!r}: expected HOST:PORT, [IPV6]:PORT or PORT",
                                 param_hint=param_hint)
    host = match.group(1) or match.group(3) or "127.0.0.1"
    port = int(match.group(2) or match.group(4) or match.group(5))
    if not 0 <= port <= 65535:
        raise click.BadParameter(f"port {port} is out of range", param_hint=param_hint)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise click.BadParameter(f"{host!r}: give an IP address, not a host name",
                                 param_hint=param_hint) from None
    return host, port


def metrics_address_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--metrics-address HOST:PORT`: the command receives `metrics_address` (host, port) or
    None."""
    def convert(ctx: click.Context, param: click.Parameter,
                value: str | None) -> tuple[str, int] | None:
        return None if value is None else parse_address(value, param_hint="--metrics-address")

    return click.option(
        "--metrics-address", metavar="HOST:PORT", callback=convert,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics from the daemon (port 0: "
             "any free port; `status` shows it).")(func)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """A one-line progress display on stderr: bytes, MB/s, percent and ETA when the total is
    known. Silent unless stderr is a terminal (or `enabled` forces it)."""

    def __init__(self, label: str, total: int | None, *, enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        line = f"{self.label}: {human(done)}"
        if self.total:
            pct = 100.0 * done / self.total
            eta = (self.total - done) / rate if rate > 0 else 0.0
            line += f" / {human(self.total)} ({pct:.0f}%), {rate / 1e6:.0f} MB/s, ETA {eta:.0f}s"
        else:
            line += f", {rate / 1e6:.0f} MB/s"
        sys.stderr.write("\r\x1b[2K" + line)
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def registry_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options that reach a layer in a registry; the command receives `registry`
    (a RegistryOptions). The password comes from stdin only, never from argv."""
    options = [
        click.option("--platform", metavar="OS/ARCH[/VARIANT]",
                     help="Platform to pick from a multi-platform image [default: this host's]."),
        click.option("--layer", "layer_index", type=int, metavar="N",
                     help="Layer by position in the manifest (0 first, -1 last)."),
        click.option("--blob", metavar="sha256:HEX", help="Layer by blob digest."),
        click.option("--username", help="Registry user (else auth.json / docker config)."),
        click.option("--password-stdin", is_flag=True,
                     help="Read the registry password (or token) from stdin."),
        click.option("--insecure", is_flag=True,
                     help="Allow plain HTTP to a registry that is not on localhost."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Blob chunk cache [default: /var/cache/hybrid-erofs for root, "
                          "else $XDG_CACHE_HOME/hybrid-erofs]."),
        click.option("--cache-max-size", "cache_max_bytes", type=SizeType(), metavar="SIZE",
                     help="Most the chunk cache may hold, least recently used chunks evicted "
                          "first [default: half the free space of its filesystem, at most "
                          "10GiB]."),
        click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
                     help="Tries after a failed registry read (back-off with jitter)."),
        click.option("--retry-delay", "retry_delay_s", type=click.FloatRange(min=0),
                     default=0.2, show_default=True, metavar="SECONDS",
                     help="Longest wait before the first retry; doubled each time."),
        click.option("--failure-memory", "failure_ttl_s", type=click.FloatRange(min=0),
                     default=DEFAULT_TTL_S, show_default=True, metavar="SECONDS",
                     help="How long a range the registry failed to give is failed at once "
                          "instead of fetched again (0: never)."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, platform: str | None, layer_index: int | None, blob: str | None,
                username: str | None, password_stdin: bool, insecure: bool,
                cache_dir: Path | None, cache_max_bytes: int | None, retries: int,
                retry_delay_s: float, failure_ttl_s: float, **kwargs: Any) -> Any:
        password = None
        if password_stdin:
            if username is None:
                raise click.UsageError("--password-stdin needs --username")
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise click.UsageError("--password-stdin: nothing on stdin")
        if layer_index is not None and blob is not None:
            raise click.UsageError("--layer and --blob contradict each other: give one")
        kwargs["registry"] = RegistryOptions(
            platform=platform, layer=layer_index, blob=blob, username=username,
            password=password, insecure=insecure, cache_dir=cache_dir,
            cache_max_bytes=cache_max_bytes, retries=retries, retry_delay_s=retry_delay_s,
            failure_ttl_s=failure_ttl_s)
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
