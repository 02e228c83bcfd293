"""ChunkCacheSource and its store: bytes vs the inner source, request counts (caching, coalescing,
readahead), crash safety (killed writer, failed fetch, damaged files), eviction, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hybrid_erofs.errors import CacheError, InvalidInput, SourceIOError
from hybrid_erofs.source import FileSource, MemorySource
from hybrid_erofs.sources.cachedir import default_cache_dir, prune_cache, remove_blob, scan_blobs
from hybrid_erofs.sources.chunkcache import MAX_REQUEST, ChunkCacheSource, ChunkCacheStats
from hybrid_erofs.sources.chunkstore import blob_dir
from tests.doubles import CountingSource, FlakySource, SlowSource

KEY = "sha256:" + "5e" * 32
CHUNK = 64 << 10
DATA = random.Random(42).randbytes(10 * CHUNK + 1234)  # 11 chunks, the last one short
Open = Callable[..., ChunkCacheSource]


@pytest.fixture
def open_cache(tmp_path: Path) -> Iterator[Open]:
    """Open caches in tmp_path (chunk 64 KiB, no readahead unless told); all closed at the end."""
    opened: list[ChunkCacheSource] = []

    def open_(inner: CountingSource | None = None, **kwargs: object) -> ChunkCacheSource:
        options: dict[str, object] = {"key": KEY, "cache_dir": tmp_path, "chunk_size": CHUNK,
                                      "readahead": 0}
        options.update(kwargs)
        source = ChunkCacheSource(inner or CountingSource(DATA), **options)  # type: ignore[arg-type]
        opened.append(source)
        return source

    yield open_
    for source in opened:
        source.close()


def _chunks_fetched(calls: list[tuple[int, int]], chunk: int = CHUNK) -> Counter[int]:
    """How often each chunk was part of an inner read."""
    counts: Counter[int] = Counter()
    for length, offset in calls:
        counts.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return counts


# -- bytes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [4096, CHUNK, 3 * CHUNK, 1 << 20])
def test_random_reads_equal_inner(open_cache: Open, chunk_size: int) -> None:
    source = open_cache(chunk_size=chunk_size)
    rng = random.Random(chunk_size)
    for _ in range(300):
        offset = rng.randrange(len(DATA))
        length = rng.randrange(min(3 * CHUNK, len(DATA) - offset) + 1)
        assert source.pread(length, offset) == DATA[offset : offset + length]


def test_reads_straddling_chunk_edges_and_the_short_last_chunk(open_cache: Open) -> None:
    source = open_cache()
    for edge in range(CHUNK, len(DATA), CHUNK):
        for length, offset in [(1, edge - 1), (1, edge), (2, edge - 1), (CHUNK + 2, edge - 1)]:
            length = min(length, len(DATA) - offset)
            assert source.pread(length, offset) == DATA[offset : offset + length]
    assert source.pread(1234, 10 * CHUNK) == DATA[10 * CHUNK :]
    assert source.pread(len(DATA), 0) == DATA


def test_zero_length_reads_touch_nothing(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner)
    assert source.pread(0, 0) == b"" and source.pread(0, len(DATA)) == b""
    assert inner.calls == []
    with pytest.raises(ValueError):
        source.pread(1, len(DATA))


# -- request counts ----------------------------------------------------------------------------

def test_second_read_is_served_from_disk(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner)
    assert source.pread(100, CHUNK + 10) == DATA[CHUNK + 10 : CHUNK + 110]
    assert source.pread(200, CHUNK + 500) == DATA[CHUNK + 500 : CHUNK + 700]
    assert inner.calls == [(CHUNK, CHUNK)]
    assert source.stats == ChunkCacheStats(hits=1, misses=1, inner_reads=1, bytes_fetched=CHUNK,
                                           bytes_served=300, readahead_chunks=0)


def test_adjacent_missing_chunks_are_one_inner_read(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner)
    source.pread(10, 2 * CHUNK)  # chunk 2 present; 0-1 and 3-5 missing
    inner.calls.clear()
    assert source.pread(6 * CHUNK, 0) == DATA[: 6 * CHUNK]
    assert sorted(inner.calls, key=lambda c: c[1]) == [(2 * CHUNK, 0), (3 * CHUNK, 3 * CHUNK)]


def test_long_runs_are_split_into_parallel_requests(tmp_path: Path) -> None:
    chunk = 1 << 20
    data = random.Random(1).randbytes(20 * chunk)
    inner = SlowSource(data, delay_s=0.2)
    with_cache = ChunkCacheSource(inner, key=KEY, cache_dir=tmp_path, chunk_size=chunk,
                                  readahead=0, fetch_workers=4)
    started = time.monotonic()
    assert with_cache.pread(len(data), 0) == data
    elapsed = time.monotonic() - started
    with_cache.close()
    per_request = MAX_REQUEST // chunk
    assert sorted(inner.calls) == sorted((min(MAX_REQUEST, len(data) - o), o)
                                         for o in range(0, len(data), per_request * chunk))
    assert elapsed < 2 * 0.2 + 0.15  # three 0.2 s requests overlapped, not 0.6 s in a row


def _wait_readahead(source: ChunkCacheSource, chunks: int) -> None:
    deadline = time.monotonic() + 5
    while source.stats.readahead_chunks < chunks and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(0.01)  # and nothing more arrives
    assert source.stats.readahead_chunks == chunks


def test_sequential_reads_prefetch_a_growing_window(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner, readahead=4)
    source.pread(CHUNK, 0)
    source.pread(CHUNK, CHUNK)  # second forward read: window of 1 chunk
    _wait_readahead(source, 1)
    # Readahead starts before the read's own fetch, so the order of the last two varies.
    assert sorted(inner.calls, key=lambda c: c[1]) == [(CHUNK, 0), (CHUNK, CHUNK),
                                                       (CHUNK, 2 * CHUNK)]
    expected = [
        (2 * CHUNK, [(2 * CHUNK, 3 * CHUNK)], 3),  # window 2: chunks 3-4
        (3 * CHUNK, [(3 * CHUNK, 5 * CHUNK)], 6),  # window 4: chunks 4-7, 4 already there
        # The window is full (readahead=4) from here: fetched in batches of at least half of
        # it, so a forward reader sends a few larger requests.
        (4 * CHUNK, [], 6),  # chunks 5-8: only 8 absent, not a batch yet
        (5 * CHUNK, [(2 * CHUNK, 8 * CHUNK)], 8),  # chunks 6-9: 8 and 9 in one request
        (6 * CHUNK, [], 8),  # chunks 7-10: only 10 absent
    ]
    for offset, calls, total in expected:
        inner.calls.clear()
        assert source.pread(CHUNK, offset) == DATA[offset : offset + CHUNK]
        _wait_readahead(source, total)
        assert inner.calls == calls
    assert source.pread(len(DATA) - 7 * CHUNK, 7 * CHUNK) == DATA[7 * CHUNK :]
    assert inner.calls == [(1234, 10 * CHUNK)]  # the rest was there; the last chunk is read


def test_a_full_window_fetches_at_once_when_the_next_chunk_is_absent(open_cache: Open) -> None:
    blob = bytes(range(256)) * (20 * CHUNK // 256)
    inner = CountingSource(blob)
    source = open_cache(inner, readahead=8)  # batches of at least 4 chunks
    for number, total in ((0, 0), (1, 1), (2, 3), (3, 6), (4, 11)):  # chunks 2-12 ahead
        source.pread(CHUNK, number * CHUNK)
        _wait_readahead(source, total)
    inner.calls.clear()
    source.pread(CHUNK, 5 * CHUNK)
    _wait_readahead(source, 11)  # chunks 6-13: only 13 absent, no request
    assert inner.calls == []
    source.invalidate(CHUNK, 7 * CHUNK)  # chunk 7, right after the next read, is gone
    assert source.pread(CHUNK, 6 * CHUNK) == blob[6 * CHUNK : 7 * CHUNK]
    _wait_readahead(source, 14)  # chunks 7, 13, 14: fewer than a batch, but 7 comes next
    assert sorted(inner.calls, key=lambda c: c[1]) == [(CHUNK, 7 * CHUNK), (2 * CHUNK, 13 * CHUNK)]


def test_random_reads_do_not_trigger_readahead(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner, readahead=4)
    for number in (5, 1, 8, 3):
        source.pread(10, number * CHUNK)
    time.sleep(0.05)
    assert len(inner.calls) == 4 and source.stats.readahead_chunks == 0


def test_exact_reads_fetch_only_what_they_ask_for(open_cache: Open) -> None:
    """A fetcher that knows its spans (a prefetch profile's) reads inside exact_reads():
    forward reads start no readahead there, in that thread only."""
    inner = CountingSource(DATA)
    source = open_cache(inner, readahead=4)
    with source.exact_reads():
        for number in range(4):
            assert source.pread(CHUNK, number * CHUNK) == DATA[number * CHUNK:(number + 1) * CHUNK]
        other = threading.Thread(target=lambda: [source.pread(CHUNK, n * CHUNK)
                                                 for n in (5, 6)])
        other.start()
        other.join()
    time.sleep(0.05)
    assert sorted(inner.calls, key=lambda c: c[1])[:4] == [(CHUNK, n * CHUNK) for n in range(4)]
    _wait_readahead(source, 1)  # the other thread's two forward reads: one chunk ahead
    inner.calls.clear()
    source.pread(CHUNK, 8 * CHUNK)
    source.pread(CHUNK, 9 * CHUNK)  # outside again: readahead as before
    _wait_readahead(source, 2)


def test_prefetch_fetches_in_the_background(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner)
    source.prefetch(3 * CHUNK, CHUNK)
    deadline = time.monotonic() + 5
    while source.stats.readahead_chunks < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert inner.calls == [(3 * CHUNK, CHUNK)]
    source.pread(3 * CHUNK, CHUNK)
    assert len(inner.calls) == 1



def _prefetch_and_wait(source: ChunkCacheSource, length: int, offset: int, chunks: int) -> None:
    source.prefetch(length, offset)
    deadline = time.monotonic() + 5
    while source.stats.readahead_chunks < chunks and time.monotonic() < deadline:
        time.sleep(0.005)
    assert source.stats.readahead_chunks == chunks


def test_chunks_fetched_ahead_are_handed_to_their_read_once(open_cache: Open,
                                                             tmp_path: Path) -> None:
    """The read a prefetch was for gets its chunks from memory, not read back from disk (the
    data file is zeroed behind the cache's back: still the right bytes, nothing fetched);
    a chunk whose end it does not reach stays for the next read; then they come from disk
    (the zeros fail their crc32 and are fetched again)."""
    inner = CountingSource(DATA)
    source = open_cache(inner)
    _prefetch_and_wait(source, 4 * CHUNK, CHUNK, 4)  # chunks 1..4
    data = blob_dir(tmp_path, KEY) / "data"
    _damage(data, CHUNK, bytes(4 * CHUNK))
    calls = len(inner.calls)
    assert source.pread(2 * CHUNK + 10, CHUNK) == DATA[CHUNK : 3 * CHUNK + 10]  # 1, 2, part of 3
    assert source.pread(CHUNK, 3 * CHUNK) == DATA[3 * CHUNK : 4 * CHUNK]  # 3 again: memory
    assert len(inner.calls) == calls
    assert source.pread(CHUNK, CHUNK) == DATA[CHUNK : 2 * CHUNK]  # taken: disk, zeros, refetch
    assert _chunks_fetched(inner.calls[calls:]) == Counter({1: 1})
    assert source.pread(CHUNK, 4 * CHUNK) == DATA[4 * CHUNK : 5 * CHUNK]  # 4: still in memory
    assert _chunks_fetched(inner.calls[calls:]) == Counter({1: 1})


def test_chunks_fetched_ahead_are_held_within_their_bound(open_cache: Open,
                                                          tmp_path: Path) -> None:
    """The bound counts what the chunks held keep alive: each fetch's buffer, in full, while
    any chunk of it is held. Beyond `handoff_bytes` the oldest are dropped (their read then
    finds them on disk); with 0 none are held."""
    inner = CountingSource(DATA)
    source = open_cache(inner, handoff_bytes=2 * CHUNK)

    def held() -> int:
        return next(s.value for s in source.metric_samples()
                    if s.name == "chunk_cache_handoff_bytes")

    _prefetch_and_wait(source, 2 * CHUNK, 0, 2)  # one fetch: chunks 0 and 1
    assert held() == 2 * CHUNK
    _prefetch_and_wait(source, 2 * CHUNK, 2 * CHUNK, 4)  # another: 2 and 3; 0 and 1 dropped
    assert held() == 2 * CHUNK
    _damage(blob_dir(tmp_path, KEY) / "data", 0, bytes(4 * CHUNK))
    calls = len(inner.calls)
    assert source.pread(CHUNK, 2 * CHUNK) == DATA[2 * CHUNK : 3 * CHUNK]
    assert held() == 2 * CHUNK  # chunk 3 keeps the whole fetch alive
    assert source.pread(CHUNK + 5, 3 * CHUNK) == DATA[3 * CHUNK : 4 * CHUNK + 5]
    assert held() == 0
    assert len(inner.calls) == calls + 1  # chunk 4: not prefetched
    assert source.pread(2 * CHUNK, 0) == DATA[: 2 * CHUNK]
    assert set(_chunks_fetched(inner.calls[calls + 1 :])) == {0, 1}  # dropped, zeros, refetched
    none = CountingSource(DATA)
    other = open_cache(none, key="sha256:" + "6f" * 32, handoff_bytes=0)
    _prefetch_and_wait(other, 2 * CHUNK, 0, 2)
    _damage(blob_dir(tmp_path, "sha256:" + "6f" * 32) / "data", 0, bytes(CHUNK))
    assert other.pread(2 * CHUNK, 0) == DATA[: 2 * CHUNK]
    assert set(_chunks_fetched(none.calls[1:])) == {0}


def test_an_idle_release_drops_chunks_fetched_ahead_and_keeps_unstored_ones(
        open_cache: Open) -> None:
    """release_memory (an idle mount) gives up the fetch buffers of chunks fetched ahead
    (a read then finds them on disk) but never chunks that could not be stored: they exist
    nowhere else."""
    inner = CountingSource(DATA)
    source = open_cache(inner, handoff_bytes=4 * CHUNK)

    def gauge(name: str) -> int:
        return int(next(s.value for s in source.metric_samples() if s.name == name))

    _prefetch_and_wait(source, 2 * CHUNK, 0, 2)
    assert gauge("chunk_cache_handoff_bytes") == 2 * CHUNK
    assert source.release_memory() == 2 * CHUNK
    assert gauge("chunk_cache_handoff_bytes") == 0 and source.release_memory() == 0
    calls = len(inner.calls)
    assert source.pread(2 * CHUNK, 0) == DATA[: 2 * CHUNK]
    assert len(inner.calls) == calls  # from disk
    source._remember(4, DATA[4 * CHUNK : 5 * CHUNK])  # as when the disk was full
    assert gauge("chunk_cache_memory_bytes") == CHUNK
    assert source.release_memory() == 0
    assert gauge("chunk_cache_memory_bytes") == CHUNK


def _prefetched(source: ChunkCacheSource, inner: CountingSource, count: int) -> Counter[int]:
    deadline = time.monotonic() + 5
    while source.stats.readahead_chunks < count and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # nothing more comes
    return _chunks_fetched(inner.calls)


def test_prefetch_stays_within_an_eighth_of_the_cache_limit(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    # 1/8 of the limit: 2 chunks past the chunk the last read ended in (readahead on, so
    # reads are tracked; these two are not forward reads, so it starts nothing itself).
    source = open_cache(inner, max_bytes=16 * CHUNK, readahead=4)
    source.pread(100, 0)  # the reader is in chunk 0
    source.prefetch(len(DATA) - CHUNK, CHUNK)
    assert set(_prefetched(source, inner, 2)) == {0, 1, 2}
    source.pread(100, 4 * CHUNK + 10)  # the reader moved on: the window with it
    source.prefetch(len(DATA) - 5 * CHUNK, 5 * CHUNK)
    assert set(_prefetched(source, inner, 4)) == {0, 1, 2, 4, 5, 6}


# -- persistence and crash safety --------------------------------------------------------------

def test_chunks_survive_reopening(open_cache: Open) -> None:
    open_cache().pread(len(DATA), 0)
    inner = CountingSource(DATA)
    assert open_cache(inner).pread(len(DATA), 0) == DATA
    assert inner.calls == []


def test_a_blob_keeps_the_chunk_size_it_was_cached_with(open_cache: Open) -> None:
    open_cache().pread(len(DATA), 0)
    inner = CountingSource(DATA)
    source = open_cache(inner, chunk_size=4 * CHUNK)
    assert source.chunk_size == CHUNK
    assert source.pread(len(DATA), 0) == DATA and inner.calls == []


def test_failed_fetch_leaves_no_chunk_behind(open_cache: Open) -> None:
    flaky = FlakySource(DATA, failures=1, transient=False)
    source = open_cache(flaky)
    with pytest.raises(SourceIOError):
        source.pread(10, CHUNK)
    assert source.pread(10, CHUNK) == DATA[CHUNK : CHUNK + 10]
    assert flaky.calls == [(CHUNK, CHUNK), (CHUNK, CHUNK)]


def test_failed_fetch_then_fresh_instance_refetches(open_cache: Open) -> None:
    with pytest.raises(SourceIOError):
        open_cache(FlakySource(DATA, failures=1)).pread(10, 3 * CHUNK)
    inner = CountingSource(DATA)
    assert open_cache(inner).pread(CHUNK, 3 * CHUNK) == DATA[3 * CHUNK : 4 * CHUNK]
    assert inner.calls == [(CHUNK, 3 * CHUNK)]


def _damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage", [
    "zero data", "flip data bit", "truncate data", "zero record", "garbage record",
    "truncate index", "bad header",
])
def test_damaged_files_are_refetched_never_zeros(open_cache: Open, tmp_path: Path,
                                                 damage: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    open_cache().pread(len(DATA), 0)
    directory = blob_dir(tmp_path, KEY)
    data, index = directory / "data", directory / "index"
    if damage == "zero data":
        _damage(data, 2 * CHUNK, bytes(CHUNK))  # like a hole from a write that never landed
    elif damage == "flip data bit":
        _damage(data, 2 * CHUNK + 77, bytes([DATA[2 * CHUNK + 77] ^ 1]))
    elif damage == "truncate data":
        os.truncate(data, 2 * CHUNK + 5)
    elif damage == "zero record":
        _damage(index, 64 + 2 * 8, bytes(8))
    elif damage == "garbage record":
        _damage(index, 64 + 2 * 8, b"\x12\x34\x56\x78\x9a\xbc\xde\xf1")
    elif damage == "truncate index":
        os.truncate(index, 64 + 2 * 8 + 3)
    else:
        _damage(index, 0, b"XXXX")
    inner = CountingSource(DATA)
    caplog.clear()
    source = open_cache(inner)
    assert source.pread(len(DATA), 0) == DATA
    refetched = set(_chunks_fetched(inner.calls))
    assert 2 in refetched and (0 not in refetched or damage == "bad header")
    # One line per event, naming what was found (a zeroed record is a chunk never stored).
    expected = {"zero data": "chunk 2 (65536 bytes) fails its crc32 check",
                "flip data bit": "chunk 2 (65536 bytes) fails its crc32 check",
                "garbage record": "index record of chunk 2 is damaged",
                "truncate index": None, "zero record": None,
                "truncate data": None}.get(damage, "index header damaged")
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if expected is not None:
        assert len(lines) == 1 and expected in lines[0], lines
    if damage == "truncate data":  # chunks 2..10 are damaged: each logged once
        assert sorted(line.split("chunk ")[1].split()[0] for line in lines) == sorted(
            str(n) for n in range(2, 11))
    inner.calls.clear()
    assert open_cache(inner).pread(len(DATA), 0) == DATA and inner.calls == []


def test_a_deleted_index_is_logged_and_its_data_dropped(open_cache: Open, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    open_cache().close()
    first = open_cache()
    first.pread(len(DATA), 0)
    first.close()
    directory = blob_dir(tmp_path, KEY)
    (directory / "index").unlink()
    inner = CountingSource(DATA)
    assert open_cache(inner).pread(len(DATA), 0) == DATA
    assert len(inner.calls) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "index missing" in lines[0]


_WRITER = """
import sys
from pathlib import Path
from hybrid_erofs.source import FileSource
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
src = ChunkCacheSource(FileSource(sys.argv[1]), key=sys.argv[2], cache_dir=Path(sys.argv[3]),
                       chunk_size=int(sys.argv[4]), readahead=0)
print("ready", flush=True)
for offset in range(0, src.size, 1 << 20):
    src.pread(min(1 << 20, src.size - offset), offset)
print("done", flush=True)
"""


def test_writer_killed_mid_write_never_leaves_zeros(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(48 << 20)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    rng = random.Random(3)
    partial = 0
    for attempt in range(8):
        cache_dir = tmp_path / f"cache{attempt}"
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(blob), KEY, str(cache_dir),
                                  str(CHUNK)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.wait()
        inner = CountingSource(data)
        source = ChunkCacheSource(inner, key=KEY, cache_dir=cache_dir, chunk_size=CHUNK,
                                  readahead=0)
        assert source.pread(len(data), 0) == data
        partial += 0 < inner.bytes_read < len(data)
        source.close()
    assert partial > 0  # at least one kill landed while the writer was part-way through


_FULL_DISK = """
import random, resource, signal, sys
from pathlib import Path
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 65536, resource.RLIM_INFINITY))
data = random.Random(1).randbytes(8 * 65536)
src = ChunkCacheSource(MemorySource(data), key=sys.argv[1], cache_dir=Path(sys.argv[2]),
                       chunk_size=65536, readahead=0)
