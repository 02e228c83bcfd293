"""A fault soak through a real mount (`hybrid-erofs mount` from tests/fault_registry.py, the
kernel's EROFS on a FUSE file): thousands of reads while the registry fails, cuts, tampers and
dies for a while. Never a wrong byte; a dead registry costs one retry budget, not a storm; reads
recover; `status` and /metrics count what happened as it happens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hybrid_erofs.indexing.layer import index_layer
from tests.fault_registry import FaultRegistry, make_layer
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for

pytestmark = [pytest.mark.integration, pytest.mark.root]

CLI = [sys.executable, "-m", "hybrid_erofs"]
SPAN = 256 << 10
# The daemon's retry budget for these tests: 4 tries after the first, waits of at most 0.1, 0.2,
# 0.4 and 0.8 s (full jitter: each a random fraction of that), so one budget is under 1.5 s of
# waiting plus five requests; a failed range is failed at once for 1 s.
RETRIES, RETRY_DELAY_S, FAILURE_MEMORY_S = 4, 0.1, 1.0
BUDGET_S = sum(RETRY_DELAY_S * 2**n for n in range(RETRIES))


@dataclass
class Layer:
    registry: FaultRegistry
    files: dict[str, bytes]
    zinfo: Path
    meta: Path


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layer]:
    require_fuse_and_erofs()
    blob, files = make_layer(11)
    registry = FaultRegistry(blob)
    work = tmp_path_factory.mktemp("mount-faults")
    zinfo, meta = work / "layer.zinfo", work / "m.erofs"
    try:
        index_layer(registry.ref, zinfo=zinfo, meta=meta, span=SPAN)
        yield Layer(registry, files, zinfo, meta)
    finally:
        registry.close()


@pytest.fixture
def layer(indexed: Layer) -> Iterator[Layer]:
    indexed.registry.clear_faults()
    indexed.registry.reset_counters()
    yield indexed
    indexed.registry.clear_faults()


@dataclass
class Mounted:
    mnt: Path
    env: dict[str, str]
    record: dict[str, Any]
    cache: Path

    def status(self) -> dict[str, Any]:
        proc = subprocess.run([*CLI, "status", "--json"], env=self.env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        [entry] = json.loads(proc.stdout)
        stats: dict[str, Any] = entry["stats"]
        return stats

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: name{labels} -> value (the layer label dropped)."""
        text = httpx.get(f"http://{self.record['metrics_address']}/metrics", timeout=10).text
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                                  if k != "layer")
                found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return found

    def disk(self) -> Path:
        return Path(self.record["disk_path"])

    def cache_ls(self, cache: Path | None = None) -> dict[str, Any]:
        proc = subprocess.run([*CLI, "cache", "ls", "--json", "--cache-dir",
                               str(cache or self.cache)], env=self.env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        listing: dict[str, Any] = json.loads(proc.stdout)
        return listing


@contextlib.contextmanager
def mounted(layer: Layer, tmp_path: Path, *options: str, name: str = "mnt") -> Iterator[Mounted]:
    """The layer mounted on tmp_path/NAME from the fault registry via FUSE with short retry
    settings, metrics on a free port, a cache in tmp_path and no background fetch (later
    `options` win); unmounted after, leaving no daemon behind."""
    runtime = tmp_path / "run"
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    mnt, cache = tmp_path / name, tmp_path / "cache"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run(
        [*CLI, "mount", "--meta", str(layer.meta), "--zinfo", str(layer.zinfo), "--via", "fuse",
         "--cache-dir", str(cache), "--retries", str(RETRIES), "--retry-delay",
         str(RETRY_DELAY_S), "--failure-memory", str(FAILURE_MEMORY_S),
         "--metrics-address", "127.0.0.1:0",
         "--no-background-fetch",  # the layer stays lazy: faults meet the reads
         *options, layer.registry.ref, str(mnt)],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [record] = [r for r in (json.loads(p.read_text()) for p in runtime.glob(
        "mounts/*[0-9a-f].json")) if r["mountpoint"] == str(mnt)]
    try:
        yield Mounted(mnt, env, record, cache)
    finally:
        layer.registry.clear_faults()
        proc = subprocess.run([*CLI, "umount", str(mnt)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        if not list(runtime.glob("mounts/*[0-9a-f].json")):
            assert daemons_for(runtime) == []


@pytest.fixture
def mount(layer: Layer, tmp_path: Path) -> Iterator[Mounted]:
    with mounted(layer, tmp_path) as mount:
        yield mount


def _uncache(fd: int, offset: int = 0) -> None:
    """Drop a file's pages from `offset` on, so that the next read reaches the daemon again."""
    os.posix_fadvise(fd, offset, 0, os.POSIX_FADV_DONTNEED)


def _read(mounted: Mounted, name: str, length: int, offset: int, *, expected: bytes,
          disk_fd: int) -> bool:
    """One read through the mount, its pages dropped first (file and disk): True with the right
    bytes, False on EIO or a short read; wrong bytes fail the test."""
    fd = os.open(mounted.mnt / name, os.O_RDONLY)
    try:
        _uncache(fd)
        _uncache(disk_fd)  # the meta's pages too: the daemon serves them from the meta file
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            return False
    finally:
        os.close(fd)
    # A read that fails part way returns the bytes before the failure (read(2)): those must
    # be right, and the read counts as failed.
    assert data == expected[offset : offset + len(data)], f"wrong bytes: {name} {offset}+{length}"
    return len(data) == min(length, len(expected) - offset)


def test_a_dead_registry_costs_one_retry_budget_and_reads_recover(layer: Layer,
                                                                  mount: Mounted) -> None:
    registry = layer.registry
    name = max(layer.files, key=lambda n: len(layer.files[n]) if n.endswith("3.bin") else 0)
    expected = layer.files[name]
    disk_fd = os.open(mount.disk(), os.O_RDONLY)
    try:
        # The metadata is read once (a runtime looks around): the layer bytes on the meta's
        # last page are kept from then on, so lookups never need the registry again.
        for path in mount.mnt.rglob("*"):
            path.stat()
        registry.reset_counters()
        registry.dead = True  # every blob GET answers 503
        dead_since = started = time.monotonic()
        assert not _read(mount, name, 65536, len(expected) // 2, expected=expected,
                         disk_fd=disk_fd)
        took_s = time.monotonic() - started
        failed = registry.counts["failed"]
        stats = mount.status()  # asked at once: counts the failure already
        print(f"dead registry: one 64 KiB read got EIO after {took_s:.2f} s and {failed} "
              f"requests")
        # One 64 KiB read: EIO within one retry budget (1.5 s of back-off, plus time for the
        # requests and the kernel's page-by-page retries, which now fail at once).
        assert took_s < BUDGET_S + 2.0, took_s
        assert stats["errors"] >= 1 and stats["failure_memory_hits"] >= 1
        # More pages of the same file while it is dead. Requests in all (the kernel's
        # readahead and the decoder's read-ahead touch a few spans): each failing range costs
        # one budget of 5 tries, and 3 failures in a row open the circuit, so at most 3
        # budgets per failure-memory period (then one probe's), not one per page or reader.
        for page in range(20):
            assert not _read(mount, name, 4096, page * 4096, expected=expected,
                             disk_fd=disk_fd)
        time.sleep(0.5)  # background work still running ends
        periods = int((time.monotonic() - dead_since) / FAILURE_MEMORY_S) + 1
        assert 1 <= registry.counts["failed"] <= periods * 3 * (RETRIES + 1), (
            periods, registry.blob_ranges)
        assert mount.status()["errors"] >= 21  # status is current (issue 11, item 14)
        registry.clear_faults()  # the registry recovers
        time.sleep(FAILURE_MEMORY_S)
        assert _read(mount, name, 65536, len(expected) // 2, expected=expected,
                     disk_fd=disk_fd)
        with open(mount.mnt / name, "rb") as whole:
            assert whole.read() == expected
    finally:
        os.close(disk_fd)


def test_fault_soak_never_returns_wrong_bytes(layer: Layer, tmp_path: Path) -> None:
    """10,000 reads through the mount while the registry fails (503, resets, truncated and
    tampered bodies) and, for a while, fails everything: every read returns the right bytes or
    EIO, and reads succeed again once the registry is back. A 10 MiB cache limit and 8 MiB
    of memory caches for a 12 MB blob keep the registry (and eviction) busy throughout; a
    10 ms first back-off keeps the many retries short."""
    with mounted(layer, tmp_path, "--cache-max-size", "10MiB", "--memory-cache",
                 "8MiB", "--retry-delay", "0.01") as mount:
        _soak(layer, mount)
        sizes = [blob["disk_bytes"] for blob in mount.cache_ls()["blobs"]]
        assert sum(sizes) <= 10 << 20


def _soak(layer: Layer, mount: Mounted) -> None:
    registry = layer.registry
    rng = random.Random(12)
    names = sorted(layer.files)
    stop = threading.Event()
    dead = threading.Event()

    def chaos() -> None:
        """About one blob request in three meets a fault (503, reset, cut body; sometimes a
        tampered byte), whatever the machine's speed: single faults that retries absorb."""
        chaos_rng = random.Random(13)
        faults = [registry.fail_next, registry.reset_next, registry.truncate_next]
        seen = registry.blob_requests
        while not stop.wait(0.005):
            if dead.is_set() or registry.blob_requests == seen or registry.pending:
                continue
            seen = registry.blob_requests
            if chaos_rng.random() < 0.3:
                chaos_rng.choice(faults)(1)
            elif chaos_rng.random() < 0.03:  # a tampered byte for the next few requests
                registry.tamper(chaos_rng.randrange(len(registry.layer)))
                while registry.blob_requests < seen + 3 and not stop.wait(0.002):
                    pass
                registry.tamper(None)

    thread = threading.Thread(target=chaos, daemon=True)
    disk_fd = os.open(mount.disk(), os.O_RDONLY)
    outcomes = {phase: [0, 0] for phase in ("chaos", "dead", "recovered", "chaos again")}
    reads = 10_000
    started = time.monotonic()
    thread.start()
    try:
        for n in range(reads):
            if n == 3000:  # the registry dies for a while...
                dead.set()
                registry.dead = True
            if n == 3500:  # ...and comes back, the chaos paused for a while
                registry.clear_faults()
                time.sleep(FAILURE_MEMORY_S + 0.2)  # a retry in flight may fail a moment late
            if n == 5000:
                dead.clear()
            phase = ("chaos" if n < 3000 else "dead" if n < 3500 else "recovered" if n < 5000
                     else "chaos again")
            name = rng.choice(names)
            expected = layer.files[name]
            offset = rng.randrange(len(expected))
            length = min(rng.choice((1, 512, 4096, 16384, 65536)), len(expected) - offset)
            ok = _read(mount, name, length, offset, expected=expected, disk_fd=disk_fd)
            outcomes[phase][0 if ok else 1] += 1
    finally:
        stop.set()
        thread.join()
        os.close(disk_fd)
    took_s = time.monotonic() - started
    print(f"soak: (ok, failed) per phase {outcomes}, {took_s:.1f} s")
    assert sum(ok + failed for ok, failed in outcomes.values()) == reads
    assert outcomes["dead"][1] > 0  # the dead registry was felt...
    assert outcomes["recovered"][1] == 0  # ...and every read succeeds once it is back
    for phase in ("chaos", "chaos again"):  # single faults are retried: most reads succeed
        assert outcomes[phase][0] > 0.8 * sum(outcomes[phase])
    stats = mount.status()
    assert stats["errors"] >= sum(failed for _, failed in outcomes.values())
    print(f"status: reads {stats['reads']}, "
          f"errors {stats['errors']}, retries {stats['registry_retries']}, requests "
          f"{stats['registry_requests']}, failure-memory hits {stats['failure_memory_hits']}, "
          f"verification failures {stats['verification_failures']}")
    # Everything that was cached is whole: the whole tree reads right with a healthy registry
    # (a fault the chaos left pending is cleared, and a range that failed in its last reads
    # is failed at once for FAILURE_MEMORY_S: that is failure memory's promise, so wait).
    registry.clear_faults()
    time.sleep(FAILURE_MEMORY_S + 0.2)
    for name, data in layer.files.items():
        assert (mount.mnt / name).read_bytes() == data


def _read_blocks(mount: Mounted, blocks: list[tuple[int, int]],
                 scrapes: list[dict[str, float]]) -> None:
    """Reads straight from the device file, readahead off, its pages dropped before each: the
    daemon serves exactly these bytes. /metrics is scraped every 8 reads."""
    disk_fd = os.open(mount.disk(), os.O_RDONLY)
    os.posix_fadvise(disk_fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        for n, (length, offset) in enumerate(blocks):
            _uncache(disk_fd)
            assert len(os.pread(disk_fd, length, offset)) == length
            if n % 8 == 0:
                scrapes.append(mount.metrics())
    finally:
        os.close(disk_fd)


def test_metrics_scraped_during_reads_match_the_work_done(layer: Layer, tmp_path: Path) -> None:
    """/metrics scraped between reads only grows; its counters equal the bytes the reads asked
    for and the registry's own count of requests and bytes; after a remount on the same cache
    (decoded spans removed, so reads go through the chunk cache) the reads' lookups are hits."""
    registry = layer.registry
    blocks = [(65536, offset) for offset in range(0, 8 << 20, 65536 * 3)]
    scrapes: list[dict[str, float]] = []
    with mounted(layer, tmp_path) as mount:
        registry.reset_counters()
        before = mount.metrics()
        _read_blocks(mount, blocks, scrapes)
        after = mount.metrics()
        stats = mount.status()
    counters = [name for name in after if name.endswith("_total")]
    for earlier, later in zip(scrapes, scrapes[1:], strict=False):
        assert all(later.get(name, 0) >= earlier.get(name, 0) for name in counters)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert len(scrapes) == -(-len(blocks) // 8)
    assert delta("hybrid_erofs_read_bytes_total") == sum(n for n, _ in blocks)
    assert delta("hybrid_erofs_reads_total") >= len(blocks)
    assert delta("hybrid_erofs_read_errors_total") == 0
    assert delta("hybrid_erofs_fetched_bytes_total") == registry.bytes_served > 0
    assert delta("hybrid_erofs_registry_requests_total") == registry.blob_requests
    assert delta("hybrid_erofs_chunk_cache_misses_total") > 0
    assert after["hybrid_erofs_read_duration_seconds_count"] == after["hybrid_erofs_reads_total"]
    assert after["hybrid_erofs_resident_memory_bytes"] > 0
    assert 0 < after["hybrid_erofs_chunk_cache_size_bytes"] <= after[
        "hybrid_erofs_chunk_cache_limit_bytes"]
    # status shows the same counters
    assert stats["bytes_fetched"] == after["hybrid_erofs_fetched_bytes_total"]
    assert stats["cache_misses"] == after["hybrid_erofs_chunk_cache_misses_total"]
    assert stats["cache_hits"] == after["hybrid_erofs_chunk_cache_hits_total"]

    for decoded in (tmp_path / "cache").rglob("layer*"):
        decoded.unlink()
    registry.reset_counters()
    with mounted(layer, tmp_path) as mount:
        start = mount.metrics()  # the kernel read a page or two when it mounted
        _read_blocks(mount, blocks, [])
        again = mount.metrics()
    # Every chunk the reads need is a hit; only the decoder's read-ahead past the last block
    # (which the first mount may not have reached before it was unmounted) may fetch.
    hits, misses = (again[f"hybrid_erofs_chunk_cache_{kind}_total"] for kind in ("hits", "misses"))
    assert again["hybrid_erofs_fetched_bytes_total"] == registry.bytes_served
    assert registry.blob_requests <= 2 and misses <= 2 * 8 and hits >= 10 * max(misses, 1)
    assert (again["hybrid_erofs_read_bytes_total"] - start["hybrid_erofs_read_bytes_total"]
            == sum(n for n, _ in blocks))
