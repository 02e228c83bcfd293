"""MeteredSource: counts reads, bytes and errors on their way to an exporter (for `status`).

Sits on top of the device, just below the FUSE or NBD exporter; passes everything through.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..source import ByteSource


@dataclass(frozen=True, slots=True)
class ReadStats:
    """Counters since the source was opened."""

    reads: int
    bytes_served: int
    errors: int


class MeteredSource:
    """Pass reads to `inner` and count them. Owns `inner`. Thread-safe if `inner` is."""

    def __init__(self, inner: ByteSource) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._reads = self._bytes = self._errors = 0

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def stats(self) -> ReadStats:
        with self._lock:
            return ReadStats(self._reads, self._bytes, self._errors)

    def pread(self, length: int, offset: int) -> bytes:
        try:
            data = self.inner.pread(length, offset)
        except BaseException:
            with self._lock:
                self._reads += 1
                self._errors += 1
            raise
        with self._lock:
            self._reads += 1
            self._bytes += len(data)
        return data

    def close(self) -> None:
        self.inner.close()


def iter_stages(source: object) -> Iterator[Any]:
    """Every stage of a stack, top first: follows `inner`/`_inner` wrappers and `parts`."""
    pending = [source]
    while pending:
        stage = pending.pop(0)
        yield stage
        parts = getattr(stage, "parts", None)
        if isinstance(parts, tuple):
            pending.extend(parts)
        inner = getattr(stage, "inner", None) or getattr(stage, "_inner", None)
        if inner is not None:
            pending.append(inner)


__all__ = ["MeteredSource", "ReadStats", "iter_stages"]
