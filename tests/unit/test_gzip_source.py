"""GzipSource: random reads against full decompression, member crossings, caching, failures."""

from __future__ import annotations

import gzip
import io
import random
import threading
import time
import zlib
from pathlib import Path

import pytest

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.gzindex import source as source_module
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import GzipIndex
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.source import FileSource, MemorySource, read_into

from ..doubles import CountingSource, FlakySource


@pytest.fixture(autouse=True, params=["igzip", "isal_zlib", "stdlib"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test with each inflate engine GzipSource can use: isal's IgzipDecompressor (the
    default), a zlib-style decompressobj (isal_zlib's; zlib-ng's is the same interface) and
    the stdlib's zlib (no isal or zlib-ng wheel)."""
    if request.param != "igzip":
        monkeypatch.setattr(source_module, "_igzip", None)
    if request.param == "stdlib":
        monkeypatch.setattr(source_module, "_codec", zlib)
    return str(request.param)


def test_the_default_decoder_releases_the_gil(decoder: str) -> None:
    """isal's IgzipDecompressor is what GzipSource uses when isal is installed (its
    decompressobj holds the GIL: decode-ahead threads would take turns on one core)."""
    if decoder != "igzip":
        return
    assert source_module.CODEC_NAME == "isal.igzip_lib"
    assert type(source_module._new_decoder(b"")).__name__ == "_IgzipDecoder"


def mixed(seed: int, size: int) -> bytes:
    """Text runs and random runs: dynamic, fixed and stored deflate blocks."""
    rng = random.Random(seed)
    words = [b"alpha ", b"beta ", b"gamma\n", b"delta\t", b"\x00\x01\x02"]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.3:
            out += rng.randbytes(rng.randrange(100, 50000))
        else:
            out += b"".join(rng.choice(words) for _ in range(rng.randrange(10, 20000)))
    return bytes(out[:size])


def indexed(blob: bytes, span: int = 256 << 10, **kw: object) -> GzipIndex:
    return build_index(io.BytesIO(blob), span=span, **kw).index  # type: ignore[arg-type]


def check_random_reads(source: GzipSource, data: bytes, index: GzipIndex, *, seed: int = 1,
                       count: int = 300) -> None:
    rng = random.Random(seed)
    size = len(data)
    offsets = [0, size - 1, size]
    for cp in index.checkpoints:  # exact checkpoint starts and just before them
        offsets += [cp.out_offset, max(0, cp.out_offset - 1000)]
    offsets += [rng.randrange(size) for _ in range(count)]
    for offset in offsets:
        for length in (0, 1, 4096, rng.randrange(1, 3 * index.span)):
            length = min(length, size - offset)
            if rng.random() < 0.5:
                assert source.pread(length, offset) == data[offset : offset + length], (offset,
                                                                                       length)
            else:  # the exporter's way: straight into its buffer (every byte of it written)
                buffer = bytearray(b"\xa5") * length
                read_into(source, memoryview(buffer), offset)
                assert buffer == data[offset : offset + length], (offset, length)


DATA = mixed(1, 6 << 20)
BLOB = gzip.compress(DATA, 6)
INDEX = indexed(BLOB)


def test_random_reads_match_full_decompression() -> None:
    source = GzipSource(MemorySource(BLOB), INDEX, size=len(DATA), cache_bytes=1 << 20)
    assert sum(1 for cp in INDEX.checkpoints if cp.bits) >= 3
    check_random_reads(source, DATA, INDEX)


def test_size_is_learned_from_the_last_span_when_not_given() -> None:
    source = GzipSource(MemorySource(BLOB), INDEX)
    assert source.size == len(DATA)
    assert source.pread(10, len(DATA) - 10) == DATA[-10:]


def test_reads_past_the_end_are_caller_bugs() -> None:
    source = GzipSource(MemorySource(BLOB), INDEX, size=len(DATA))
    with pytest.raises(ValueError):
        source.pread(2, len(DATA) - 1)
    with pytest.raises(ValueError):
        source.pread(-1, 0)


def test_multi_member_blob_with_trailing_zeros() -> None:
    members = [gzip.compress(DATA[i : i + 700_000], 1 + i % 9) for i in range(0, len(DATA), 700_000)]
    members.insert(2, gzip.compress(b""))  # an empty member in the middle
    blob = b"".join(members) + bytes(64)
    for every in (False, True):
        index = indexed(blob, every_member=every)
        source = GzipSource(MemorySource(blob), index, cache_bytes=1 << 20)
        assert source.size == len(DATA)
        check_random_reads(source, DATA, index, seed=2, count=100)


def test_member_headers_with_optional_fields() -> None:
    def member(payload: bytes) -> bytes:
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = deflate.compress(payload) + deflate.flush()
        extra = b"AB\x03\x00xyz"
        header = b"\x1f\x8b\x08" + bytes([4 | 8 | 16 | 2]) + bytes(6)
        header += len(extra).to_bytes(2, "little") + extra + b"name\0" + b"comment\0"
        header += (zlib.crc32(header) & 0xFFFF).to_bytes(2, "little")
        trailer = zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
        return header + body + trailer

    data = DATA[:2_000_000]
    blob = b"".join(member(data[i : i + 300_001]) for i in range(0, len(data), 300_001))
    assert gzip.decompress(blob) == data
    index = indexed(blob, span=64 << 10)
    check_random_reads(GzipSource(MemorySource(blob), index), data, index, count=50)


@pytest.mark.parametrize("data", [bytes(40 << 20), random.Random(3).randbytes(3 << 20)],
                         ids=["compressible", "incompressible"])
def test_extreme_ratios(data: bytes) -> None:
    blob = gzip.compress(data, 6)
    index = indexed(blob, span=1 << 20)
    source = GzipSource(MemorySource(blob), index, cache_bytes=4 << 20)
    assert source.size == len(data)
    check_random_reads(source, data, index, count=40)


def test_sequential_reads_inflate_each_byte_once() -> None:
    inner = CountingSource(BLOB)
    source = GzipSource(inner, INDEX, size=len(DATA), cache_bytes=1 << 20)
    out = bytearray()
    for offset in range(0, len(DATA), 128 << 10):
        out += source.pread(min(128 << 10, len(DATA) - offset), offset)
    assert out == DATA
    # The decoder is handed from span to span: no restarts, so each byte is inflated once
    # (plus the overshoot of the last piece) and each compressed byte fetched about once.
    assert source.decoded_bytes < len(DATA) * 1.1
    assert inner.bytes_read < len(BLOB) * 1.1


def test_repeated_reads_hit_the_span_cache() -> None:
    inner = CountingSource(BLOB)
    source = GzipSource(inner, INDEX, size=len(DATA))
    offset = INDEX.checkpoints[3].out_offset + 5000
    first = source.pread(4096, offset)
    calls, decoded = len(inner.calls), source.decoded_bytes
    for _ in range(20):
        assert source.pread(4096, offset) == first
    assert len(inner.calls) == calls
    assert source.decoded_bytes == decoded


def test_cache_is_bounded() -> None:
    source = GzipSource(MemorySource(BLOB), INDEX, size=len(DATA), cache_bytes=600 << 10)
    for cp in INDEX.checkpoints:
        source.pread(100, cp.out_offset + 10)
        assert source._cached <= 600 << 10 or len(source._spans) == 1


def test_concurrent_readers_get_correct_bytes() -> None:
    source = GzipSource(MemorySource(BLOB), INDEX, size=len(DATA), cache_bytes=1 << 20)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                offset = rng.randrange(len(DATA))
                length = min(rng.randrange(1, 300_000), len(DATA) - offset)
                assert source.pread(length, offset) == DATA[offset : offset + length]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


@pytest.mark.parametrize("into", [False, True], ids=["pread", "read_into"])
@pytest.mark.parametrize("multi", [False, True], ids=["one-member", "multi-member"])
def test_corrupt_blob_never_reads_through_to_the_end(multi: bool, into: bool) -> None:
    # Reading a corrupted blob from start to end must raise EIO: inflate errors, the
    # next checkpoint's window, and each member's CRC-32 catch every flip. (Random reads
    # inside one span cannot be verified by the gzip format alone; span digests do that.)
    data = DATA[: 3 << 20]
    blob = b"".join(gzip.compress(data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)) \
        if multi else gzip.compress(data)
    index = indexed(blob)
    rng = random.Random(5)
    for trial in range(30):
        bad = bytearray(blob)
        spot = rng.randrange(10, len(bad) - 8)  # anywhere after the first header
        bad[spot] ^= 1 << rng.randrange(8)
        source = GzipSource(MemorySource(bytes(bad)), index, size=len(data), cache_bytes=1 << 20)
        with pytest.raises(SourceIOError) as info:
            for offset in range(0, len(data), 1 << 18):
                length = min(1 << 18, len(data) - offset)
                if into:
                    read_into(source, memoryview(bytearray(length)), offset)
                else:
                    source.pread(length, offset)
        assert info.value.errno == 5, (trial, spot)


def test_truncated_blob_raises_eio() -> None:
    source = GzipSource(MemorySource(BLOB[: len(BLOB) // 2]), INDEX, size=len(DATA))
    with pytest.raises(SourceIOError, match="truncated|ends at"):
        source.pread(4096, len(DATA) - 4096)


def test_zinfo_of_another_blob_is_detected() -> None:
    other = gzip.compress(mixed(9, 6 << 20), 6)
    source = GzipSource(MemorySource(other), INDEX, size=len(DATA))
    with pytest.raises(SourceIOError):
        for offset in range(0, len(DATA), 256 << 10):
            source.pread(256 << 10, offset)


def test_inner_failures_propagate_and_the_next_read_recovers() -> None:
    inner = FlakySource(BLOB, failures=1)
    source = GzipSource(inner, INDEX, size=len(DATA))
    offset = INDEX.checkpoints[2].out_offset + 100
    with pytest.raises(SourceIOError, match="flaky"):
        source.pread(4096, offset)
    assert source.pread(4096, offset) == DATA[offset : offset + 4096]


def test_close_closes_inner() -> None:
    inner = CountingSource(BLOB)
    GzipSource(inner, INDEX, size=len(DATA)).close()
    assert inner.closed


class PrefetchLog(CountingSource):
    """A blob that records what is asked to be prefetched (and serves reads as usual)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.prefetched: list[tuple[int, int]] = []

    def prefetch(self, length: int, offset: int) -> None:
        self.prefetched.append((length, offset))


def _compressed_range(number: int) -> tuple[int, int]:
    """(start, end) of span `number`'s compressed bytes, as GzipSource fetches them."""
    cps = INDEX.checkpoints
    start = cps[number].in_offset - (1 if cps[number].bits else 0)
    end = cps[number + 1].in_offset + 1 if number + 1 < len(cps) else len(BLOB)
    return start, min(end, len(BLOB))


def test_forward_readers_prefetch_compressed_spans_ahead_once() -> None:
    inner = PrefetchLog(BLOB)
    source = GzipSource(inner, INDEX, size=len(DATA), decode_ahead=1, fetch_ahead=2)
    step = 64 << 10
    out = bytearray()
    for offset in range(0, len(DATA), step):
        out += source.pread(min(step, len(DATA) - offset), offset)
    source.close()
    assert out == DATA
    asked = sorted((offset, offset + length) for length, offset in inner.prefetched)
    # Each compressed byte asked for at most once, in pieces of at most a span...
    for (_, end), (start, _) in zip(asked, asked[1:], strict=False):
        assert start >= end
    # ...and, once the run has read through 2 spans (the window opens at half the spans
    # read), every span after the decode-ahead one.
    covered = set()
    for start, end in asked:
        covered.update(range(start, end))
    opened = bisect_span(INDEX.checkpoints[2].out_offset)
    assert opened == 2
    for number in range(opened + 1, len(INDEX.checkpoints)):
        start, end = _compressed_range(number)
        assert covered.issuperset(range(start, end)), number
    first_asked = min(start for start, _ in asked)
    assert first_asked >= _compressed_range(2)[0]  # nothing before the window opened


def test_ahead_work_is_held_while_a_profile_prefetch_runs() -> None:
    """ahead_held(): a forward reader starts no decode-ahead and asks no prefetch meanwhile,
    and gets both back after."""
    inner = PrefetchLog(BLOB)
    source = GzipSource(inner, INDEX, size=len(DATA), decode_ahead=2, fetch_ahead=4)
    step = 64 << 10
    middle = len(INDEX.checkpoints) // 2
    stop = INDEX.checkpoints[middle].out_offset
    out = bytearray()
    with source.ahead_held():
        for offset in range(0, stop, step):
            out += source.pread(min(step, stop - offset), offset)
        time.sleep(0.2)  # decode-ahead threads, had any started, would be decoding now
        # nothing asked ahead, nothing decoded past the piece the last read ended in
        assert inner.prefetched == []
        assert source.decoded_bytes < INDEX.checkpoints[middle + 1].out_offset
    for offset in range(stop, len(DATA), step):
        out += source.pread(min(step, len(DATA) - offset), offset)
    source.close()
    assert out == DATA
    assert inner.prefetched != []


def test_a_short_forward_run_prefetches_nothing() -> None:
    inner = PrefetchLog(BLOB)
    source = GzipSource(inner, INDEX, size=len(DATA), decode_ahead=1, fetch_ahead=8)
    start = INDEX.checkpoints[5].out_offset - 100_000  # a small file across one span end
    for offset in range(start, start + 200_000, 20_000):
        source.pread(20_000, offset)
    source.close()
    assert inner.prefetched == []


def bisect_span(offset: int) -> int:
    starts = [cp.out_offset for cp in INDEX.checkpoints]
    return max(i for i, s in enumerate(starts) if s <= offset)


def test_random_readers_prefetch_nothing() -> None:
    inner = PrefetchLog(BLOB)
    source = GzipSource(inner, INDEX, size=len(DATA), decode_ahead=2, fetch_ahead=4)
    check_random_reads(source, DATA, INDEX, seed=3)
    source.close()
    assert inner.prefetched == []


def test_fetch_ahead_needs_a_prefetching_inner() -> None:
    inner = CountingSource(BLOB)  # no prefetch(): nothing is asked, reads work as before
    source = GzipSource(inner, INDEX, size=len(DATA), decode_ahead=1, fetch_ahead=4)
    assert b"".join(source.pread(min(1 << 16, len(DATA) - o), o)
                    for o in range(0, len(DATA), 1 << 16)) == DATA
    source.close()
    with pytest.raises(ValueError, match="fetch_ahead"):
        GzipSource(inner, INDEX, size=len(DATA), fetch_ahead=-1)


def test_a_file_prefetches_by_advice_and_checks_the_range(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(BLOB)
    blob = FileSource(path)
    blob.prefetch(len(BLOB), 0)  # posix_fadvise WILLNEED: nothing to see but no error
    with pytest.raises(ValueError):
        blob.prefetch(10, len(BLOB))
    source = GzipSource(blob, INDEX, size=len(DATA), decode_ahead=1, fetch_ahead=2)
    assert b"".join(source.pread(min(1 << 16, len(DATA) - o), o)
                    for o in range(0, len(DATA), 1 << 16)) == DATA
    source.close()
    blob.prefetch(len(BLOB), 0)  # closed: a no-op
