"""The registry read stack under faults (tests/fault_registry.py, loopback, no root, no external
programs): every read returns the bytes of local decompression or raises SourceIOError (EIO),
never wrong bytes; retries and re-auth are bounded; request counts prove the cache."""

from __future__ import annotations

import dataclasses
import errno
import io
import random
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybrid_erofs.device import RegistryOptions, open_layer
from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.gzindex.sidecar import load_sidecar, sidecar_path
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.source import ByteSource
from hybrid_erofs.sources.chunkcache import DEFAULT_CHUNK_SIZE
from hybrid_erofs.sources.registry import open_registry_blob
from tests.conftest import layer_tar
from tests.fault_registry import FaultRegistry

pytestmark = pytest.mark.integration
SPAN = 256 << 10


@dataclass
class Layer:
    registry: FaultRegistry
    blob: bytes
    plain: bytes
    zinfo: Path

    @property
    def ref(self) -> str:
        return self.registry.ref


def _make_layer(rootfs_tar: Path) -> tuple[bytes, bytes]:
    """rootfs's files plus text and random data: a ~3 MB blob, a dozen cache chunks."""
    rng = random.Random(4)
    words = [rng.randbytes(rng.randrange(2, 9)).hex().encode() for _ in range(2000)]
    extra = {"data/words.txt": b" ".join(rng.choice(words) for _ in range(400_000)),
             "data/random.bin": rng.randbytes(1 << 20)}
    raw = io.BytesIO()
    with tarfile.open(rootfs_tar) as src, tarfile.open(fileobj=raw, mode="w") as out:
        for member in src:
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            out.addfile(info, io.BytesIO(data))
    import gzip

    plain = raw.getvalue()
    return gzip.compress(plain, compresslevel=6, mtime=0), plain


@pytest.fixture(scope="module")
def indexed(layers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layer]:
    """The layer in a token-auth FaultRegistry, indexed once from the registry (span 256 KiB)."""
    blob, plain = _make_layer(layer_tar(layers["rootfs"]))
    registry = FaultRegistry(blob)
    workdir = tmp_path_factory.mktemp("faults")
    zinfo = workdir / "layer.zinfo"
    try:
        report = index_layer(registry.ref, zinfo=zinfo, meta=None, span=SPAN,
                             registry=RegistryOptions(cache_dir=workdir / "index-cache"))
        assert report.layer_size == len(plain) and report.blob_size == len(blob)
        assert registry.blob_requests == 1  # streamed once
        yield Layer(registry, blob, plain, zinfo)
    finally:
        registry.close()


@pytest.fixture
def layer(indexed: Layer) -> Iterator[Layer]:
    """The shared registry with no faults and fresh counters before and after each test."""
    indexed.registry.clear_faults()
    indexed.registry.token_ttl_s, indexed.registry.expires_in = 300.0, None
    indexed.registry.reset_counters()
    yield indexed
    indexed.registry.clear_faults()


@pytest.fixture
def options(tmp_path: Path) -> RegistryOptions:
    return RegistryOptions(cache_dir=tmp_path / "cache")  # a cold cache per test


def _read(source: ByteSource, layer: Layer, length: int, offset: int) -> bool:
    """True when the read returned the right bytes, False when it raised EIO; wrong bytes fail."""
    length = min(length, len(layer.plain) - offset)
    try:
        data = source.pread(length, offset)
    except SourceIOError as exc:
        assert exc.errno == errno.EIO
        return False
    assert data == layer.plain[offset : offset + length], f"wrong bytes at {offset}+{length}"
    return True


def _offsets(layer: Layer, seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(1, 200_000), rng.randrange(len(layer.plain))) for _ in range(count)]


