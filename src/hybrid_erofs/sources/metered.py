"""MeteredSource: counts reads, bytes, errors and latency on their way to an exporter (for
`status` and /metrics).

Sits on top of the device, just below the FUSE or NBD exporter; passes everything through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..metrics.samples import LatencyHistogram, Sample, counter
from ..source import ByteSource, FileRanged, read_into


@dataclass(frozen=True, slots=True)
class ReadStats:
    """Counters since the source was opened."""

    reads: int
    bytes_served: int
    errors: int


class MeteredSource:
    """Pass reads to `inner`, count them and their latency. Owns `inner`. Thread-safe if
    `inner` is. A failed read is what the exporter turns into EIO.

    `latency=False` skips the latency histogram (tools/bench_metrics.py measures its cost).
    """

    def __init__(self, inner: ByteSource, *, latency: bool = True) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._reads = self._bytes = self._errors = 0
        self._latency = LatencyHistogram() if latency else None

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def stats(self) -> ReadStats:
        with self._lock:
            return ReadStats(self._reads, self._bytes, self._errors)

    def pread(self, length: int, offset: int) -> bytes:
        started = time.perf_counter_ns() if self._latency is not None else 0
        try:
            data = self.inner.pread(length, offset)
        except BaseException:
            self._count(started, 0, failed=True)
            raise
        self._count(started, len(data))
        return data

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        started = time.perf_counter_ns() if self._latency is not None else 0
        try:
            read_into(self.inner, buffer, offset)
        except BaseException:
            self._count(started, 0, failed=True)
            raise
        self._count(started, len(buffer))

    def _count(self, started: int, served: int, *, failed: bool = False) -> None:
        latency = self._latency
        with self._lock:
            if latency is not None:
                latency.observe_ns(time.perf_counter_ns() - started)
            self._reads += 1
            self._bytes += served
            self._errors += failed

    def metric_samples(self) -> list[Sample]:
        with self._lock:
            samples = [
                counter("reads", self._reads, "Reads served to the kernel (failed ones too)"),
                counter("read_bytes", self._bytes, "Bytes served to the kernel"),
                counter("read_errors", self._errors, "Reads answered with EIO"),
            ]
            if self._latency is not None:
                samples.append(self._latency.sample("read_duration_seconds",
                                                    "Time to serve a read"))
            return samples

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        """FileRanged pass-through; a range handed out counts as a read served."""
        if not isinstance(self.inner, FileRanged):
            return None
        started = time.perf_counter_ns() if self._latency is not None else 0
        try:
            where = self.inner.file_range(length, offset)
        except BaseException:  # refused (a closed gate): a read answered with EIO
            self._count(started, 0, failed=True)
            raise
        if where is not None:
            self._count(started, length)
        return where

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
