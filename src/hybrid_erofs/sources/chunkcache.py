"""ChunkCacheSource: a persistent on-disk cache of a blob's compressed bytes, shared by digest.

Sits above RetrySource (a retried miss is stored once) and below VerifiedSource/GzipSource.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import CacheError, SourceIOError
from ..metrics.samples import Sample, counter
from ..source import ByteSource, check_range
from .cachedir import default_cache_dir, prune_cache
from .chunkstore import ChunkStore, blob_dir

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Measured with tools/bench_chunkcache.py (1 GiB blob, 20 ms per request, 100 MB/s link):
# 256 KiB was fastest for random 4K-1M reads, 0.5-2M span reads and clustered file reads, and
# within 13 % of 4 MiB for sequential reads; it also over-fetches least and hits cheapest.
DEFAULT_CHUNK_SIZE = 256 << 10
DEFAULT_READAHEAD = 32  # chunks (8 MiB at the default size) ahead of a sequential reader
MAX_REQUEST = 8 << 20  # longest coalesced inner read; longer runs are split and run in parallel
_ATTEMPTS = 3  # rounds of "read from disk, fetch what is missing" before giving up
_TOUCH_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class ChunkCacheStats:
    """Counters of one ChunkCacheSource since it was opened."""

    hits: int  # chunks served from disk without waiting for a fetch
    misses: int  # chunks a read had to fetch (or wait for)
    inner_reads: int  # requests sent to the inner source
    bytes_fetched: int  # bytes read from the inner source, readahead included
    bytes_served: int  # bytes returned by pread
    readahead_chunks: int  # chunks fetched in the background before anyone asked
    invalidated_chunks: int = 0  # chunks dropped by invalidate() (bad bytes found above)


class ChunkCacheSource:
    """Serve `inner` (a registry blob) through an on-disk chunk cache keyed by its digest.

    Reads are split into `chunk_size`-aligned chunks. Present chunks are read from disk and
    checked against their crc32; missing ones are fetched with as few inner reads as possible
    (adjacent chunks coalesced into one read of up to 8 MiB, longer runs split across
    `fetch_workers` threads), stored (data fsync'ed before it is marked present, see
    ChunkStore) and served. Every process and mount of the same blob shares the chunks, and
    two processes never fetch the same chunk at the same time. Two forward reads in a row
    start a background fetch of the next chunks, a window that doubles with each further
    forward read up to `readahead` chunks (one batch in flight at a time).

    A chunk that cannot be stored (disk full, read-only) is still served and logged; a failed
    inner read leaves the chunk absent and raises the inner error. Nothing ever reads as
    zeros: a torn write or damaged file is detected by the crc32 and refetched.

    Args:
        inner: the blob; owned, closed by `close()`.
        key: the blob's digest, "sha256:<hex>"; chunks are shared by this key alone.
        cache_dir: default `default_cache_dir()` ($XDG_CACHE_HOME/hybrid-erofs,
            ~/.cache/hybrid-erofs, or /var/cache/hybrid-erofs for root).
        chunk_size: bytes per chunk, a multiple of 4096 (default 256 KiB); a blob already
            cached with another chunk size keeps its own.
        max_bytes: limit for the whole directory; least recently used blobs are removed
            when a fetch pushes it over (whole blobs, never one open in any process, so the
            limit can be exceeded by the blobs in use). None: no limit.
        readahead: most chunks to prefetch for sequential readers (default 32; 0 disables).
        fetch_workers: threads for parallel fetches and readahead (default 4).

    Thread-safe; `close()` must not race with reads. Raises CacheError if the cache
    directory cannot be opened.
    """

    def __init__(self, inner: ByteSource, *, key: str, cache_dir: Path | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_bytes: int | None = None,
                 readahead: int = DEFAULT_READAHEAD, fetch_workers: int = 4) -> None:
        if chunk_size < 4096 or chunk_size % 4096:
            raise ValueError(f"'chunk_size' must be a positive multiple of 4096 (got {chunk_size})")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"'max_bytes' must be >= 1 (got {max_bytes})")
        if readahead < 0:
            raise ValueError(f"'readahead' must be >= 0 (got {readahead})")
        if fetch_workers < 1:
            raise ValueError(f"'fetch_workers' must be >= 1 (got {fetch_workers})")
        self.key = key
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        directory = blob_dir(self.cache_dir, key)
        try:
            self._store = ChunkStore(directory, size=inner.size, chunk_size=chunk_size)
        except OSError as exc:
            raise CacheError(f"{directory}: cannot open chunk cache: {exc.strerror or exc}") from exc
        self._inner = inner
        self._max_bytes = max_bytes
        self._readahead = readahead
        self._workers = fetch_workers
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}  # chunks a thread of ours is fetching
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._counts = [0] * 7  # ChunkCacheStats fields, in order
        self._last_read: tuple[int, int] | None = None  # (offset, last chunk) of the previous read
        self._streak = 0
        self._readahead_busy = False
        self._evict_lock = threading.Lock()
        self._unchecked = 0  # bytes stored since the directory size was last checked
        self._touched_s = time.monotonic()
        self._store.touch()
        if max_bytes is not None:
            self._evict()

    @property
    def size(self) -> int:
        return self._store.size

    @property
    def chunk_size(self) -> int:
        """Chunk size in use (the stored one when the blob was cached before)."""
        return self._store.chunk_size

    @property
    def stats(self) -> ChunkCacheStats:
        with self._lock:
            return ChunkCacheStats(*self._counts)

    def metric_samples(self) -> list[Sample]:
        stats = self.stats
        return [counter("chunk_cache_hits", stats.hits, "Chunks read from the chunk cache"),
                counter("chunk_cache_misses", stats.misses,
                        "Chunks a read had to fetch (or wait for)"),
                counter("chunk_cache_readahead_chunks", stats.readahead_chunks,
                        "Chunks fetched ahead of sequential readers"),
                counter("chunk_cache_invalidated_chunks", stats.invalidated_chunks,
                        "Cached chunks dropped because their span failed verification")]

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if length == 0:
            return b""
        if self._closed:
            raise ValueError(f"{self.key}: read from a closed ChunkCacheSource")
        chunk_size = self._store.chunk_size
        first, last = offset // chunk_size, (offset + length - 1) // chunk_size
        self._note_read(offset, last)
        chunks = self._chunks(first, last)
        start = offset - first * chunk_size
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if (now := time.monotonic()) - self._touched_s > _TOUCH_EVERY_S:
            self._touched_s = now
            self._store.touch()
        self._count(bytes_served=length)
        return data[start : start + length]

    def prefetch(self, length: int, offset: int) -> None:
        """Start fetching the chunks of this range in the background; returns at once."""
        check_range(self, length, offset)
        if length and not self._closed:
            chunk_size = self._store.chunk_size
            first, last = offset // chunk_size, (offset + length - 1) // chunk_size
            self._submit(self._background, first, last + 1, False)

    def invalidate(self, length: int, offset: int) -> None:
        """Drop the cached chunks of this range (a layer above found their bytes wrong), so
        the next read fetches them again instead of serving the same bad bytes forever."""
        check_range(self, length, offset)
        if length and not self._closed:
            chunk_size = self._store.chunk_size
            first, last = offset // chunk_size, (offset + length - 1) // chunk_size
            log.warning("%s: dropping cached chunks %d..%d (bytes %d-%d failed verification)",
                        self.key, first, last, offset, offset + length - 1)
            self._store.discard(first, last - first + 1)
            self._count(invalidated_chunks=last - first + 1)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._store.close()
        self._inner.close()

    # -- reading -------------------------------------------------------------------------

    def _chunks(self, first: int, last: int) -> list[bytes]:
        """Chunks first..last, from disk or fetched; raises if a fetch keeps failing."""
        pieces: dict[int, bytes] = {}
        wanted = range(first, last + 1)
        for attempt in range(_ATTEMPTS):
            missing = []
            for number in wanted:
                if number not in pieces:
                    data = self._store.read(number)
                    if data is None:
                        missing.append(number)
                    else:
                        pieces[number] = data
            if attempt == 0:
                self._count(hits=len(wanted) - len(missing), misses=len(missing))
            if not missing:
                return [pieces[number] for number in wanted]
            pieces.update(self._fetch(missing))
        missing = [number for number in wanted if number not in pieces]
        if not missing:
            return [pieces[number] for number in wanted]
        raise SourceIOError(f"{self.key}: chunk {missing[0]} still missing after {_ATTEMPTS} "
                            f"fetch attempts", transient=True)

    def _fetch(self, numbers: list[int], *, background: bool = False) -> dict[int, bytes]:
        """Fetch the chunks no thread of ours is fetching; wait for the others (unless background)."""
        with self._lock:
            mine = [n for n in numbers if n not in self._inflight]
            theirs = [self._inflight[n] for n in numbers if n in self._inflight]
            for number in mine:
                self._inflight[number] = threading.Event()
        try:
            runs = _runs(mine, max(1, MAX_REQUEST // self._store.chunk_size))
            if background or len(runs) <= 1:
                got: dict[int, bytes] = {}
                for run in runs:
                    got.update(self._fetch_run(*run))
            else:
                got = self._fetch_parallel(runs)
        finally:
            with self._lock:
                for number in mine:
                    self._inflight.pop(number).set()
        if not background:
            for event in theirs:
                event.wait()  # the caller then finds the chunk on disk, or fetches it itself
        return got

    def _fetch_parallel(self, runs: list[tuple[int, int]]) -> dict[int, bytes]:
        """First run in this thread, the rest on the pool; raise the first error after all end."""
        futures = [self._submit(self._fetch_run, *run) for run in runs[1:]]
        got: dict[int, bytes] = {}
        error: BaseException | None = None
        try:
            got.update(self._fetch_run(*runs[0]))
        except BaseException as exc:
            error = exc
        for future in futures:
            try:
                got.update(future.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return got

    def _fetch_run(self, first: int, count: int) -> dict[int, bytes]:
        """Fetch chunks first..first+count-1 under the cross-process lock; store and return them."""
        store = self._store
        got: dict[int, bytes] = {}
        with store.locked(first, count):
            todo = []
            for number in range(first, first + count):
                data = store.read(number, fresh=True)  # another process may have stored it
                if data is None:
                    todo.append(number)
                else:
                    got[number] = data
            for start, run in _runs(todo, count):
                offset = start * store.chunk_size
                length = sum(store.chunk_length(n) for n in range(start, start + run))
                data = self._inner.pread(length, offset)
                self._count(inner_reads=1, bytes_fetched=length)
                try:
                    store.write(start, data)
                except OSError as exc:
                    log.warning("%s: cannot store %d bytes at offset %d (serving them "
                                "uncached): %s", store.directory, length, offset, exc)
                else:
                    self._unchecked += length
                for k in range(run):
                    got[start + k] = data[k * store.chunk_size : (k + 1) * store.chunk_size]
        if self._max_bytes is not None and self._unchecked >= max(store.chunk_size,
                                                                  self._max_bytes // 16):
            self._evict()
        return got

    # -- background work -----------------------------------------------------------------

    def _note_read(self, offset: int, last: int) -> None:
        """Track forward reads; after two in a row, start readahead past `last`."""
        if not self._readahead:
            return
        chunk_size = self._store.chunk_size
        with self._lock:
            # Forward and starting in (or right after) the chunk the last read ended in:
            # GzipSource's span reads overlap by a byte, so exact adjacency is too strict.
            forward = self._last_read is not None and offset > self._last_read[0] and (
                self._last_read[1] <= offset // chunk_size <= self._last_read[1] + 1)
            self._streak = self._streak + 1 if forward else 0
            self._last_read = (offset, last)
            # The window doubles with each forward read up to `readahead` chunks (as the
            # kernel's readahead ramps up): a short run of reads through one small file should
            # not pull 8 chunks it will never use.
            start = last + 1
            window = min(self._readahead, 1 << min(max(self._streak - 1, 0), 30))
            stop = min(start + window, self._store.chunk_count)
            if self._streak < 1 or self._readahead_busy or start >= stop or self._closed:
                return
            self._readahead_busy = True
        self._submit(self._background, start, stop, True)

    def _background(self, start: int, stop: int, is_readahead: bool) -> None:
        """Fetch the absent chunks of start..stop-1; errors only logged (a read will retry)."""
        try:
            missing = [n for n in range(start, stop) if not self._store.has(n)]
            got = self._fetch(missing, background=True)
            self._count(readahead_chunks=len(got))
        except Exception as exc:
            log.debug("%s: background fetch of chunks %d..%d failed: %s",
                      self.key, start, stop - 1, exc)
        finally:
            if is_readahead:
                with self._lock:
                    self._readahead_busy = False

    def _submit(self, fn: Callable[..., _T], *args: object) -> Future[_T]:
        """Run fn(*args) on the lazily started worker pool."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers,
                                                thread_name_prefix="chunkcache-fetch")
            return self._pool.submit(fn, *args)

    def _evict(self) -> None:
        """Prune the directory to max_bytes; one thread at a time, others skip."""
        if self._max_bytes is None or not self._evict_lock.acquire(blocking=False):
            return
        try:
            self._unchecked = 0
            result = prune_cache(self.cache_dir, max_bytes=self._max_bytes)
            if result.bytes_after > self._max_bytes:
                log.info("%s: %d bytes cached, over the %d limit: the rest is in use",
                         self.cache_dir, result.bytes_after, self._max_bytes)
        except OSError as exc:
            log.warning("%s: pruning failed: %s", self.cache_dir, exc)
        finally:
            self._evict_lock.release()

    def _count(self, hits: int = 0, misses: int = 0, inner_reads: int = 0,
               bytes_fetched: int = 0, bytes_served: int = 0, readahead_chunks: int = 0,
               invalidated_chunks: int = 0) -> None:
        with self._lock:
            for k, value in enumerate((hits, misses, inner_reads, bytes_fetched, bytes_served,
                                       readahead_chunks, invalidated_chunks)):
                self._counts[k] += value


def _runs(numbers: list[int], limit: int) -> list[tuple[int, int]]:
    """Sorted chunk numbers -> (first, count) runs of adjacent chunks, at most `limit` long."""
    runs: list[tuple[int, int]] = []
    for number in sorted(numbers):
        if runs and runs[-1][0] + runs[-1][1] == number and runs[-1][1] < limit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((number, 1))
    return runs
