"""ChunkCacheSource: a persistent on-disk cache of a blob's compressed bytes, shared by digest,
bounded in size (eviction.py), serving from memory what a full disk cannot hold.

Sits above FailureMemorySource/RetrySource (a retried miss is stored once) and below
VerifiedSource/GzipSource.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import CacheError, SourceIOError
from ..metrics.samples import Sample, counter, gauge
from ..source import ByteSource, check_range
from .cachedir import default_cache_dir, scan_blobs
from .chunkstore import ChunkStore, blob_dir
from .eviction import CHECK_EVERY, LOW, evict, forget_store, register_store, remove_if_empty

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
DEFAULT_MEMORY_BYTES = 16 << 20  # chunks that could not be stored, kept for reads to come
# Chunks fetched ahead of a reader, handed to the read that asks for them (once) from memory
# instead of read back from disk and checked again: the window a forward reader fetches
# ahead (GzipSource's fetch-ahead, about 11 spans) fits.
DEFAULT_HANDOFF_BYTES = 32 << 20
_PAUSE_S = 30.0  # after a write failed even after evicting: how long to serve from memory only
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    unstored_chunks: int = 0  # chunks fetched that could not be stored (kept in memory)
    evicted_chunks: int = 0  # chunks (of any blob) this source's evictions dropped


class ChunkCacheSource:
    """Serve `inner` (a registry blob) through an on-disk chunk cache keyed by its digest.

    Reads are split into `chunk_size`-aligned chunks. Present chunks are read from disk and
    checked against their crc32; missing ones are fetched with as few inner reads as possible
    (adjacent chunks coalesced into one read of up to 8 MiB, longer runs split across
    `fetch_workers` threads), stored (data written before it is marked present, see
    ChunkStore) and served. Every process and mount of the same blob shares the chunks, and
    two processes never fetch the same chunk at the same time. Two forward reads in a row
    start a background fetch of the next chunks, a window that doubles with each further
    forward read up to `readahead` chunks (one batch in flight at a time). Chunks fetched in
    the background are also kept in memory (up to `handoff_bytes`, oldest dropped first) until
    a read takes them, once: the reader they were fetched for gets the bytes as fetched, not
    read back from disk (the crc32 guards bytes that were on disk).

    Size: whenever `max_bytes / 32` new bytes were stored and the directory holds more than
    13/16 of `max_bytes`, the least recently used chunks of any blob (in use or not) are
    evicted down to 3/4 of it (eviction.py), so it stays under `max_bytes` even with a few
    processes storing at once; chunks a read of this process is using are never evicted.

    A full disk (ENOSPC, EDQUOT) never fails a read or the open: the cache evicts and tries
    once more, then serves without storing for 30 s (one warning), keeping the chunks it
    could not store in memory (up to `memory_bytes`, least recently used dropped) so that
    they are not fetched again for every read; when the store cannot even be opened, the blob
    is served from memory alone and its empty directory is removed. A failed inner read
    leaves the chunk absent and raises the inner error. Nothing ever reads as zeros: a torn
    write or damaged file is detected by the crc32 and refetched.

    Args:
        inner: the blob; owned, closed by `close()`.
        key: the blob's digest, "sha256:<hex>"; chunks are shared by this key alone.
        cache_dir: default `default_cache_dir()` ($XDG_CACHE_HOME/hybrid-erofs,
            ~/.cache/hybrid-erofs, or /var/cache/hybrid-erofs for root).
        chunk_size: bytes per chunk, a multiple of 4096 (default 256 KiB); a blob already
            cached with another chunk size keeps its own.
        max_bytes: limit for the whole directory. None: no limit.
        memory_bytes: bound of the chunks kept in memory when they cannot be stored
            (default 16 MiB).
        readahead: most chunks to prefetch for sequential readers (default 32; 0 disables;
            at most half of `memory_bytes` while chunks cannot be stored).
        fetch_workers: threads for parallel fetches and readahead (default 4).
        handoff_bytes: bound of the chunks fetched in the background and kept in memory for
            the read they were fetched for (default 32 MiB; 0: read them back from disk).

    Thread-safe; `close()` must not race with reads. Raises CacheError if the cache
    directory cannot be opened for another reason than a full disk (permissions, a file
    in the way).
    """

    def __init__(self, inner: ByteSource, *, key: str, cache_dir: Path | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_bytes: int | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, readahead: int = DEFAULT_READAHEAD,
                 fetch_workers: int = 4, handoff_bytes: int = DEFAULT_HANDOFF_BYTES) -> None:
        if chunk_size < 4096 or chunk_size % 4096:
            raise ValueError(f"'chunk_size' must be a positive multiple of 4096 (got {chunk_size})")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"'max_bytes' must be >= 1 (got {max_bytes})")
        if memory_bytes < 0:
            raise ValueError(f"'memory_bytes' must be >= 0 (got {memory_bytes})")
        if readahead < 0:
            raise ValueError(f"'readahead' must be >= 0 (got {readahead})")
        if fetch_workers < 1:
            raise ValueError(f"'fetch_workers' must be >= 1 (got {fetch_workers})")
        if handoff_bytes < 0:
            raise ValueError(f"'handoff_bytes' must be >= 0 (got {handoff_bytes})")
        self.key = key
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        self._inner = inner
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._counts = [0] * 9  # ChunkCacheStats fields, in order
        self._evict_lock = threading.Lock()
        self._unchecked = 0  # bytes stored since the directory size was last checked
        self._estimate: int | None = None  # the directory's size at the last check, plus since
        self._refused_until = 0.0  # reserve() found no room: answer no at once until then
        self._directory = blob_dir(self.cache_dir, key)
        self._store = self._open_store(chunk_size)
        self._size = inner.size
        self._chunk_size = self._store.chunk_size if self._store else chunk_size
        self._chunk_count = -(-self._size // self._chunk_size)
        self._memory: OrderedDict[int, bytes] = OrderedDict()  # chunks not stored
        self._memory_held = 0
        self._memory_bytes = memory_bytes
        # Chunks fetched in the background, not read yet: a read takes each once.
        self._handoff: OrderedDict[int, bytes | memoryview] = OrderedDict()
        # What the handed-off chunks keep alive: a chunk is a view of its whole fetch, so the
        # bound counts each fetch buffer once, in full, while any chunk of it is held.
        self._handoff_buffers: dict[int, tuple[object, int]] = {}  # id -> (buffer, chunks)
        self._handoff_held = 0
        self._handoff_bytes = handoff_bytes
        self._paused_until = 0.0  # monotonic time until which nothing is written
        self._readahead = readahead
        self._workers = fetch_workers
        self._inflight: dict[int, threading.Event] = {}  # chunks a thread of ours is fetching
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._last_read: tuple[int, int] | None = None  # (offset, last chunk) of the previous read
        self._streak = 0
        self._exact = threading.local()  # .on: this thread's reads start no readahead
        self._readahead_busy = False
        self._touched_s = time.monotonic()
        if self._store is not None:
            register_store(self._store)
            self._store.touch()
            if max_bytes is not None:
                self._evict()

    def _open_store(self, chunk_size: int) -> ChunkStore | None:
        """The blob's store; None (with one warning) when the disk is too full to open it
        even after evicting."""
        for attempt in range(2):
            try:
                return ChunkStore(self._directory, size=self._inner.size, chunk_size=chunk_size)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise CacheError(f"{self._directory}: cannot open chunk cache: "
                                     f"{exc.strerror or exc}") from exc
                if attempt == 0 and self._max_bytes is not None:
                    self._evict(free=4 * chunk_size)
                    continue
                with contextlib.suppress(OSError):
                    remove_if_empty(self._directory)
                log.warning("%s: cannot open chunk cache (%s): serving this blob without "
                            "caching it", self._directory, exc.strerror or exc)
        return None

    @property
    def size(self) -> int:
        return self._size

    @property
    def chunk_size(self) -> int:
        """Chunk size in use (the stored one when the blob was cached before)."""
        return self._chunk_size

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def directory(self) -> Path | None:
        """The blob's directory in the cache; None when it could not be opened (disk full)."""
        return None if self._store is None else self._directory

    @property
    def stats(self) -> ChunkCacheStats:
        with self._lock:
            return ChunkCacheStats(*self._counts)

    def metric_samples(self) -> list[Sample]:
        stats = self.stats
        with self._lock:
            held, handed = self._memory_held, self._handoff_held
        store = self._store
        on_disk = 0
        if store is not None and not self._closed:
            with contextlib.suppress(OSError):
                on_disk = store.disk_bytes()
        return [counter("chunk_cache_hits", stats.hits, "Chunks read from the chunk cache"),
                counter("chunk_cache_misses", stats.misses,
                        "Chunks a read had to fetch (or wait for)"),
                counter("chunk_cache_readahead_chunks", stats.readahead_chunks,
                        "Chunks fetched ahead of sequential readers"),
                counter("chunk_cache_invalidated_chunks", stats.invalidated_chunks,
                        "Cached chunks dropped because their span failed verification"),
                counter("chunk_cache_unstored_chunks", stats.unstored_chunks,
                        "Chunks fetched that could not be stored (disk full)"),
                counter("chunk_cache_evicted_chunks", stats.evicted_chunks,
                        "Chunks (of any blob) evicted to keep the cache under its limit"),
                gauge("chunk_cache_blob_bytes", on_disk, "Bytes this blob takes in the cache"),
                gauge("chunk_cache_memory_bytes", held,
                      "Bytes of chunks kept in memory because they could not be stored"),
                gauge("chunk_cache_handoff_bytes", handed,
                      "Bytes of chunks fetched ahead of a reader, kept in memory for its read")]

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if length == 0:
            return b""
        if self._closed:
            raise ValueError(f"{self.key}: read from a closed ChunkCacheSource")
        chunk_size = self._chunk_size
        first, last = offset // chunk_size, (offset + length - 1) // chunk_size
        self._note_read(offset, last)
        # A chunk whose end this read does not reach is read again by the next forward read (a
        # neighbouring span's): one fetched ahead stays in memory for it.
        stop = offset + length
        shared = {last} if stop % chunk_size and stop < self._size else set()
        chunks = self._chunks(first, last, shared)
        start = offset - first * chunk_size
        if self._store is not None and (now := time.monotonic()) - self._touched_s > _TOUCH_EVERY_S:
            self._touched_s = now
            self._store.touch()
        self._count(bytes_served=length)
        if len(chunks) == 1:
            chunk = chunks[0]
            if start == 0 and len(chunk) == length and isinstance(chunk, bytes):
                return chunk
            with memoryview(chunk) as view:
                return bytes(view[start : start + length])
        # One copy: the chunks' parts in the range, joined.
        views = [memoryview(chunk) for chunk in chunks]
        end = start + length - (len(chunks) - 1) * chunk_size
        views[0], views[-1] = views[0][start:], views[-1][:end]
        return b"".join(views)

    def holds(self, length: int, offset: int) -> bool:
        """True when every chunk of this range is here (stored, possibly by another process,
        or in memory): a read of it fetches nothing. Cheap enough to poll."""
        check_range(self, length, offset)
        if length == 0:
            return True
        chunk_size = self._chunk_size
        for number in range(offset // chunk_size, (offset + length - 1) // chunk_size + 1):
            if self._store is not None and self._store.has(number):
                continue
            if self._cached_in_memory(number) is None:
                return False
        return True

    @contextlib.contextmanager
    def exact_reads(self) -> Iterator[None]:
        """Reads of this thread meanwhile fetch what they ask for and start no readahead
        (nor count as a reader's forward reads): a fetcher that knows its spans, e.g. a
        prefetch profile's, fetches nothing past them on a slow link."""
        before = getattr(self._exact, "on", False)
        self._exact.on = True
        try:
            yield
        finally:
            self._exact.on = before

    def prefetch(self, length: int, offset: int) -> None:
        """Start fetching the chunks of this range in the background; returns at once.

        Only as far past the last read as readahead may go (`_ahead_limit`): chunks fetched
        further ahead would be evicted (or dropped from memory, when they cannot be stored)
        before anyone reads them, and fetched twice."""
        check_range(self, length, offset)
        if length and not self._closed:
            first, last = offset // self._chunk_size, (offset + length - 1) // self._chunk_size
            with self._lock:
                anchor = self._last_read[1] if self._last_read is not None else first
            last = min(last, anchor + self._ahead_limit(self._readahead or DEFAULT_READAHEAD))
            if first <= last:
                self._submit(self._background, first, last + 1, False)

    def _ahead_limit(self, readahead: int) -> int:
        """Chunks a fetch ahead of the reader may take: `readahead`, at most half of the
        memory bound while chunks cannot be stored, at most 1/8 of the cache limit."""
        if self._store is None or self._paused_until:  # memory only: keep the window in it
            readahead = min(readahead, self._memory_bytes // self._chunk_size // 2)
        if self._max_bytes is not None:  # never so far ahead that eviction takes it first
            readahead = min(readahead, self._max_bytes // self._chunk_size // 8)
        return readahead

    @property
    def room(self) -> int | None:
        """What the cache directory may hold once eviction is done (3/4 of `max_bytes`):
        what a layer kept whole, chunks and decoded data, must fit in. None: no limit."""
        return None if self._max_bytes is None else int(self._max_bytes * LOW)

    def reserve(self, nbytes: int) -> bool:
        """Whether `nbytes` more may be written beside the chunks (decoded spans,
        LayerStore): only while the directory stays within `room`, so that it never starts
        an eviction of chunks that decoding needs. Counted as written when True. Nothing is
        evicted for it; after a refusal the size is looked at again (a directory scan) at
        most every 5 s."""
        room = self.room
        if room is None:
            return True
        now = time.monotonic()
        with self._lock:
            estimate = self._estimate
            if estimate is not None and estimate + nbytes <= room:
                self._estimate = estimate + nbytes
                self._unchecked += nbytes
                return True
            if estimate is not None and now < self._refused_until:
                return False
            self._refused_until = now + 5.0
        held = sum(blob.disk_bytes for blob in scan_blobs(self.cache_dir, count=False))
        with self._lock:
            granted = held + nbytes <= room
            self._estimate = held + (nbytes if granted else 0)
            return granted

    def invalidate(self, length: int, offset: int) -> None:
        """Drop the cached chunks of this range (a layer above found their bytes wrong), so
        the next read fetches them again instead of serving the same bad bytes forever."""
        check_range(self, length, offset)
        if length and not self._closed:
            first, last = offset // self._chunk_size, (offset + length - 1) // self._chunk_size
            log.warning("%s: dropping cached chunks %d..%d (bytes %d-%d failed verification)",
                        self.key, first, last, offset, offset + length - 1)
            with self._lock:
                for number in range(first, last + 1):
                    data = self._memory.pop(number, None)
                    self._memory_held -= len(data or b"")
                    self._take_handoff(number)
            if self._store is not None:
                self._store.discard(first, last - first + 1)
            self._count(invalidated_chunks=last - first + 1)

    def release_memory(self) -> int:
        """Drop the chunks fetched ahead and not read yet (Releasing): a read finds them on
        disk (or among the chunks that could not be stored, which stay: they are nowhere else).
        Returns the bytes of fetch buffers given up."""
        with self._lock:
            before = self._handoff_held
            for number in list(self._handoff):
                self._take_handoff(number)
            return before - self._handoff_held

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool = self._pool
            self._memory.clear()
            self._memory_held = 0
            self._handoff.clear()
            self._handoff_buffers.clear()
            self._handoff_held = 0
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self._store is not None:
            forget_store(self._store)
            empty = not any(self._store.present())
            self._store.close()
            if empty:  # nothing was stored: no empty entry left behind
                with contextlib.suppress(OSError):
                    remove_if_empty(self._directory)
        self._inner.close()

    # -- reading -------------------------------------------------------------------------

    def _chunks(self, first: int, last: int, shared: Collection[int] = ()
                ) -> list[bytes | memoryview]:
        """Chunks first..last, from disk or memory or fetched; raises if a fetch keeps failing.
        Pinned meanwhile: eviction in this process leaves them alone. Chunks fetched ahead
        are taken from memory, those in `shared` left there for the next read."""
        store = self._store
        if store is not None:
            store.pin(first, last - first + 1)
        try:
            pieces: dict[int, bytes | memoryview] = {}
            wanted = range(first, last + 1)
            for attempt in range(_ATTEMPTS):
                missing = []
                for number in wanted:
                    if number not in pieces:
                        data = self._cached(number, take=number not in shared)
                        if data is None:
                            missing.append(number)
                        else:
                            pieces[number] = data
                if attempt == 0:
                    self._count(hits=len(wanted) - len(missing), misses=len(missing))
                if not missing:
                    break
                pieces.update(self._fetch(missing))
            else:
                missing = [number for number in wanted if number not in pieces]
                if missing:
                    raise SourceIOError(f"{self.key}: chunk {missing[0]} still missing after "
                                        f"{_ATTEMPTS} fetch attempts", transient=True)
            if store is not None:
                store.stamp(first, last - first + 1, time.time_ns() // 1_000_000)
            return [pieces[number] for number in wanted]
        finally:
            if store is not None:
                store.unpin(first, last - first + 1)

    def _cached(self, number: int, *, take: bool = True) -> bytes | memoryview | None:
        """A chunk from memory (fetched ahead: taken unless not `take`; or not stored) or
        disk, or None."""
        if self._memory or self._handoff:
            with self._lock:
                data = self._take_handoff(number) if take else self._handoff.get(number)
                if data is not None:
                    return data
                data = self._memory.get(number)
                if data is not None:
                    self._memory.move_to_end(number)
                    return data
        return None if self._store is None else self._store.read(number)

    def _take_handoff(self, number: int) -> bytes | memoryview | None:
        """Chunk `number` if it was fetched ahead and not read yet; a read takes it once.
        Caller holds self._lock."""
        data = self._handoff.pop(number, None)
        if data is not None:
            self._release(data)
        return data

    def _release(self, data: bytes | memoryview) -> None:
        """A handed-off chunk is gone: its fetch buffer no longer counts once none is left.
        Caller holds self._lock."""
        buffer = data.obj if isinstance(data, memoryview) else data
        held, count = self._handoff_buffers[id(buffer)]
        if count > 1:
            self._handoff_buffers[id(buffer)] = (held, count - 1)
        else:
            del self._handoff_buffers[id(buffer)]
            self._handoff_held -= len(buffer)  # type: ignore[arg-type]

    def _hand_off(self, got: dict[int, bytes | memoryview]) -> None:
        """Keep chunks just fetched in the background for the read they were fetched for,
        oldest dropped while the fetch buffers they keep alive exceed `handoff_bytes` (then
        that read finds them on disk)."""
        if not self._handoff_bytes:
            return
        with self._lock:
            if self._closed:
                return
            for number in sorted(got):
                data = got[number]
                self._take_handoff(number)
                buffer = data.obj if isinstance(data, memoryview) else data
                held, count = self._handoff_buffers.get(id(buffer), (buffer, 0))
                if not count:
                    self._handoff_held += len(buffer)  # type: ignore[arg-type]
                self._handoff_buffers[id(buffer)] = (held, count + 1)
                self._handoff[number] = data
            while self._handoff_held > self._handoff_bytes and self._handoff:
                self._release(self._handoff.popitem(last=False)[1])

    def _fetch(self, numbers: list[int], *, background: bool = False) -> dict[int, bytes | memoryview]:
        """Fetch the chunks no thread of ours is fetching; wait for the others (unless background)."""
        with self._lock:
            mine = [n for n in numbers if n not in self._inflight]
            theirs = [self._inflight[n] for n in numbers if n in self._inflight]
            for number in mine:
                self._inflight[number] = threading.Event()
        try:
            runs = _runs(mine, max(1, MAX_REQUEST // self._chunk_size))
            if background or len(runs) <= 1:
                got: dict[int, bytes | memoryview] = {}
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

    def _fetch_parallel(self, runs: list[tuple[int, int]]) -> dict[int, bytes | memoryview]:
        """First run in this thread, the rest on the pool; raise the first error after all end."""
        futures = [self._submit(self._fetch_run, *run) for run in runs[1:]]
        got: dict[int, bytes | memoryview] = {}
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

    def _fetch_run(self, first: int, count: int) -> dict[int, bytes | memoryview]:
        """Fetch chunks first..first+count-1 under the cross-process lock; keep and return them."""
        store = self._store
        got: dict[int, bytes | memoryview] = {}
        with store.locked(first, count) if store is not None else contextlib.nullcontext():
            todo = []
            for number in range(first, first + count):
                # Another thread may have kept it in memory, another process stored it.
                data = self._cached(number) if store is None else (
                    self._cached_in_memory(number, take=True)
                    or store.read(number, fresh=True))
                if data is None:
                    todo.append(number)
                else:
                    got[number] = data
            for start, run in _runs(todo, count):
                offset = start * self._chunk_size
                length = sum(self._chunk_length(n) for n in range(start, start + run))
                data = self._inner.pread(length, offset)
                self._count(inner_reads=1, bytes_fetched=length)
                self._keep(start, data)
                view = memoryview(data)  # the chunks as views of the one fetch: no copies
                for k in range(run):
                    got[start + k] = view[k * self._chunk_size : (k + 1) * self._chunk_size]
        if self._max_bytes is not None and self._unchecked >= max(
                self._chunk_size, self._max_bytes * CHECK_EVERY):
            self._evict()
        return got

    def _cached_in_memory(self, number: int, *, take: bool = False) -> bytes | memoryview | None:
        """A chunk kept in memory (not stored, or fetched ahead: `take` takes the latter)."""
        with self._lock:
            data = self._memory.get(number)
            if data is not None:
                return data
            return self._take_handoff(number) if take else self._handoff.get(number)

    def _chunk_length(self, number: int) -> int:
        return min(self._chunk_size, self._size - number * self._chunk_size)

    # -- keeping what was fetched ---------------------------------------------------------

    def _keep(self, first: int, data: bytes) -> None:
        """Store fetched chunks; when the disk is full, evict and try once more, then keep
        them in memory and stop trying for a while."""
        store = self._store
        if store is not None and time.monotonic() >= self._paused_until:
            try:
                store.write(first, data)
            except OSError as exc:
                if exc.errno in _DISK_FULL and self._evict(free=4 * len(data)):
                    with contextlib.suppress(OSError):
                        store.write(first, data)
                        self._stored(len(data))
                        return
                self._pause(exc)
            else:
                self._stored(len(data))
                if self._paused_until:
                    self._paused_until = 0.0
                    log.info("%s: storing chunks again", store.directory)
                return
        self._remember(first, data)

    def _stored(self, nbytes: int) -> None:
        with self._lock:
            self._unchecked += nbytes
            if self._estimate is not None:
                self._estimate += nbytes

    def _pause(self, exc: OSError) -> None:
        first_time = not self._paused_until
        self._paused_until = time.monotonic() + _PAUSE_S
        level = logging.WARNING if first_time else logging.DEBUG
        log.log(level, "%s: cannot store chunks (%s): serving them from memory (at most %d "
                "bytes), trying again in %.0f s", self._directory, exc.strerror or exc,
                self._memory_bytes, _PAUSE_S)

    def _remember(self, first: int, data: bytes) -> None:
        """Keep chunks that could not be stored in the bounded memory LRU."""
        count = -(-len(data) // self._chunk_size)
        self._count(unstored_chunks=count)
        with self._lock:
            for k in range(count):
                chunk = data[k * self._chunk_size : (k + 1) * self._chunk_size]
                old = self._memory.pop(first + k, None)
                self._memory_held += len(chunk) - len(old or b"")
                self._memory[first + k] = chunk
            while self._memory_held > self._memory_bytes and self._memory:
                _, dropped = self._memory.popitem(last=False)
                self._memory_held -= len(dropped)

    def _evict(self, *, free: int = 0) -> bool:
        """Evict down to 3/4 of max_bytes when over 13/16 of it, or with `free` to `free`
        bytes below the limit or below what is there now (a full disk), whichever is less; one thread at a time,
        others skip. True when something was evicted."""
        if self._max_bytes is None or not self._evict_lock.acquire(blocking=False):
            return False
        try:
            self._unchecked = 0
            target = None
            if free:
                held = self._estimate
                if held is None:
                    held = sum(b.disk_bytes for b in scan_blobs(self.cache_dir, count=False))
                target = max(0, min(int(self._max_bytes * LOW), self._max_bytes - free,
                                    held - free))
            result = evict(self.cache_dir, max_bytes=self._max_bytes, target_bytes=target,
                           force=bool(free))
        except OSError as exc:
            log.warning("%s: eviction failed: %s", self.cache_dir, exc)
            return False
        finally:
            self._evict_lock.release()
        if result is None:
            return False
        with self._lock:
            self._estimate = result.bytes_after
        self._count(evicted_chunks=result.chunks_evicted)
        if result.bytes_after > self._max_bytes:
            log.info("%s: %d bytes cached, over the %d limit: the rest is in use",
                     self.cache_dir, result.bytes_after, self._max_bytes)
        return result.bytes_after < result.bytes_before

    # -- background work -----------------------------------------------------------------

    def _note_read(self, offset: int, last: int) -> None:
        """Track forward reads; after two in a row, start readahead past `last`."""
        readahead = self._readahead
        if not readahead or getattr(self._exact, "on", False):
            return
        readahead = self._ahead_limit(readahead)
        chunk_size = self._chunk_size
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
            window = min(readahead, 1 << min(max(self._streak - 1, 0), 30))
            stop = min(start + window, self._chunk_count)
            if self._streak < 1 or self._readahead_busy or start >= stop or self._closed:
                return
            self._readahead_busy = True
        # A full window is fetched in batches of at least half of it (unless the chunk right
        # after the read is missing): a forward reader then sends a few large GETs instead of
        # one per read step (a registry spends milliseconds per request).
        batch = window // 2 if window == readahead else 0
        self._submit(self._background, start, stop, True, batch)

    def _background(self, start: int, stop: int, is_readahead: bool, batch: int = 0) -> None:
        """Fetch the absent chunks of start..stop-1, unless fewer than `batch` are absent and
        `start` is not; errors only logged (a read will retry)."""
        try:
            store = self._store
            missing = [n for n in range(start, stop)
                       if self._cached_in_memory(n) is None and (store is None or not store.has(n))]
            if len(missing) < batch and missing and missing[0] != start:
                return
            got = self._fetch(missing, background=True)
            self._hand_off(got)
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

    def _count(self, hits: int = 0, misses: int = 0, inner_reads: int = 0,
               bytes_fetched: int = 0, bytes_served: int = 0, readahead_chunks: int = 0,
               invalidated_chunks: int = 0, unstored_chunks: int = 0,
               evicted_chunks: int = 0) -> None:
        with self._lock:
            for k, value in enumerate((hits, misses, inner_reads, bytes_fetched, bytes_served,
                                       readahead_chunks, invalidated_chunks, unstored_chunks,
                                       evicted_chunks)):
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
