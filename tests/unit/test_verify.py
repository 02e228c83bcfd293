"""Span digests: computed in the index pass, written beside the zinfo, checked before decoding."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import time
from pathlib import Path

import pytest

from hybrid_erofs.device import open_layer
from hybrid_erofs.errors import IndexFormatError, InvalidInput, SourceIOError
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.sidecar import load_sidecar, sidecar_path
from hybrid_erofs.gzindex.spans import SpanDigest, SpanHasher
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from hybrid_erofs.sources.verify import VerifiedSource

from ..doubles import CountingSource
from .test_gzip_source import mixed

DATA = mixed(21, 4 << 20)


def spans_of(blob: bytes, cuts: list[tuple[int, int]]) -> list[SpanDigest]:
    hasher = SpanHasher()
    for cut in cuts:
        hasher.cut(*cut)
    hasher.feed(blob)
    return hasher.finish()


@pytest.mark.parametrize("pieces", [1, 7, 1000])
def test_span_hasher_extents_and_digests(pieces: int) -> None:
    blob = random.Random(1).randbytes(100_000)
    cuts = [(1000, 3), (1000, 0), (50_000, 0), (50_001, 5)]
    hasher = SpanHasher()
    step = -(-len(blob) // pieces)
    queue = list(cuts)
    for offset in range(0, len(blob), step):
        while queue and queue[0][0] > offset:  # cuts arrive before their bytes, or exactly at them
            hasher.cut(*queue.pop(0))
        hasher.feed(blob[offset : offset + step])
    for cut in queue:
        hasher.cut(*cut)
    spans = hasher.finish()
    assert [(s.offset, s.length) for s in spans] == [
        (0, 1000), (999, 1), (1000, 49_000), (50_000, 1), (50_000, 50_000)]
    for span in spans:
        assert span.sha256 == hashlib.sha256(blob[span.offset : span.offset + span.length]).hexdigest()
    assert hasher.blob.hexdigest() == hashlib.sha256(blob).hexdigest()


def test_builder_digests_cover_the_blob() -> None:
    blob = gzip.compress(DATA)
    result = build_index(io.BytesIO(blob), span=256 << 10)
    spans = result.span_digests
    assert len(spans) == len(result.index) > 5
    assert spans[0].offset == 0 and spans[-1].offset + spans[-1].length == len(blob)
    for cp, span in zip(result.index.checkpoints[1:], spans[1:], strict=True):
        assert span.offset == cp.in_offset - (1 if cp.bits else 0)
    for span in spans:
        assert span.sha256 == hashlib.sha256(blob[span.offset : span.offset + span.length]).hexdigest()


def test_verified_source_reads_and_caches() -> None:
    blob = random.Random(2).randbytes(300_000)
    inner = CountingSource(blob)
    source = VerifiedSource(inner, spans_of(blob, [(100_000, 3), (200_000, 0)]), cache_spans=2)
    rng = random.Random(3)
    for _ in range(200):
        offset = rng.randrange(len(blob))
        length = min(rng.randrange(1, 150_000), len(blob) - offset)
        assert source.pread(length, offset) == blob[offset : offset + length]
    calls = len(inner.calls)
    source.pread(10, 150_000)
    source.pread(10, 150_010)
    assert len(inner.calls) <= calls + 1  # a span is fetched and checked once while cached


def test_tampered_bytes_are_eio_never_data() -> None:
    blob = random.Random(4).randbytes(300_000)
    spans = spans_of(blob, [(100_000, 0), (200_000, 0)])
    bad = bytearray(blob)
    bad[150_000] ^= 1
    source = VerifiedSource(MemorySource(bytes(bad)), spans)
    assert source.pread(100, 10) == blob[10:110]  # other spans still read
    with pytest.raises(SourceIOError, match="span 1 .* failed verification"):
        source.pread(1, 199_999)
    with pytest.raises(SourceIOError):
        source.pread(200_000, 0)


@pytest.fixture()
def indexed(tmp_path: Path) -> tuple[Path, Path]:
    layer = tmp_path / "layer.tar.gz"
    # Random runs give stored blocks: a flipped byte there decodes "fine" without digests.
    layer.write_bytes(gzip.compress(DATA, 6))
    zinfo = tmp_path / "layer.zinfo"
    index_layer(str(layer), zinfo=zinfo, meta=None, span=256 << 10)
    return layer, zinfo


def test_index_writes_the_sidecar(indexed: tuple[Path, Path]) -> None:
    layer, zinfo = indexed
    side = load_sidecar(sidecar_path(zinfo), zinfo_bytes=zinfo.read_bytes())
    assert side.blob_digest == "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    assert side.blob_size == layer.stat().st_size and side.layer_size == len(DATA)
    assert side.checkpoints == len(side.spans)


def test_open_layer_verifies_and_knows_the_size(indexed: tuple[Path, Path]) -> None:
    layer, zinfo = indexed
    source = open_layer(layer, zinfo=zinfo)
    assert source.size == len(DATA)
    assert source.pread(4096, 3_000_000) == DATA[3_000_000:3_004_096]
    source.close()
    # Corrupt one byte inside a stored block: the digests catch what inflate cannot.
    blob = bytearray(layer.read_bytes())
    stored = _stored_block_byte(bytes(blob))
    blob[stored] ^= 0x20
    layer.write_bytes(bytes(blob))
    source = open_layer(layer, zinfo=zinfo)
    with pytest.raises(SourceIOError, match="failed verification"):
        for offset in range(0, len(DATA), 1 << 20):
            source.pread(min(1 << 20, len(DATA) - offset), offset)
    source.close()


def _stored_block_byte(blob: bytes) -> int:
    """An offset inside a stored block: random layer bytes appear verbatim in the blob."""
    rng_run = max(range(0, len(DATA) - 4096, 4096),
                  key=lambda o: len(set(DATA[o : o + 4096])))  # the most random 4 KiB
    probe = DATA[rng_run + 1000 : rng_run + 1032]
    position = blob.find(probe)
    assert position > 0, "no stored block found"
    return position + 5


def test_wrong_layer_or_wrong_sidecar_is_refused(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    layer, zinfo = indexed
    other = tmp_path / "other.tar.gz"
    other.write_bytes(gzip.compress(DATA[:-1000], 6))
    with pytest.raises(InvalidInput, match=r"not the layer .* was built for: that was sha256:"):
        open_layer(other, zinfo=zinfo)
    side = json.loads(sidecar_path(zinfo).read_text())
    side["zinfo"]["digest"] = "sha256:" + "0" * 64
    sidecar_path(zinfo).write_text(json.dumps(side))
    with pytest.raises(IndexFormatError, match="belongs to another zinfo"):
        open_layer(layer, zinfo=zinfo)
    sidecar_path(zinfo).write_text("{not json")
    with pytest.raises(IndexFormatError, match="not a readable JSON zinfo sidecar"):
        open_layer(layer, zinfo=zinfo)


class _TamperedSource(CountingSource):
    """Serves `blob` with the byte at `bad` flipped while `bad` is not None."""

    def __init__(self, data: bytes, bad: int | None) -> None:
        super().__init__(data)
        self.bad = bad

    def pread(self, length: int, offset: int) -> bytes:
        data = bytearray(super().pread(length, offset))
        if self.bad is not None and offset <= self.bad < offset + length:
            data[self.bad - offset] ^= 0xFF
        return bytes(data)


def _tampered_cache(tmp_path: Path, seed: int, bad: int | None
                    ) -> tuple[bytes, list[SpanDigest], _TamperedSource, ChunkCacheSource]:
    """A 300,000-byte blob in two spans (100,000 and 200,000 bytes), its byte `bad` flipped
    by the source under a chunk cache of 16 KiB chunks without readahead."""
    blob = random.Random(seed).randbytes(300_000)
    spans = spans_of(blob, [(100_000, 0), (200_000, 0)])
    inner = _TamperedSource(blob, bad)
    cache = ChunkCacheSource(inner, key=f"sha256:{seed:064x}", cache_dir=tmp_path,
                             chunk_size=16 << 10, readahead=0)
    return blob, spans, inner, cache


def _wait_readahead(cache: ChunkCacheSource, chunks: int) -> None:
    """Until the cache's background fetches got `chunks` chunks (10 s at most)."""
    deadline = time.monotonic() + 10
    while cache.stats.readahead_chunks < chunks and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_failed_span_is_dropped_from_the_chunk_cache(tmp_path: Path) -> None:
    blob, spans, inner, cache = _tampered_cache(tmp_path, 5, 150_000)
    source = VerifiedSource(cache, spans)
    try:
        assert source.pread(100, 10) == blob[10:110]
        with pytest.raises(SourceIOError, match="span 1 .* failed verification") as caught:
            source.pread(10, 150_000)
        assert caught.value.errno == 5 and not caught.value.transient
        # The span was fetched twice (the second time past the cache) and dropped both times.
        assert source.failed_spans == 2
        assert cache.stats.invalidated_chunks == 2 * 7  # bytes 100_000-199_999: chunks 6..12
        calls = len(inner.calls)
        inner.bad = None  # the server is fixed: the next read refetches and succeeds
        assert source.pread(100_000, 100_000) == blob[100_000:200_000]
        assert len(inner.calls) == calls + 1
    finally:
        source.close()


