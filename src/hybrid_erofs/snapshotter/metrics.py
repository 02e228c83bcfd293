"""The snapshotter's Prometheus metrics (metrics/: DaemonMetrics): layers mounted lazily,
fallbacks by reason, layers mounted again, and the snapshots it holds."""

from __future__ import annotations

from collections.abc import Iterator

from ..metrics.daemon import DaemonMetrics
from ..metrics.samples import Sample, gauge
from .store import Kind, SnapshotStore

FALLBACK_REASONS = ("no-labels", "no-index", "untrusted", "unsupported", "index-error",
                    "mount-failed", "conflict")


class SnapshotterMetrics:
    """Counters the snapshotter increments, and gauges read from its store at scrape time
    (`attach`). Thread-safe (prometheus_client counters)."""

    def __init__(self, metrics: DaemonMetrics | None = None) -> None:
        self.metrics = metrics or DaemonMetrics()
        self.lazy = self.metrics.counter(
            "snapshotter_layers_lazy", "Layers mounted lazily (prepared as remote snapshots)")
        self.fallbacks = self.metrics.counter(
            "snapshotter_fallbacks", "Layers left to containerd to download and apply, by "
            "reason", ["reason"])
        for reason in FALLBACK_REASONS:  # every series exists from the start, at 0
            self.fallbacks.labels(reason=reason)
        self.remounted = self.metrics.counter(
            "snapshotter_layers_remounted", "Lazily mounted layers mounted again after their "
            "daemon died")

    def attach(self, store: SnapshotStore) -> None:
        """Report the store's snapshots at scrape time."""

        def samples() -> Iterator[Sample]:
            snaps = store.all()
            yield gauge("snapshotter_snapshots", len(snaps), "Snapshots the snapshotter holds")
            yield gauge("snapshotter_snapshots_active",
                        sum(1 for s in snaps if s.kind == Kind.ACTIVE),
                        "Active snapshots (containers' and extractions' upper dirs)")
            yield gauge("snapshotter_snapshots_lazy", sum(1 for s in snaps if s.remote),
                        "Committed snapshots that are lazily mounted layers")

        self.metrics.add_provider(samples)