def _chunk_fetches(registry: FaultRegistry) -> Counter[int]:
    """How often each cache chunk was part of a blob request."""
    counts: Counter[int] = Counter()
    with registry.lock:
        for offset, end in registry.blob_ranges:
            counts.update(range(offset // DEFAULT_CHUNK_SIZE, end // DEFAULT_CHUNK_SIZE + 1))
    return counts


def test_index_sidecar_matches_the_registry_blob(layer: Layer) -> None:
    side = load_sidecar(sidecar_path(layer.zinfo), zinfo_bytes=layer.zinfo.read_bytes())
    assert side.blob_digest == layer.registry.layer_digest and len(side.spans) > 8


def test_clean_reads_hit_the_cache_and_never_refetch(layer: Layer, options: RegistryOptions) -> None:
    reads = _offsets(layer, 1, 80)
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        assert all(_read(source, layer, n, o) for n, o in reads)
        # Overlapping reads and readahead never fetch a chunk twice.
        assert max(_chunk_fetches(layer.registry).values()) == 1
        assert layer.registry.token_requests == 1  # one token per scope while it is valid
    finally:
        source.close()
    layer.registry.reset_counters()
    again = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        assert all(_read(again, layer, n, o) for n, o in reads)
    finally:
        again.close()
    assert layer.registry.blob_requests == 0  # the second pass is served by the chunk cache
    assert layer.registry.counts["manifest"] == 1  # opening resolves the tag once


def test_503s_are_retried_and_retry_after_is_honoured(layer: Layer,
                                                      options: RegistryOptions) -> None:
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        layer.registry.fail_next(2)
        assert _read(source, layer, 4096, 100_000)
        assert layer.registry.counts["failed"] == 2
        layer.registry.fail_next(1, retry_after=1)
        started = time.monotonic()
        assert _read(source, layer, 4096, len(layer.plain) - 10_000)
        assert 1.0 <= time.monotonic() - started < 5.0
        for status in (429, 500, 502, 504):
            layer.registry.fail_next(1, status=status)
        assert all(_read(source, layer, n, o) for n, o in _offsets(layer, 2, 30))
        assert layer.registry.counts["failed"] == 2 + 1 + 4
    finally:
        source.close()


def test_persistent_503_is_eio_after_bounded_retries(layer: Layer,
                                                     options: RegistryOptions) -> None:
    options = dataclasses.replace(options, failure_ttl_s=1.0)
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        layer.registry.fail_next(10_000)
        started = time.monotonic()
        with pytest.raises(SourceIOError, match=r"HTTP 503 .*gave up after 5 attempts") as caught:
            source.pread(4096, len(layer.plain) // 2)
        assert time.monotonic() - started < 10.0  # back-off 0.2 s doubling, full jitter
        assert caught.value.errno == errno.EIO and not caught.value.transient
        assert layer.registry.counts["failed"] == 5
        for page in range(8):  # the kernel re-reads page by page: no new retry budget each
            assert not _read(source, layer, 4096, len(layer.plain) // 2 + 4096 * page)
        # (8 budgets would be 40 requests; decoding ahead of these forward reads may try the
        # next span once too, and its failure opens the circuit.)
        assert layer.registry.counts["failed"] <= 10
        layer.registry.clear_faults()  # the registry recovers: so does the same source
        time.sleep(1.2)  # once the failure is forgotten (a retry in flight may end late)
        assert _read(source, layer, 4096, len(layer.plain) // 2)
    finally:
        source.close()


def test_4xx_other_than_429_is_not_retried(layer: Layer, options: RegistryOptions) -> None:
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        layer.registry.fail_next(1, status=404)
        assert not _read(source, layer, 4096, 0)
        assert layer.registry.counts["failed"] == 1 and layer.registry.blob_requests == 1
    finally:
        source.close()


@pytest.mark.parametrize("fault", ["reset_next", "truncate_next"])
def test_cut_bodies_are_retried_and_never_cached(layer: Layer, options: RegistryOptions,
                                                 fault: str) -> None:
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        for n, offset in _offsets(layer, 3, 40):
            if not layer.registry.pending:  # one cut per request that reaches the registry
                getattr(layer.registry, fault)(1)
            assert _read(source, layer, n, offset)
        assert layer.registry.counts[fault.removesuffix("_next")] >= 5
    finally:
        source.close()
    layer.registry.reset_counters()
    again = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:  # what was cached is whole: a full read from the cache equals the layer
        assert _read(again, layer, len(layer.plain), 0)
    finally:
        again.close()


def test_range_ignored_200_reads_are_correct(layer: Layer, options: RegistryOptions) -> None:
    layer.registry.ignore_range = True
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        assert all(_read(source, layer, n, o) for n, o in _offsets(layer, 4, 40))
        assert layer.registry.blob_requests > 0
        assert all(offset == 0 for offset, _ in layer.registry.blob_ranges)
    finally:
        source.close()


def test_slow_answers_are_correct_in_bounded_time(layer: Layer, options: RegistryOptions) -> None:
    layer.registry.delay_s = 0.05
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        started = time.monotonic()
        assert _read(source, layer, len(layer.plain), 0)
        elapsed_s = time.monotonic() - started
        requests = layer.registry.blob_requests
        assert elapsed_s < 0.05 * requests + 10.0 and elapsed_s >= 0.05
    finally:
        source.close()


def test_a_token_expiring_mid_read_is_renewed(layer: Layer, options: RegistryOptions) -> None:
    registry = layer.registry
    registry.token_ttl_s, registry.expires_in = 0.5, 3600.0  # dies long before it says
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        tokens = registry.token_requests
        assert _read(source, layer, 4096, 0)  # one chunk: no readahead yet
        assert registry.token_requests == tokens and registry.blob_requests == 1  # reused
        time.sleep(0.6)
        unauthorized = registry.counts["unauthorized"]
        assert _read(source, layer, 4096, len(layer.plain) - 5000)  # an uncached chunk: 401
        assert registry.counts["unauthorized"] == unauthorized + 1
        assert registry.token_requests == tokens + 1  # one new token, then the retried GET
        assert all(_read(source, layer, n, o) for n, o in _offsets(layer, 6, 20))
        renewed = registry.token_requests - tokens
        assert 1 <= renewed <= registry.counts["unauthorized"] - unauthorized
    finally:
        source.close()


def test_a_token_is_refreshed_before_it_expires(layer: Layer) -> None:
    registry = layer.registry
    registry.token_ttl_s = 1.0  # announced truthfully: the client renews early, no 401s
    blob, _ = open_registry_blob(layer.ref)  # below the cache: every read is a request
    try:
        unauthorized = registry.counts["unauthorized"]  # the manifest GET's challenge
        rng = random.Random(7)
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            offset = rng.randrange(len(layer.blob) - 4096)
            assert blob.pread(4096, offset) == layer.blob[offset : offset + 4096]
            time.sleep(0.05)
        assert registry.counts["unauthorized"] == unauthorized
        assert 3 <= registry.token_requests <= 5  # at 0, then every 0.75 s
    finally:
        blob.close()


def _span_of(layer: Layer, blob_offset: int) -> tuple[int, int]:
    """The layer data (offset, length) that depends on the blob byte at `blob_offset`."""
    side = load_sidecar(sidecar_path(layer.zinfo), zinfo_bytes=layer.zinfo.read_bytes())
    number = max(k for k, s in enumerate(side.spans) if s.offset <= blob_offset)
    from hybrid_erofs.gzindex.format import parse_index

    checkpoints = parse_index(layer.zinfo.read_bytes(), name="zinfo",
                              blob_size=len(layer.blob)).checkpoints
    start = checkpoints[number].out_offset
    end = checkpoints[number + 1].out_offset if number + 1 < len(checkpoints) else len(layer.plain)
    return start, end - start


def test_tampered_bytes_are_eio_and_do_not_poison_the_cache(layer: Layer,
                                                            options: RegistryOptions) -> None:
    registry = layer.registry
    bad = len(layer.blob) // 2
    registry.tamper(bad)
    start, length = _span_of(layer, bad)
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        assert not _read(source, layer, 1000, start + length // 2)
        assert not _read(source, layer, 1000, start + length // 2)  # still EIO, not cached bytes
        assert _read(source, layer, 4096, 0)  # other spans are fine
        # A sweep over the whole layer: every read is right or EIO, and only near the damage:
        # in the damaged span, or in one before it whose decoding fetches compressed pieces
        # (up to MAX_PIECE) that reach into it (GzipSource does not clip pieces at span ends).
        sweep = range(0, len(layer.plain), 64 << 10)
        failed = [o for o in sweep if not _read(source, layer, 64 << 10, o)]
        assert any(start <= o < start + length for o in failed)
        assert all(o < start + length for o in failed) and len(failed) <= len(sweep) // 3
        registry.tamper(None)  # the registry is fixed: the same source reads it now
        assert _read(source, layer, length, start)
    finally:
        source.close()
    registry.reset_counters()
    again = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    try:
        assert _read(again, layer, len(layer.plain), 0)  # no tampered chunk left in the cache
        assert registry.blob_requests == 0
    finally:
        again.close()


def test_concurrent_readers_under_mixed_faults(layer: Layer, options: RegistryOptions) -> None:
    registry = layer.registry
    # A fault every 20 ms can outlast a read's five tries; this test is about retries, so a
    # range that failed anyway is tried again at once (failure memory: test_failmemory.py).
    options = dataclasses.replace(options, failure_ttl_s=0)
    source = open_layer(layer.ref, zinfo=layer.zinfo, registry=options)
    stop = threading.Event()

    def chaos() -> None:
        """About one blob request in three meets a fault, whatever the machine's speed (a
        fault per unit of time would meet every try of a read on a slow, loaded machine)."""
        rng = random.Random(8)
        faults: list[Callable[[int], None]] = [registry.fail_next, registry.reset_next,
                                               registry.truncate_next]
        seen = registry.blob_requests
        while not stop.wait(0.002):
            if registry.blob_requests == seen or registry.pending:
                continue
            seen = registry.blob_requests
            if rng.random() < 0.3:
                rng.choice(faults)(1)

    def reader(seed: int) -> list[bool]:
        return [_read(source, layer, n, o) for n, o in _offsets(layer, seed, 25)]

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = [ok for part in pool.map(reader, range(20, 24)) for ok in part]
    finally:
        stop.set()
        chaos_thread.join()
        source.close()
    # Single faults are retried, so nearly every read succeeds (a read whose five tries all
    # meet a fault fails); none returned wrong bytes.
    assert sum(results) >= 0.9 * len(results)
