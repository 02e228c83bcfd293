"""Shared click parameter types and the terminal progress line."""

from __future__ import annotations

import re
import sys
import time
import uuid as uuidlib

import click

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'4MiB' -> 4194304; '1M' and '1MB' are decimal; a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4MiB, 512KiB, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size < 1:
            self.fail(f"must be at least 1 byte (got {value!r})", param, ctx)
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
