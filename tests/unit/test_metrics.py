"""Metrics: a layer's stack reported through prometheus_client equals its stages' counters; the
HTTP endpoint, the histogram, own counters, and the live stats socket of `status`."""

from __future__ import annotations

import gzip
import io
import random
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.metrics import (
    DaemonMetrics,
    LatencyHistogram,
    MetricsError,
    MetricsServer,
    Sample,
    counter,
    merge,
    resident_bytes,
)
from hybrid_erofs.mounting.stats import StatsServer, daemon_stats, query_stats
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from hybrid_erofs.sources.metered import MeteredSource
from tests.doubles import CountingSource

DATA = random.Random(5).randbytes(300_000) + bytes(700_000)
BLOB = gzip.compress(DATA, mtime=0)
DIGEST = "sha256:" + "ab" * 32


def _values(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _stack(tmp_path: Path) -> tuple[MeteredSource, ChunkCacheSource]:
    index = build_index(io.BytesIO(BLOB), span=65536).index
    cache = ChunkCacheSource(CountingSource(BLOB), key=DIGEST, cache_dir=tmp_path,
                             chunk_size=65536, readahead=0)
    return MeteredSource(GzipSource(cache, index, size=len(DATA))), cache


@pytest.fixture
def stack(tmp_path: Path) -> MeteredSource:
    return _stack(tmp_path)[0]


def test_scraped_counters_equal_the_stages(tmp_path: Path) -> None:
    stack, cache = _stack(tmp_path)
    metrics = DaemonMetrics()
    metrics.add_layer(DIGEST, stack)
    rng = random.Random(1)
    served = 0
    for _ in range(50):
        offset, length = rng.randrange(len(DATA) - 5000), rng.randrange(1, 5000)
        assert stack.pread(length, offset) == DATA[offset : offset + length]
        served += length
    with pytest.raises(ValueError):
        stack.pread(10, len(DATA))  # a failed read counts as an error
    values = _values(generate_latest(metrics.registry))
    label = (("layer", DIGEST),)
    assert values[("hybrid_erofs_reads_total", label)] == 51
    assert values[("hybrid_erofs_read_bytes_total", label)] == served
    assert values[("hybrid_erofs_read_errors_total", label)] == 1
    assert values[("hybrid_erofs_chunk_cache_hits_total", label)] == cache.stats.hits
    assert values[("hybrid_erofs_chunk_cache_misses_total", label)] == cache.stats.misses > 0
    assert values[("hybrid_erofs_spans_decoded_total", label)] >= 1
    assert values[("hybrid_erofs_read_duration_seconds_count", label)] == 51
    inf = label + (("le", "+Inf"),)
    assert values[("hybrid_erofs_read_duration_seconds_bucket", inf)] == 51
    assert values[("hybrid_erofs_resident_memory_bytes", ())] > 10 << 20
    assert values[("process_resident_memory_bytes", ())] > 10 << 20
    # status shows the same values
    stats = daemon_stats(metrics)
    assert stats["reads"] == 51 and stats["bytes_served"] == served and stats["errors"] == 1
    assert stats["cache_hits"] == cache.stats.hits and stats["layers"][0]["layer"] == DIGEST
    stack.close()


def test_histogram_buckets_are_cumulative_and_le() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    for ns in (500_000, 1_000_000, 1_000_001, 20_000_000):
        histogram.observe_ns(ns)
    sample = histogram.sample("x_seconds", "x")
    assert sample.buckets == ((0.001, 2), (0.01, 3), (float("inf"), 4))
    assert sample.value == pytest.approx(0.022500001)
    merged = merge([sample, sample, counter("n", 1, "n"), counter("n", 2, "n")])
    assert merged[0].buckets == ((0.001, 4), (0.01, 6), (float("inf"), 8))
    assert merged[1] == Sample("n", "counter", 3, "n")


def test_own_counters_and_providers() -> None:
    metrics = DaemonMetrics()
    spans = metrics.counter("background_spans", "Spans fetched in the background", ["layer"])
    spans.labels(layer=DIGEST).inc(3)
    metrics.add_provider(lambda: [Sample("chunk_cache_size_bytes", "gauge", 1234, "size")])
    values = _values(generate_latest(metrics.registry))
    assert values[("hybrid_erofs_background_spans_total", (("layer", DIGEST),))] == 3
    assert values[("hybrid_erofs_chunk_cache_size_bytes", ())] == 1234
    snapshot = metrics.snapshot()
    assert snapshot["chunk_cache_size_bytes"] == 1234
    assert snapshot[f"background_spans_total{{layer={DIGEST}}}"] == 3


def test_http_endpoint_and_busy_port(stack: MeteredSource) -> None:
    metrics = DaemonMetrics()
    metrics.add_layer(DIGEST, stack)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    try:
        stack.pread(100, 0)
        response = httpx.get(server.url)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert _values(response.content)[("hybrid_erofs_reads_total", (("layer", DIGEST),))] == 1
        with pytest.raises(MetricsError, match=rf"--metrics-address 127.0.0.1:{server.port}: "
                                               r"cannot listen: Address already in use"):
            MetricsServer(DaemonMetrics(), "127.0.0.1", server.port)
    finally:
        server.close()
        stack.close()


def test_stats_socket_answers_live(tmp_path: Path) -> None:
    device = MeteredSource(MemorySource(bytes(100)))
    metrics = DaemonMetrics()
    metrics.add_layer("/layer.tar", device)
    path = tmp_path / "m.sock"
    assert query_stats(path) is None  # nobody there
    server = StatsServer(path, lambda: daemon_stats(metrics))
    try:
        assert path.stat().st_mode & 0o077 == 0
        assert query_stats(path)["reads"] == 0  # type: ignore[index]
        for _ in range(20):
            with pytest.raises(ValueError):
                device.pread(10, 95)
        stats = query_stats(path)
        assert stats is not None and stats["errors"] == 20 and stats["reads"] == 20
    finally:
        server.close()
    assert not path.exists()
    with socket.socket(socket.AF_UNIX) as sock:  # a socket nobody answers on: None, at once
        sock.bind(str(path))
        assert query_stats(path, timeout_s=0.2) is None


def test_resident_bytes() -> None:
    before = resident_bytes()
    block = bytearray(64 << 20)
    block[::4096] = b"x" * len(block[::4096])
    assert resident_bytes() >= before + (60 << 20)


def test_prometheus_client_is_imported_only_when_something_needs_it() -> None:
    """A mount daemon without --metrics-address, and the CLI, never import prometheus_client
    (60 ms and more of every daemon's start); `status`'s values come all the same, and the
    registry, once asked for, reports the layers added before it."""
    import subprocess
    import sys

    script = """if True:
        import sys
        import hybrid_erofs.cli, hybrid_erofs.mounting.lifecycle, hybrid_erofs.mounting.layer
        from hybrid_erofs.metrics import DaemonMetrics
        from hybrid_erofs.source import MemorySource
        from hybrid_erofs.sources.metered import MeteredSource
        metrics = DaemonMetrics()
        stack = MeteredSource(MemorySource(b"abcd"))
        stack.pread(2, 1)
        metrics.add_layer("layer", stack)
        snapshot = metrics.snapshot()
        assert snapshot["read_bytes"] == 2 and snapshot["resident_memory_bytes"] > 0, snapshot
        assert "prometheus_client" not in sys.modules, "imported without need"
        from prometheus_client import generate_latest
        text = generate_latest(metrics.registry).decode()
        assert 'hybrid_erofs_read_bytes_total{layer="layer"} 2.0' in text, text
        assert "process_resident_memory_bytes" in text
        metrics.counter("own", "a counter of its own").inc(3)
        assert metrics.snapshot()["own_total"] == 3.0
        print("ok")
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_registry_that_describes_its_collectors_is_accepted() -> None:
    """A registry given by the caller may collect while registering (auto_describe): the
    metrics' own lock is not held then (it would deadlock)."""
    import threading

    from prometheus_client import CollectorRegistry

    made: list[DaemonMetrics] = []
    thread = threading.Thread(target=lambda: made.append(
        DaemonMetrics(registry=CollectorRegistry(auto_describe=True))), daemon=True)
    thread.start()
    thread.join(10)
    assert made, "DaemonMetrics hung registering with an auto-describing registry"
    made[0].add_layer("x", MeteredSource(MemorySource(b"ab")))
    assert b"hybrid_erofs_read_bytes_total" in generate_latest(made[0].registry)
