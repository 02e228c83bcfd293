"""DaemonMetrics: everything one daemon reports, as Prometheus text at /metrics and as a dict
for `status`: each layer's stack (its Reporting stages), daemon-wide providers, and counters
made with prometheus_client directly.

prometheus_client is imported only when something needs it (`registry`: a /metrics endpoint,
a counter of the daemon's own): a mount daemon without `--metrics-address` reports its
`status` without it, and starts about 60 ms sooner.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .samples import COUNTER, HISTOGRAM, PREFIX, Reporting, Sample, as_dict, gauge, merge

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge
    from prometheus_client.core import Metric

Provider = Callable[[], Iterable[Sample]]
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set size (RSS) in bytes, from /proc/self/statm."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def stack_samples(stack: object) -> list[Sample]:
    """The merged samples of every Reporting stage of a ByteSource stack (top first)."""
    from ..sources.metered import iter_stages

    return merge(sample for stage in iter_stages(stack) if isinstance(stage, Reporting)
                 for sample in stage.metric_samples())


class DaemonMetrics:
    """The metrics of one daemon: layers, providers and own counters in one CollectorRegistry.

    Args:
        registry: where to register (default: a fresh CollectorRegistry, made when first
            needed, so two daemons in one process, or tests, never share counters).

    Thread-safe. See the package docstring for how other daemons use it.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self._lock = threading.Lock()
        self._layers: dict[str, object] = {}
        self._providers: list[Provider] = [self._process_samples]
        self._registry: CollectorRegistry | None = None
        if registry is not None:
            self._register(registry)

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus_client registry of this daemon's metrics (imported and made here,
        the first time)."""
        with self._lock:
            registry = self._registry
        if registry is None:
            from prometheus_client import CollectorRegistry

            registry = self._register(CollectorRegistry(auto_describe=False))
        return registry

    def _register(self, registry: CollectorRegistry) -> CollectorRegistry:
        from prometheus_client import ProcessCollector

        # Not under the lock: a registry that describes its collectors collects them here.
        registry.register(_Collector(self))
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, fds
        with self._lock:
            if self._registry is None:  # else another thread made one meanwhile: theirs
                self._registry = registry
            return self._registry

    # -- what is measured -----------------------------------------------------------------
    def add_layer(self, layer: str, stack: object) -> None:
        """Report `stack`'s stages labelled `layer="..."` (a blob digest, or a file path)."""
        with self._lock:
            self._layers[layer] = stack

    def remove_layer(self, layer: str) -> None:
        with self._lock:
            self._layers.pop(layer, None)

    def add_provider(self, provider: Provider) -> None:
        """Report `provider()`'s samples without a layer label (daemon-wide values)."""
        with self._lock:
            self._providers.append(provider)

    def counter(self, name: str, documentation: str,
                labelnames: Sequence[str] = ()) -> Counter:
        """A prometheus_client Counter named `hybrid_erofs_<name>_total` in this registry."""
        from prometheus_client import Counter

        return Counter(PREFIX + name, documentation, labelnames, registry=self.registry)

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A prometheus_client Gauge named `hybrid_erofs_<name>` in this registry."""
        from prometheus_client import Gauge

        return Gauge(PREFIX + name, documentation, labelnames, registry=self.registry)

    # -- reading ----------------------------------------------------------------------------
    def stacks(self) -> list[object]:
        """The layers' stacks, in the order added."""
        with self._lock:
            return list(self._layers.values())

    def layer_samples(self) -> list[tuple[str, list[Sample]]]:
        with self._lock:
            layers = list(self._layers.items())
        return [(layer, stack_samples(stack)) for layer, stack in layers]

    def daemon_samples(self) -> list[Sample]:
        with self._lock:
            providers = list(self._providers)
        return merge(sample for provider in providers for sample in provider())

    def snapshot(self) -> dict[str, Any]:
        """What /metrics shows, as `status` prints it: per-layer values (in the order added),
        their sums, daemon-wide values, and the counters made with counter()/gauge()."""
        layers = self.layer_samples()
        daemon = self.daemon_samples()
        total = as_dict(merge(sample for _, samples in layers for sample in samples))
        ours = {sample.name for _, samples in layers for sample in samples}
        ours.update(sample.name for sample in daemon)
        own: dict[str, Any] = {}
        with self._lock:
            registry = self._registry  # none yet: no counters of its own either
        for family in registry.collect() if registry is not None else ():
            if family.name.startswith(PREFIX) and family.name[len(PREFIX):] not in ours:
                for sample in family.samples:
                    key = sample.name.removeprefix(PREFIX)
                    if sample.labels:
                        key += "{" + ",".join(f"{k}={v}" for k, v in
                                              sorted(sample.labels.items())) + "}"
                    own[key] = sample.value
        return {"updated": time.time(), **total, **as_dict(daemon), **own,
                "layers": [{"layer": layer, **as_dict(samples)} for layer, samples in layers]}

    @staticmethod
    def _process_samples() -> Iterator[Sample]:
        yield gauge("resident_memory_bytes", resident_bytes(),
                    "Resident set size of the daemon")


class _Collector:
    """prometheus_client collector: one metric family per sample name, a `layer` label each."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for layer, samples in self._metrics.layer_samples():
            for sample in samples:
                _add(families, sample, ["layer"], [layer])
        for sample in self._metrics.daemon_samples():
            _add(families, sample, [], [])
        yield from families.values()


def _add(families: dict[str, Metric], sample: Sample, labels: list[str],
         values: list[str]) -> None:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    family = families.get(sample.name)
    name = PREFIX + sample.name
    if family is None:
        if sample.kind == COUNTER:
            family = CounterMetricFamily(name, sample.help, labels=labels)
        elif sample.kind == HISTOGRAM:
            family = HistogramMetricFamily(name, sample.help, labels=labels)
        else:
            family = GaugeMetricFamily(name, sample.help, labels=labels)
        families[sample.name] = family
    if sample.kind == HISTOGRAM:
        assert isinstance(family, HistogramMetricFamily)
        buckets = [("+Inf" if bound == float("inf") else repr(bound), count)
                   for bound, count in sample.buckets]
        family.add_metric(values, buckets, sample.value)
    else:
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric(values, sample.value)


__all__ = ["DaemonMetrics", "Provider", "resident_bytes", "stack_samples"]
