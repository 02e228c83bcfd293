"""Sample, the one value type of hybrid-erofs metrics, and the Reporting protocol stages implement.

A stage of a device stack reports its counters as Samples; metrics/daemon.py turns them into
Prometheus metric families (one per name, labelled by layer) and into `status` output.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"
PREFIX = "hybrid_erofs_"


@dataclass(frozen=True, slots=True)
class Sample:
    """One value a stage reports.

    `name` is the Prometheus name without the `hybrid_erofs_` prefix and, for a counter,
    without `_total` (prometheus_client adds it): "read_bytes" is exposed as
    `hybrid_erofs_read_bytes_total`. Units end the name (`_bytes`, `_seconds`). A histogram's
    `value` is its sum and `buckets` its (upper bound, cumulative count) pairs, +Inf last.
    """

    name: str
    kind: str
    value: float
    help: str
    buckets: tuple[tuple[float, int], ...] = ()


@runtime_checkable
class Reporting(Protocol):
    """Optional capability of a stage (or any part of a daemon): the samples it reports now.

    Called at scrape and `status` time from another thread: read counters under the stage's
    own lock, never do I/O. Samples of one name from several stages of a layer are added up.
    """

    def metric_samples(self) -> Iterable[Sample]: ...


def counter(name: str, value: float, help: str) -> Sample:
    return Sample(name, COUNTER, value, help)


def gauge(name: str, value: float, help: str) -> Sample:
    return Sample(name, GAUGE, value, help)


def merge(samples: Iterable[Sample]) -> list[Sample]:
    """Samples of the same name added up (histograms bucket by bucket), first-seen order."""
    merged: dict[str, Sample] = {}
    for sample in samples:
        seen = merged.get(sample.name)
        if seen is None:
            merged[sample.name] = sample
            continue
        buckets = tuple((bound, a + b) for (bound, a), (_, b) in
                        zip(seen.buckets, sample.buckets, strict=True))
        merged[sample.name] = Sample(seen.name, seen.kind, seen.value + sample.value, seen.help,
                                     buckets)
    return list(merged.values())


def as_dict(samples: Iterable[Sample]) -> dict[str, Any]:
    """{name: value} for `status`; a histogram gives its sum and count."""
    values: dict[str, Any] = {}
    for sample in samples:
        if sample.kind == HISTOGRAM:
            values[f"{sample.name}_sum"] = sample.value
            values[f"{sample.name}_count"] = sample.buckets[-1][1] if sample.buckets else 0
        else:
            values[sample.name] = sample.value
    return values


# Read latencies from 50 µs (a warm page) to 10 s (a registry at its worst).
LATENCY_BOUNDS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """Durations counted into fixed buckets: cheap enough for every read (one bisect and two
    additions). Not thread-safe: the owner calls `observe_ns` under its own lock."""

    __slots__ = ("_bounds_ns", "counts", "sum_ns")

    def __init__(self, bounds_s: tuple[float, ...] = LATENCY_BOUNDS_S) -> None:
        self._bounds_ns = tuple(round(bound * 1e9) for bound in bounds_s)
        self.counts = [0] * (len(bounds_s) + 1)
        self.sum_ns = 0

    def observe_ns(self, duration_ns: int) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= it.
        self.counts[bisect_left(self._bounds_ns, duration_ns)] += 1
        self.sum_ns += duration_ns

    def sample(self, name: str, help: str) -> Sample:
        return Sample(name, HISTOGRAM, self.sum_ns / 1e9, help, tuple(self._cumulative()))

    def _cumulative(self) -> Iterator[tuple[float, int]]:
        total = 0
        for bound_ns, count in zip((*self._bounds_ns, None), self.counts, strict=True):
            total += count
            yield (float("inf") if bound_ns is None else bound_ns / 1e9), total


__all__ = ["COUNTER", "GAUGE", "HISTOGRAM", "LATENCY_BOUNDS_S", "PREFIX", "LatencyHistogram",
           "Reporting", "Sample", "as_dict", "counter", "gauge", "merge"]