assert src.pread(len(data), 0) == data and src.pread(len(data), 0) == data
print(src.stats.inner_reads, src.stats.unstored_chunks)
src.close()
"""


def test_chunks_that_cannot_be_stored_are_still_served(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the data file "full" after 3 chunks, like ENOSPC, without root.
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, KEY, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The one 8-chunk run could not be stored whole, so none of it is marked present; it was
    # served from memory the second time (not fetched again), and the blob, left without a
    # chunk, was removed on close: no empty entry.
    assert done.stdout == "1 8\n" and done.stderr.count("cannot store") == 1
    assert scan_blobs(tmp_path) == []


def _process_reader(args: tuple[str, str, int]) -> list[tuple[int, int]]:
    """Child process: read every chunk of the blob in a shuffled order; return inner calls."""
    blob, cache_dir, seed = args
    data = Path(blob).read_bytes()
    inner = SlowSource(data, delay_s=0.01)
    source = ChunkCacheSource(inner, key=KEY, cache_dir=Path(cache_dir), chunk_size=CHUNK,
                              readahead=2)
    numbers = list(range(-(-len(data) // CHUNK)))
    random.Random(seed).shuffle(numbers)
    for number in numbers:
        length = min(2 * CHUNK, len(data) - number * CHUNK)
        assert source.pread(length, number * CHUNK) == data[number * CHUNK :][:length]
    source.close()
    return inner.calls


def test_processes_share_chunks_and_fetch_each_once(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(40 * CHUNK + 99)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.map(_process_reader, [(str(blob), str(tmp_path / "c"), s) for s in range(4)])
    counts = _chunks_fetched([call for calls in results for call in calls])
    assert set(counts) == set(range(41))
    assert max(counts.values()) == 1, counts
    assert sum(1 for calls in results if calls) >= 2  # the fetching really was shared


def test_threads_fetch_each_chunk_once(open_cache: Open) -> None:
    inner = SlowSource(DATA, delay_s=0.005)
    source = open_cache(inner, readahead=3, fetch_workers=3)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                offset = rng.randrange(len(DATA))
                length = rng.randrange(min(3 * CHUNK, len(DATA) - offset) + 1)
                assert source.pread(length, offset) == DATA[offset : offset + length]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert max(_chunks_fetched(inner.calls).values()) == 1


# -- eviction ----------------------------------------------------------------------------------

def _age(directory: Path, age_s: float, chunks: range | None = None) -> None:
    """Make a blob's chunks (all, or `chunks`) look last used `age_s` ago."""
    stamp = time.time() - age_s
    count = -(-len(DATA) // CHUNK)
    with open(directory / "access", "r+b") as access:  # milliseconds, 8 bytes per chunk
        for number in chunks if chunks is not None else range(count):
            access.seek(8 * number)
            access.write(int(stamp * 1000).to_bytes(8, "little"))
    os.utime(directory / "index", (stamp, stamp))


def _fill(tmp_path: Path, digest: str, *, age_s: float, **kwargs: object) -> None:
    source = ChunkCacheSource(CountingSource(DATA), key=digest, cache_dir=tmp_path,
                              chunk_size=CHUNK, readahead=0, **kwargs)  # type: ignore[arg-type]
    source.pread(len(DATA), 0)
    source.close()
    _age(blob_dir(tmp_path, digest), age_s)


def test_size_limit_evicts_least_recently_used_chunks_across_blobs(tmp_path: Path) -> None:
    per_blob = len(DATA) + 12288  # data blocks plus the index's and access file's blocks
    limit = 3 * per_blob
    for k in range(6):
        _fill(tmp_path, f"sha256:{k:064x}", age_s=600 - 100 * k, max_bytes=limit)
    blobs = {blob.digest[-1]: blob for blob in scan_blobs(tmp_path)}
    assert sum(blob.disk_bytes for blob in blobs.values()) <= limit
    assert set(blobs) <= {"2", "3", "4", "5"}  # the oldest went whole (no empty entries)
    assert all(blobs[k].chunks_present == blobs[k].chunks for k in "45")  # the newest stayed
    assert all(blob.chunks_present > 0 for blob in blobs.values())


def test_eviction_takes_old_chunks_of_blobs_in_use_never_pinned_ones(tmp_path: Path,
                                                                     open_cache: Open) -> None:
    source = open_cache()
    assert source.pread(len(DATA), 0) == DATA
    _age(blob_dir(tmp_path, KEY), 1000)
    _age(blob_dir(tmp_path, KEY), 10, range(3, 5))  # read lately: evicted last
    store = source._store
    assert store is not None
    store.pin(0, 1)  # a read in flight needs chunk 0
    limit = 19 * CHUNK + 32768  # 3/4 of it: room for 3 of this blob's chunks beside the next
    _fill(tmp_path, f"sha256:{1:064x}", age_s=0, max_bytes=limit)
    mine = next(blob for blob in scan_blobs(tmp_path) if blob.digest == KEY)
    assert sum(blob.disk_bytes for blob in scan_blobs(tmp_path)) <= limit
    present = store.present()
    assert present[0] and present[3] and present[4]  # pinned, and recently used
    assert not all(present) and source.stats.evicted_chunks == 0  # another source evicted
    assert 0 < mine.chunks_present < mine.chunks
    store.unpin(0, 1)
    assert source.pread(len(DATA), 0) == DATA  # evicted chunks are simply fetched again


def test_an_evicted_chunk_is_no_damage(tmp_path: Path, open_cache: Open,
                                       caplog: pytest.LogCaptureFixture) -> None:
    from hybrid_erofs.sources.eviction import evict

    inner = CountingSource(DATA)
    source = open_cache(inner)
    source.pread(len(DATA), 0)
    other = open_cache(CountingSource(DATA))  # a second store of the blob, in this process
    assert other.pread(CHUNK, 0) == DATA[:CHUNK]  # it remembers chunk 0's crc32
    _age(blob_dir(tmp_path, KEY), 1000)
    source.close()  # now only `other` is registered for evictions
    evict(tmp_path, max_bytes=1, target_bytes=0)
    assert other.pread(CHUNK, 0) == DATA[:CHUNK]  # fetched again
    assert "crc32" not in caplog.text


def test_eviction_never_removes_a_blob_in_use(tmp_path: Path, open_cache: Open) -> None:
    _fill(tmp_path, f"sha256:{1:064x}", age_s=100)
    source = open_cache()
    source.pread(len(DATA), 0)
    os.utime(blob_dir(tmp_path, KEY) / "index", (1, 1))  # oldest of all, but open
    result = prune_cache(tmp_path, max_bytes=1)
    assert [blob.digest for blob in result.removed] == [f"sha256:{1:064x}"]
    assert [blob.digest for blob in result.kept_in_use] == [KEY]
    assert not remove_blob(blob_dir(tmp_path, KEY))
    assert source.pread(len(DATA), 0) == DATA
    source.close()
    assert prune_cache(tmp_path, remove_all=True).bytes_after == 0
    assert scan_blobs(tmp_path) == []


def test_reopening_after_removal_starts_afresh(tmp_path: Path, open_cache: Open) -> None:
    open_cache().close()
    assert remove_blob(blob_dir(tmp_path, KEY))
    inner = CountingSource(DATA)
    assert open_cache(inner).pread(10, 0) == DATA[:10] and len(inner.calls) == 1


# -- arguments, ownership, defaults ------------------------------------------------------------

def test_close_closes_inner_once_and_reads_after_close_fail(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner, readahead=2)
    source.pread(10, 0)
    source.close()
    source.close()
    assert inner.closed
    with pytest.raises(ValueError):
        source.pread(10, 0)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 1000}, {"chunk_size": 0},
                                    {"max_bytes": 0}, {"readahead": -1}, {"fetch_workers": 0},
                                    {"handoff_bytes": -1}])
