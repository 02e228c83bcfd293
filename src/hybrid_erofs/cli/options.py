"""Shared click parameter types and the terminal progress line."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
import signal
import sys
import threading
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from ..device import DEFAULT_MEMORY_CACHE, RegistryOptions
from ..fetching.background import FetchPolicy
from ..sources.failmemory import DEFAULT_TTL_S
from ..units import format_duration, format_rate, format_size

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


class Progress:
    """A one-line progress display on stderr, used as a context manager: bytes done and the
    rate; with a total also the percentage and an ETA from the rate of the last few seconds
    (shown once a second of progress is in). Binary units (format_size). Silent unless stderr
    is a terminal (or `enabled` forces it).

    The line is cleared however the command ends: normally, by an error, by Ctrl-C, and by
    SIGTERM, which while the display is active raises SystemExit(143) so that cleanup runs.
    """

    WINDOW_S = 5.0
    WARMUP_S = 1.0
    INTERVAL_S = 0.1

    def __init__(self, label: str, total: int | None = None, *, enabled: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._first: float | None = None
        self._last = -1.0
        self._shown = False
        self._stop_on_sigterm: _SigtermToMain | None = None

    def __enter__(self) -> Progress:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._stop_on_sigterm = _SigtermToMain()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()
        if self._stop_on_sigterm is not None:
            self._stop_on_sigterm.close()
            self._stop_on_sigterm = None

    def line(self, done: int) -> str | None:
        """The text for `done` bytes now (None while throttled)."""
        now = self._clock()
        if self._first is None:
            self._first = now
        elif now - self._last < self.INTERVAL_S:
            return None
        self._last = now
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.popleft()
        then, done_then = self._samples[0]
        rate = (done - done_then) / (now - then) if now > then else None
        text = f"{self.label}: {format_size(done)}"
        if self.total:
            text += f" of {format_size(self.total)} ({100.0 * done / self.total:.0f}%)"
        if rate is not None:
            text += f", {format_rate(rate)}"
            if self.total and rate > 0 and now - self._first >= self.WARMUP_S:
                text += f", ETA {format_duration(max(0, self.total - done) / rate)}"
        return text

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        text = self.line(done)
        if text is None:
            return
        sys.stderr.write("\r\x1b[2K" + text)
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self._shown = False


class _SigtermToMain:
    """While active, SIGTERM raises SystemExit(143) in the main thread, so `finally` blocks
    and context managers clean up (and the progress line is cleared).

    Python runs signal handlers in the main thread only, and the kernel may deliver the signal
    to another thread while the main thread sleeps in read(2) on a pipe, which then never
    returns. So a relay thread watches the signal wakeup fd and, until the handler has run,
    sends the signal to the main thread itself (pthread_kill), which interrupts the read.
    """

    RESEND_S = 0.1

    def __init__(self) -> None:
        self.handled = threading.Event()
        self._main = threading.main_thread().ident
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._relay = threading.Thread(target=self._run, name="sigterm-relay", daemon=True)
        self._relay.start()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if not self.handled.is_set():
            self.handled.set()
            raise SystemExit(128 + signum)

    def _run(self) -> None:
        while data := os.read(self._read_fd, 64):
            if signal.SIGTERM not in data:
                continue
            for _ in range(50):  # the main thread may be busy in C code for a while
                if self.handled.wait(self.RESEND_S):
                    break
                with contextlib.suppress(OSError):
                    assert self._main is not None
                    signal.pthread_kill(self._main, signal.SIGTERM)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(signal.SIGTERM, self._previous)
        os.close(self._write_fd)  # the relay reads EOF and ends
        self._relay.join(timeout=2)
        os.close(self._read_fd)


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
        click.option("--memory-cache", "memory_cache_bytes", type=SizeType(),
                     default=DEFAULT_MEMORY_CACHE, show_default=True, metavar="SIZE",
                     help="Memory for one layer's caches: decoded data up to SIZE, compressed "
                          "spans and chunks the disk cannot take up to SIZE/4 each (given up "
                          "after 60 s without reads, but for unstored chunks)."),
        click.option("--failure-memory", "failure_ttl_s", type=click.FloatRange(min=0),
                     default=DEFAULT_TTL_S, show_default=True, metavar="SECONDS",
                     help="How long a range the registry failed to give is failed at once "
                          "instead of fetched again (0: never)."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, platform: str | None, layer_index: int | None, blob: str | None,
                username: str | None, password_stdin: bool, insecure: bool,
                cache_dir: Path | None, cache_max_bytes: int | None, retries: int,
                retry_delay_s: float, failure_ttl_s: float, memory_cache_bytes: int,
                **kwargs: Any) -> Any:
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
            failure_ttl_s=failure_ttl_s, memory_cache_bytes=memory_cache_bytes)
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def trust_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the node's policy for indexes found in a registry (trust/policy.py); the command
    receives `policy` (a TrustPolicy)."""
    from ..trust.policy import ACCEPT_UNBOUND_FLAG, DEFAULT_KEYS_DIR, TRUSTED_KEY_FLAG

    options = [
        click.option(ACCEPT_UNBOUND_FLAG, "accept_unbound", is_flag=True,
                     help="Use an index attached to the image that is neither bound to it nor "
                          "signed by a trusted key: mounted nosuid,nodev, verified against the "
                          "layer in the background, reads fail with EIO on a mismatch."),
        click.option(TRUSTED_KEY_FLAG, "trusted_keys", multiple=True,
                     type=click.Path(exists=True, path_type=Path), metavar="FILE|DIR",
                     help=f"A PEM public key (cosign.pub) whose signature on an index makes it "
                          f"usable; repeatable [also: {DEFAULT_KEYS_DIR}/*.pub]."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, accept_unbound: bool, trusted_keys: tuple[Path, ...],
                **kwargs: Any) -> Any:
        from ..trust.policy import TrustPolicy

        kwargs["policy"] = TrustPolicy(accept_unbound=accept_unbound,
                                       trusted_keys=tuple(trusted_keys))
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def fetch_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the background fetch options; the command receives `fetch` (a FetchPolicy, or None
    with --no-background-fetch)."""
    defaults = FetchPolicy()
    options = [
        click.option("--no-background-fetch", is_flag=True,
                     help="Fetch only what reads need (the layer stays lazy; nothing is "
                          "verified as a whole)."),
        click.option("--fetch-delay", "fetch_delay_s", type=float, default=defaults.delay_s,
                     show_default=True, metavar="SECONDS",
                     help="Quiet period after the mount before the background fetch starts."),
        click.option("--fetch-rate", type=SizeType(), default=str(defaults.rate),
                     show_default="64MiB", metavar="SIZE",
                     help="Compressed bytes per second the background fetch takes at most."),
        # the snapshotter's daemons: the profile's spans come through its warm-up
        click.option("--_follow-warmup", "follow_s", type=click.FloatRange(min=0),
                     default=None, hidden=True),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, no_background_fetch: bool, fetch_delay_s: float, fetch_rate: int,
                follow_s: float | None, **kwargs: Any) -> Any:
        if fetch_delay_s < 0:
            raise click.BadParameter(f"must be >= 0 (got {fetch_delay_s})",
                                     param_hint="--fetch-delay")
        kwargs["fetch"] = (None if no_background_fetch else
                           FetchPolicy(delay_s=fetch_delay_s, rate=fetch_rate,
                                       follow_s=follow_s))
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