def test_a_bad_copy_in_the_cache_heals_on_the_refetch(tmp_path: Path) -> None:
    blob, spans, inner, cache = _tampered_cache(tmp_path, 6, 250_000)
    cache.pread(1000, 249_500)  # a bad copy lands in the cache, unverified
    inner.bad = None
    source = VerifiedSource(cache, spans)
    try:
        assert source.pread(100_000, 200_000) == blob[200_000:]
        assert source.failed_spans == 1 and source.verified_spans == 1
    finally:
        source.close()


def test_damage_in_one_span_does_not_fail_reads_of_the_span_before(
        indexed: tuple[Path, Path]) -> None:
    layer, zinfo = indexed
    side = load_sidecar(sidecar_path(zinfo))
    index_cps = build_index(io.BytesIO(layer.read_bytes()), span=256 << 10).index.checkpoints
    blob = bytearray(layer.read_bytes())
    damaged = side.spans[3]
    blob[damaged.offset + damaged.length // 2] ^= 0xFF
    layer.write_bytes(bytes(blob))
    source = open_layer(layer, zinfo=zinfo)
    try:
        end = index_cps[3].out_offset  # the last bytes of span 2 end where span 3 starts
        assert source.pread(4096, end - 4096) == DATA[end - 4096 : end]
        with pytest.raises(SourceIOError):
            source.pread(4096, end + 1000)
    finally:
        source.close()


def test_prefetched_tampered_bytes_are_still_refused(tmp_path: Path) -> None:
    """A prefetch only gets bytes into the chunk cache: the read that uses them checks them
    (and drops the bad chunks), so a span fetched ahead of its reader is never trusted."""
    blob, spans, inner, cache = _tampered_cache(tmp_path, 7, 150_000)
    source = VerifiedSource(cache, spans)
    try:
        source.prefetch(300_000, 0)  # handed on to the cache: every chunk fetched and stored
        _wait_readahead(cache, 19)
        assert cache.stats.readahead_chunks == 19  # 300,000 bytes in 16 KiB chunks
        calls = len(inner.calls)
        assert source.pread(100, 10) == blob[10:110]
        assert len(inner.calls) == calls  # served from what the prefetch stored
        with pytest.raises(SourceIOError, match="span 1 .* failed verification"):
            source.pread(10, 150_000)
        assert source.failed_spans == 2 and source.verified_spans == 1
        assert cache.stats.invalidated_chunks == 2 * 7
    finally:
        source.close()


def test_tampered_bytes_handed_over_from_a_prefetch_are_dropped_and_fetched_again(
        tmp_path: Path) -> None:
    """The chunk cache hands chunks fetched ahead to the read that asks for them (from
    memory, once; a chunk two spans share stays for the second). A span whose handed-over
    bytes fail their sha256 drops them from memory too: the refetch gets the server's good
    bytes instead of the same bad ones."""
    # The bad byte is in chunk 6 (16 KiB chunks), which both spans share.
    blob, spans, inner, cache = _tampered_cache(tmp_path, 8, 100_005)
    source = VerifiedSource(cache, spans)
    try:
        source.prefetch(300_000, 0)
        _wait_readahead(cache, 19)
        calls = len(inner.calls)
        inner.bad = None  # only the prefetch got the bad byte
        assert source.pread(100, 10) == blob[10:110]  # span 0 ends before the bad byte
        assert len(inner.calls) == calls  # handed over, not fetched
        assert source.pread(1000, 100_000) == blob[100_000:101_000]
        assert source.failed_spans == 1  # the handed-over copy, then the refetch passed
        assert source.verified_spans == 2
        assert len(inner.calls) == calls + 1
    finally:
        source.close()
