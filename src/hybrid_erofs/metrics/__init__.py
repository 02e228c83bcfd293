"""Metrics of hybrid-erofs daemons: Prometheus text at /metrics (prometheus_client) and the same
values for `hybrid-erofs status`.

How a daemon uses it (a mount daemon does this in mounting/lifecycle.py)::

    metrics = DaemonMetrics()
    metrics.add_layer("sha256:...", device)          # a layer's ByteSource stack
    server = MetricsServer(metrics, "127.0.0.1", 9100) if address else None   # --metrics-address
    ...
    metrics.snapshot()                               # the same values as a dict, for `status`
    server.close()

What is reported:
* Every stage of a layer's stack that implements `Reporting` (`metric_samples()` returning
  `Sample`s) is asked at scrape time; its samples get the label `layer="<digest or path>"`
  and samples of the same name within a layer are added up. Counting stays in the stages
  (plain integers under their own lock), so the read path pays nothing for metrics beyond the
  counters it keeps anyway. A new stage (a background fetcher, a verifier) reports by
  implementing `metric_samples()`; nothing else needs to change.
* `add_provider(fn)`: daemon-wide samples without a layer label (cache size, memory).
* `counter(name, help, labelnames)` / `gauge(...)`: plain prometheus_client metrics named
  `hybrid_erofs_<name>[_total]` in this daemon's registry, for code that is not a stage.
* prometheus_client's process collector (`process_resident_memory_bytes`, CPU, fds).

Names follow Prometheus conventions: `hybrid_erofs_<what>_total` for counters (the `Sample`
name omits `_total`), units as suffixes (`_bytes`, `_seconds`).
"""

from __future__ import annotations

from .daemon import DaemonMetrics, Provider, resident_bytes, stack_samples
from .samples import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    LatencyHistogram,
    Reporting,
    Sample,
    as_dict,
    counter,
    gauge,
    merge,
)
from .server import MetricsError, MetricsServer

__all__ = [
    "COUNTER",
    "GAUGE",
    "HISTOGRAM",
    "DaemonMetrics",
    "LatencyHistogram",
    "MetricsError",
    "MetricsServer",
    "Provider",
    "Reporting",
    "Sample",
    "as_dict",
    "counter",
    "gauge",
    "merge",
    "resident_bytes",
    "stack_samples",
]