def test_bad_arguments(open_cache: Open, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=f"'{next(iter(kwargs))}' must be"):
        open_cache(**kwargs)


@pytest.mark.parametrize("key", ["sha256", "sha256:../../etc", "SHA256:ab", ":ab", "sha256:a/b"])
def test_keys_must_be_digests(open_cache: Open, key: str) -> None:
    with pytest.raises(InvalidInput):
        open_cache(key=key)


def test_unusable_cache_dir_is_a_cache_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(CacheError, match="cannot open chunk cache"):
        ChunkCacheSource(MemorySource(DATA), key=KEY, cache_dir=not_a_dir)


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = (Path("/var/cache/hybrid-erofs") if os.geteuid() == 0
                else tmp_path / "hybrid-erofs")
    assert default_cache_dir() == expected


def test_file_inner_source(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(DATA)
    source = ChunkCacheSource(FileSource(blob), key=KEY, cache_dir=tmp_path / "c")
    assert source.pread(len(DATA), 0) == DATA
    source.close()


# -- invalidation ------------------------------------------------------------------------------
def test_invalidate_drops_chunks_for_this_and_later_instances(open_cache: Open) -> None:
    inner = CountingSource(DATA)
    source = open_cache(inner)
    source.pread(3 * CHUNK, 0)
    assert inner.calls == [(3 * CHUNK, 0)]
    source.invalidate(10, CHUNK + 5)  # one byte range inside chunk 1
    assert source.stats.invalidated_chunks == 1
    assert source.pread(3 * CHUNK, 0) == DATA[: 3 * CHUNK]
    assert inner.calls == [(3 * CHUNK, 0), (CHUNK, CHUNK)]  # only chunk 1 is fetched again
    source.invalidate(CHUNK + 2, CHUNK - 1)  # straddles: chunks 0, 1 and 2
    other = CountingSource(DATA)
    again = open_cache(other)  # the records on disk are cleared, not only this process's memory
    assert again.pread(3 * CHUNK, 0) == DATA[: 3 * CHUNK]
    assert other.calls == [(3 * CHUNK, 0)]
    source.invalidate(0, 0)  # empty: nothing happens
    with pytest.raises(ValueError):
        source.invalidate(2, len(DATA) - 1)


def test_default_limit_is_half_the_room_and_capped(tmp_path: Path, open_cache: Open) -> None:
    from hybrid_erofs.sources.cachedir import DEFAULT_LIMIT_CAP, default_cache_limit

    source = open_cache()
    source.pread(len(DATA), 0)
    held = sum(blob.disk_bytes for blob in scan_blobs(tmp_path))
    assert held >= len(DATA)

    def expected(cached: int) -> int:
        st = os.statvfs(tmp_path)
        return min(DEFAULT_LIMIT_CAP, (st.f_bavail * st.f_frsize + cached) // 2)

    slack = 64 << 20  # others write to this filesystem meanwhile
    assert abs(default_cache_limit(tmp_path) - expected(held)) < slack
    # A directory not made yet: measured on its nearest parent, holding nothing.
    assert abs(default_cache_limit(tmp_path / "new" / "cache") - expected(0)) < slack


def test_reserve_grants_room_beside_the_chunks_within_the_limit(open_cache: Open,
                                                                tmp_path: Path) -> None:
    limit = 64 * CHUNK
    source = open_cache(max_bytes=limit)
    assert source.room == 48 * CHUNK  # what eviction keeps: 3/4 of the limit
    source.pread(len(DATA), 0)  # 11 chunks stored (and their index, access files)
    decoded = blob_dir(tmp_path, KEY) / "layer"  # where LayerStore writes what it may

    def keep(chunks: int) -> bool:
        if not source.reserve(chunks * CHUNK):
            return False
        with open(decoded, "ab") as out:
            out.write(bytes(chunks * CHUNK))
        return True

    assert keep(20) and keep(10)
    assert not keep(10)  # past 3/4 of the limit
    assert keep(5)  # still within it
    assert open_cache(max_bytes=None).reserve(1 << 40)  # no limit, no question
