"""GzipSource: the uncompressed layer data of a gzip blob, read at random through zinfo checkpoints.

Sits above the compressed-blob stages (file, registry, cache) and below ConcatSource.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import zlib as _stdlib_zlib
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..errors import SourceIOError
from ..metrics.samples import Sample, counter, gauge
from ..source import ByteSource, Prefetching, check_range
from .format import WINDOW_SIZE, GzipIndex
from .lazy import LazyWindows
from .prime import primed_start

log = logging.getLogger(__name__)

def _load_codec() -> ModuleType:
    """Fastest first; all three honour zdict for raw inflate. (Their decompressobj holds the
    GIL while it inflates, except the stdlib's: spans decode on one core at a time. isal's
    IgzipDecompressor releases it and is used instead when isal is here: _new_decoder.)"""
    try:
        from isal import isal_zlib

        return isal_zlib
    except ImportError:  # pragma: no cover - depends on the platform's wheels
        pass
    try:
        from zlib_ng import zlib_ng

        return zlib_ng
    except ImportError:  # pragma: no cover
        return _stdlib_zlib


def _load_igzip() -> Any:
    try:
        from isal import igzip_lib
    except ImportError:  # pragma: no cover - depends on the platform's wheels
        return None
    return igzip_lib


_codec = _load_codec()
_igzip = _load_igzip()

CODEC_NAME: str = "isal.igzip_lib" if _igzip is not None else _codec.__name__
_crc32 = _codec.crc32
_CODEC_ERRORS: tuple[type[BaseException], ...] = (
    _codec.error, _stdlib_zlib.error, EOFError,
    *((_igzip.IsalError,) if _igzip is not None else ()))


class _Decoder:
    """Raw inflate of one deflate stream: `decompress(data, n)` gives at most n bytes; when
    `holds_input`, more can come without new input (the next call passes b"")."""

    __slots__ = ("_inflater",)
    _inflater: Any

    @property
    def eof(self) -> bool:
        return bool(self._inflater.eof)

    @property
    def unused_data(self) -> bytes:
        return bytes(self._inflater.unused_data)


class _IgzipDecoder(_Decoder):
    """isal's IgzipDecompressor, which releases the GIL while it inflates (isal_zlib's
    decompressobj does not): decode-ahead threads use both cores. Input it could not use yet
    (output capped by `max_length`) stays inside it."""

    __slots__ = ("_stalled",)

    def __init__(self, zdict: bytes | None) -> None:
        assert _igzip is not None
        self._inflater = _igzip.IgzipDecompressor(flag=_igzip.DECOMP_DEFLATE, hist_bits=15,
                                                  zdict=zdict or b"")
        self._stalled = False

    @property
    def holds_input(self) -> bool:
        return not (self._inflater.needs_input or self._inflater.eof or self._stalled)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out: bytes = self._inflater.decompress(data, max_length)
        self._stalled = not data and not out  # never ask for held input that gives nothing
        return out


class _ZlibDecoder(_Decoder):
    """A zlib-style decompressobj (isal_zlib's, zlib-ng's, the stdlib's)."""

    __slots__ = ()

    def __init__(self, zdict: bytes | None) -> None:
        self._inflater = (_codec.decompressobj(-15, zdict=zdict) if zdict is not None
                          else _codec.decompressobj(-15))

    @property
    def holds_input(self) -> bool:
        return bool(self._inflater.unconsumed_tail)

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out: bytes = self._inflater.decompress(data or self._inflater.unconsumed_tail,
                                               max_length)
        return out


def _new_decoder(zdict: bytes | None = None) -> _Decoder:
    """A raw-deflate decoder primed with `zdict` (a checkpoint's window), or none (a member
    start)."""
    return _IgzipDecoder(zdict) if _igzip is not None else _ZlibDecoder(zdict)


_UNKNOWN = 1 << 62
FIRST_PIECE = 64 << 10
MAX_PIECE = 1 << 20
OUTPUT_CAP = 4 << 20
MIN_OUTPUT = 64 << 10
TRAILER_SIZE = 8  # RFC 1952: CRC32 and ISIZE after each member's deflate data


class _Pieces:
    """A span's decoded bytes, kept as the decoder handed them out: appending copies nothing
    (a bytearray copied every output once more, and again each time it grew)."""

    __slots__ = ("_parts", "_starts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []
        self._starts: list[int] = []  # offset of each part in the span's data
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes | memoryview) -> None:
        if len(data):
            self._starts.append(self._size)
            self._parts.append(data)
            self._size += len(data)

    def clear(self) -> None:
        self._parts.clear()
        self._starts.clear()
        self._size = 0

    def _views(self, start: int, length: int) -> list[memoryview]:
        """Views of bytes `start` to `start + length` (decoded already), part by part."""
        end = start + length
        if start < 0 or end > self._size:
            raise ValueError(f"bytes {start}..{end} of a span decoded to {self._size}")
        views: list[memoryview] = []
        number = bisect_right(self._starts, start) - 1
        while start < end:
            part, at = self._parts[number], self._starts[number]
            stop = min(end, at + len(part))
            views.append(memoryview(part)[start - at : stop - at])
            start, number = stop, number + 1
        return views

    def copy(self, start: int, length: int) -> bytes:
        """Bytes `start` to `start + length` (decoded already), in one copy."""
        views = self._views(start, length)
        return bytes(views[0]) if len(views) == 1 else b"".join(views)

    def copy_into(self, target: memoryview, start: int) -> None:
        """Fill `target` with the bytes from `start` on (decoded already)."""
        done = 0
        for view in self._views(start, len(target)):
            target[done : done + len(view)] = view
            done += len(view)

    def cut(self, size: int) -> bytes:
        """Keep the first `size` bytes; return those past it."""
        if self._size <= size:
            return b""
        number = bisect_right(self._starts, size) - 1  # the part holding byte `size`
        part, at = self._parts[number], self._starts[number]
        view = memoryview(part)
        extra = b"".join([view[size - at :], *self._parts[number + 1 :]])
        del self._parts[number + 1 :], self._starts[number + 1 :]
        if size > at:
            self._parts[number] = view[: size - at]
        else:
            del self._parts[number], self._starts[number]
        self._size = size
        return extra

    def buffers(self) -> list[memoryview]:
        return [memoryview(part) for part in self._parts]


@dataclass(eq=False)
class _Span:
    """Decoded bytes of one checkpoint's span, and the live decoder that continues it."""

    number: int
    start: int  # uncompressed offset of the checkpoint
    end: int  # uncompressed offset of the next checkpoint, or the layer size
    data: _Pieces = field(default_factory=_Pieces)
    decoder: Any = None
    next_in: int = 0  # blob offset of the next compressed byte to fetch
    piece: int = FIRST_PIECE
    pending: bytes = b""  # bytes fetched but not yet given to the decoder (member boundary)
    accounted: int = 0  # len(data) as last counted in the LRU's total
    boundary: int = 0  # where in `data` the current gzip member began (0: at or before start)
    # CRC-32 of the current member's output so far, when decoding began at the member's
    # start (checkpoint 0, or after a member boundary); None when it began mid-member.
    crc: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def complete(self) -> bool:
        return self.start + len(self.data) >= self.end


class GzipSource:
    """Uncompressed layer data of a gzip blob, decoded on demand from zinfo checkpoints.

    A read decodes from the checkpoint at or before it (the zinfo window is the zdict, and
    checkpoints in the middle of a byte are resumed with the empty-block prefix of
    `prime.py`), across gzip member boundaries, and keeps what it decoded plus the live
    decoder in a bounded LRU of spans, so sequential and repeated reads do not inflate again.

    Each completed span is checked against the next checkpoint's window: a blob that does not
    match its zinfo (corruption, or the wrong zinfo) raises SourceIOError, as do inflate
    errors and a blob that ends early. Never zero-filled or short data.

    Args:
        inner: the compressed blob; owned, closed by `close()`.
        index: its checkpoints (zinfo).
        size: uncompressed size. None decodes the last span once, here, to learn it.
        cache_bytes: bound of the decoded-span cache (default 64 MiB; a span being read may
            exceed it briefly).
        decode_ahead: spans to decode in the background ahead of a forward reader (default
            0: none). Spans are independent once their checkpoint is known, so with
            `decode_workers` threads a sequential read uses every core.
        decode_workers: threads for decode-ahead (default 2).
        fetch_ahead: spans past the decode-ahead ones whose compressed bytes a forward reader
            has `inner` prefetch (default 0: none; only when `inner` is Prefetching, e.g. a
            VerifiedSource over the chunk cache, or a file), ramped up with the reader's run:
            half the spans it has read through so far. Nothing is decoded or trusted from a
            prefetch: the bytes are read and checked when a decode needs them.
        windows: where the checkpoints' windows come from when `index` has only some of
            them (a profile zinfo, gzindex/lazy.py): a decode waits for a window not known
            yet, and a span's end is checked against the next window only when it is known.

    Thread-safe: concurrent readers of different spans decode in parallel (isal's
    IgzipDecompressor and the stdlib's zlib release the GIL; zlib-ng's decompressobj does
    not); readers of the same span wait for one decode.
    """

    def __init__(self, inner: ByteSource, index: GzipIndex, *, size: int | None = None,
                 cache_bytes: int = 64 << 20, decode_ahead: int = 0,
                 decode_workers: int = 2, fetch_ahead: int = 0,
                 windows: LazyWindows | None = None) -> None:
        if cache_bytes < 0:
            raise ValueError(f"'cache_bytes' must be >= 0 (got {cache_bytes})")
        if decode_ahead < 0:
            raise ValueError(f"'decode_ahead' must be >= 0 (got {decode_ahead})")
        if decode_workers < 1:
            raise ValueError(f"'decode_workers' must be >= 1 (got {decode_workers})")
        if fetch_ahead < 0:
            raise ValueError(f"'fetch_ahead' must be >= 0 (got {fetch_ahead})")
        self._inner = inner
        self._index = index
        self._windows = windows
        self._starts = [cp.out_offset for cp in index.checkpoints]
        self._cache_bytes = cache_bytes
        self._spans: OrderedDict[int, _Span] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self.decoded_bytes = 0  # bytes inflated so far (statistics)
        self.fetched_bytes = 0  # compressed bytes read from `inner`
        self._ahead = min(decode_ahead, max(0, len(self._starts) - 1))
        self._workers = decode_workers
        self._prefetcher = inner if isinstance(inner, Prefetching) else None
        self._fetch_ahead = fetch_ahead if self._prefetcher is not None else 0
        self._prefetched = (0, 0)  # compressed range asked of `inner` for the current reader
        self._todo: deque[int] = deque()  # spans waiting for a decode-ahead thread
        self._queued: set[int] = set()  # spans submitted for decode-ahead, not yet done
        # Threads run only while there is work (none idle between reads, none left at close).
        self._threads: set[threading.Thread] = set()
        self._ending: list[threading.Thread] = []  # left the work loop, maybe not yet gone
        # Ends of recent reads -> where their forward run began: a read starting at one
        # continues a sequential reader (the kernel keeps a few of its requests in flight, so
        # they may come out of order). The 8 most recent.
        self._runs: OrderedDict[int, int] = OrderedDict()
        self._closed = False
        # Called with (span number, its bytes) when a span is decoded in full and checked
        # (next checkpoint's window, or the member CRC at the end); a LayerStore keeps them.
        # The bytes come as the span's pieces, in order (LayerStore.put writes them as one).
        # True back: the span is served from elsewhere from now on (stored): its memory goes.
        self.on_span: Callable[[int, Sequence[memoryview]], bool] | None = None
        # Spans served from elsewhere (a LayerStore has them): not decoded ahead.
        self.kept: Callable[[int], bool] | None = None
        self.spans_decoded = 0  # decodes started at a checkpoint
        # Spans completed while the next checkpoint's window was not known (a profile zinfo):
        # their end was not checked (unchecked_ends()).
        self._unchecked: set[int] = set()
        self._size = _UNKNOWN if size is None else size
        if size is None:
            self._size = self._measure()

    @property
    def size(self) -> int:
        return self._size

    @property
    def index(self) -> GzipIndex:
        return self._index

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._todo.clear()
            threads = [*self._threads, *self._ending]
        for thread in threads:  # none left behind, not even one on its way out
            thread.join()
        with self._lock:
            self._spans.clear()
            self._cached = 0
        self._inner.close()

    def release_memory(self) -> int:
        """Drop the decoded spans no reader or decode is working on (Releasing); a read of
        one later decodes it again from its checkpoint. Returns the bytes dropped."""
        dropped = 0
        with self._lock:
            for number, span in list(self._spans.items()):
                if not span.lock.acquire(blocking=False):
                    continue  # being read or decoded: it stays
                try:
                    del self._spans[number]
                    self._cached -= span.accounted
                    dropped += span.accounted
                    span.accounted = 0
                finally:
                    span.lock.release()
        return dropped

    def metric_samples(self) -> list[Sample]:
        return [counter("spans_decoded", self.spans_decoded,
                        "Decodes started at a zinfo checkpoint"),
                counter("decoded_bytes", self.decoded_bytes, "Uncompressed bytes inflated"),
                counter("gzip_input_bytes", self.fetched_bytes,
                        "Compressed bytes read by the decoder (from the cache or a file)"),
                gauge("decoded_cache_bytes", self._cached,
                      "Decoded layer data kept in memory (bound: the decoded-span cache size)")]

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if length == 0:
            return b""
        parts: list[bytes] = []
        self._read(length, offset, lambda data, rel, take, done: parts.append(data.copy(rel, take)))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        """pread into `buffer` (writable, format "B"): one copy from the decoded span."""
        length = len(buffer)
        check_range(self, length, offset)
        if length:
            self._read(length, offset, lambda data, rel, take, done:
                       data.copy_into(buffer[done : done + take], rel))

    def _read(self, length: int, offset: int,
              take: Callable[[_Pieces, int, int, int], object]) -> None:
        """Decode what `length` bytes at `offset` need, span by span, handing each span's
        part to `take(span data, offset in the span, length, bytes taken before)` under the
        span's lock."""
        start, end = offset, offset + length
        while offset < end:
            number = bisect_right(self._starts, offset) - 1
            span = self._span(number)
            size = min(end, span.end) - offset
            rel = offset - span.start
            with span.lock:
                if len(span.data) < rel + size:
                    self._decode(span, rel + size)
                take(span.data, rel, size, offset - start)
            self._account(span)
            offset += size
        if self._ahead:  # only after a read that worked: a failing source gets no extra load
            self._decode_ahead(start, length)

    def note_read(self, length: int, offset: int) -> None:
        """A read served from elsewhere (stored spans): it continues a forward reader's run,
        so that its next read here decodes ahead at once; it starts no ahead-work itself
        (reads answered locally fetch nothing)."""
        if self._ahead and length:
            with self._lock:
                self._continue_run(offset, length)

    def _continue_run(self, offset: int, length: int) -> int | None:
        """Record a read: where the forward run it continues began, or None (it continues
        none: the kernel keeps a few of a reader's requests in flight, so the 8 most recent
        ends count). Caller holds self._lock."""
        begun = self._runs.pop(offset, None)
        self._runs[offset + length] = offset if begun is None else begun
        while len(self._runs) > 8:
            self._runs.popitem(last=False)
        return begun

    @property
    def blob_size(self) -> int:
        return self._inner.size

    @property
    def span_count(self) -> int:
        return len(self._starts)

    def unchecked_ends(self) -> frozenset[int]:
        """Spans completed (and handed to `on_span`) before the next checkpoint's window was
        known, so without the check of their end (`windows`: a profile zinfo); none is added
        once every window is known."""
        with self._lock:
            return frozenset(self._unchecked)

    def load_span(self, number: int) -> None:
        """Decode span `number` in full (a background fetch): its compressed bytes are fetched
        and checked, `on_span` sees it. Raises what a read of it would raise."""
        if not 0 <= number < len(self._starts):
            raise ValueError(f"span {number} is outside 0..{len(self._starts) - 1}")
        if self.kept is not None and self.kept(number):
            return  # stored meanwhile (a reader's decode): nothing to fetch or decode
        span = self._span(number)
        with span.lock:
            if not span.complete:
                self._decode(span, span.end - span.start)
        self._account(span)

    # -- decode-ahead -------------------------------------------------------------------------

    def _decode_ahead(self, offset: int, length: int) -> None:
        """A read that starts where a recent one ended (a sequential reader): decode the
        `decode_ahead` spans after the one it ends in on the worker threads, each from its
        own checkpoint. Random readers never trigger it."""
        with self._lock:
            begun = self._continue_run(offset, length)
            if begun is None or self._closed:
                return
            number = bisect_right(self._starts, offset + length - 1) - 1
            wanted = []
            kept = self.kept
            for ahead in range(number + 1, min(number + 1 + self._ahead, len(self._starts))):
                span = self._spans.get(ahead)
                if ahead in self._queued or (span is not None and span.complete) or (
                        kept is not None and kept(ahead)):
                    continue
                self._queued.add(ahead)
                wanted.append(ahead)
            self._todo.extend(wanted)
            self._ending = [thread for thread in self._ending if thread.is_alive()]
            while self._todo and len(self._threads) < self._workers:
                thread = threading.Thread(target=self._decode_queued, daemon=True,
                                          name=f"decode-ahead:{len(self._threads)}")
                self._threads.add(thread)
                thread.start()
            # Fetch ahead as far as the run has gone already (half its spans, up to
            # fetch_ahead): a few reads through a small file fetch nothing extra, a whole-layer
            # read soon has the full window.
            covered = number - (bisect_right(self._starts, begun) - 1) if begun is not None else 0
            ranges = self._prefetch_ranges(number + 1, min(self._fetch_ahead, covered // 2))
        inner = self._prefetcher
        if inner is None:
            return
        for length, start in ranges:
            try:
                inner.prefetch(length, start)
            except Exception as exc:  # advice: the read meets any real failure
                log.debug("prefetch of %d bytes at %d failed: %s", length, start, exc)

    @contextlib.contextmanager
    def ahead_held(self) -> Iterator[None]:
        """Meanwhile a forward reader starts no decode-ahead and no fetch-ahead (a prefetch
        of the spans it is about to read is running: ahead-work would only compete for the
        link with spans it may never read)."""
        with self._lock:
            saved = self._ahead, self._fetch_ahead
            self._ahead, self._fetch_ahead = 0, 0
        try:
            yield
        finally:
            with self._lock:
                self._ahead, self._fetch_ahead = saved

    def _prefetch_ranges(self, first: int, window: int) -> list[tuple[int, int]]:
        """(length, offset) of the compressed bytes of spans first..first+decode_ahead+
        window-1 not asked for yet, one range per span (a cache fetches them in parallel).
        Caller holds self._lock."""
        if window <= 0 or first >= len(self._starts):
            return []
        last = min(first + self._ahead + window, len(self._starts))
        checkpoints = self._index.checkpoints
        low, high = self._prefetched
        ranges = []
        for number in range(first, last):
            cp = checkpoints[number]
            start = cp.in_offset - 1 if cp.bits else cp.in_offset
            end = (checkpoints[number + 1].in_offset + 1 if number + 1 < len(checkpoints)
                   else self._inner.size)
            end = min(end, self._inner.size)
            if low <= start < high:  # asked for already (a reader's window moves on)
                start = high
            if start < end:
                ranges.append((end - start, start))
                if not low <= start <= high:
                    low = start
                high = end
        self._prefetched = (low, high)
        return ranges

    def _decode_queued(self) -> None:
        """A decode-ahead thread: decode queued spans until none is left, then end."""
        while True:
            with self._lock:
                if not self._todo or self._closed:
                    self._threads.discard(threading.current_thread())
                    self._ending.append(threading.current_thread())
                    return
                number = self._todo.popleft()
            self._decode_whole(number)

    def _decode_whole(self, number: int) -> None:
        """Decode span `number` to its end (a worker's job); a failure is left for the reader
        who needs the span to meet again, and report."""
        try:
            if not self._closed:
                self.load_span(number)
        except Exception as exc:
            log.debug("decode-ahead of span %d failed: %s", number, exc)
        finally:
            with self._lock:
                self._queued.discard(number)

    # -- span cache -------------------------------------------------------------------------

    def _span_end(self, number: int) -> int:
        if number + 1 < len(self._starts):
            return self._starts[number + 1]
        return self._size

    def _span(self, number: int) -> _Span:
        with self._lock:
            span = self._spans.get(number)
            if span is not None:
                self._spans.move_to_end(number)
                return span
            span = _Span(number, self._starts[number], self._span_end(number))
            self._spans[number] = span
            return span

    def _account(self, span: _Span) -> None:
        """Record the span's size in the LRU and evict the oldest spans beyond the bound."""
        with self._lock:
            if self._spans.get(span.number) is not span:
                return  # evicted or replaced meanwhile
            self._cached += len(span.data) - span.accounted
            span.accounted = len(span.data)
            while self._cached > self._cache_bytes and len(self._spans) > 1:
                number, old = next(iter(self._spans.items()))
                if old is span:
                    self._spans.move_to_end(number)
                    continue
                del self._spans[number]
                self._cached -= old.accounted

    # -- decoding ---------------------------------------------------------------------------

    def _start(self, span: _Span) -> None:
        cp = self._index.checkpoints[span.number]
        # First, so that a window that cannot be had leaves the span as it was.
        window = cp.window if self._windows is None else self._windows.window(span.number)
        # One fetch covers the checkpoint's partial byte (when it starts mid-byte) and the
        # first piece of deflate data.
        start = cp.in_offset - 1 if cp.bits else cp.in_offset
        span.next_in, span.piece = start, FIRST_PIECE
        first = self._fetch(self._piece(span), start)
        if len(first) < (1 if cp.bits else 0) or start > self._inner.size:
            raise SourceIOError(
                f"gzip blob: truncated: checkpoint {span.number} is at compressed offset "
                f"{cp.in_offset}, past the {self._inner.size}-byte blob"
            )
        span.pending = primed_start(cp.bits, first[0]) + first[1:] if cp.bits else first
        span.next_in = start + len(first)
        span.piece = FIRST_PIECE * 2
        span.crc = 0 if cp.out_offset == 0 else None
        # A window of zeros at out=0 is harmless: nothing can refer back before the start.
        span.decoder = _new_decoder(window)
        self.spans_decoded += 1

    def _piece(self, span: _Span) -> int:
        """Bytes to fetch next: the growing piece, stopped at the span's compressed end (the
        next checkpoint's byte), so reading one span never fetches or verifies the next.
        Only when the decoder still wants input right there does it read on."""
        if span.number + 1 < len(self._starts):
            left = self._index.checkpoints[span.number + 1].in_offset - span.next_in
            if left > 0:
                return min(span.piece, left)
        return span.piece

    def _fetch(self, length: int, offset: int) -> bytes:
        length = min(length, self._inner.size - offset)
        if length <= 0:
            return b""
        data = self._inner.pread(length, offset)
        self.fetched_bytes += len(data)
        return data

    def _decode(self, span: _Span, need: int, *, to_eof: bool = False) -> None:
        """Grow `span.data` to at least `need` bytes (or the span's end). Caller holds span.lock.

        With `to_eof`, the end of the blob ends decoding instead of raising.
        """
        need = min(need, span.end - span.start)
        if span.decoder is None:
            if span.data:
                raise SourceIOError(  # completed spans never need more; this is a bug guard
                    f"gzip span {span.number}: decoder missing after {len(span.data)} bytes"
                )
            self._start(span)
        try:
            while len(span.data) < need:
                if span.decoder.eof:
                    if not self._next_member(span):
                        if to_eof:
                            return
                        raise SourceIOError(
                            f"gzip blob: ends at uncompressed offset {span.start + len(span.data)}, "
                            f"before the {span.start + need} bytes requested "
                            "(blob truncated, or zinfo/size not for this blob)"
                        )
                    continue
                data = span.pending
                if not data and not span.decoder.holds_input:
                    data = self._fetch(self._piece(span), span.next_in)
                    if not data:
                        raise SourceIOError(
                            f"gzip blob: truncated: {self._inner.size} bytes end inside the "
                            f"deflate stream at uncompressed offset {span.start + len(span.data)}"
                        )
                    span.next_in += len(data)
                    span.piece = min(span.piece * 2, MAX_PIECE)
                span.pending = b""
                # Inflate only about what the read needs: a cold read pays for the distance
                # from its checkpoint, not for the rest of the span.
                want = min(OUTPUT_CAP, max(need - len(span.data), MIN_OUTPUT))
                out = span.decoder.decompress(data, want)
                span.data.append(out)
                self.decoded_bytes += len(out)
                if span.crc is not None:
                    span.crc = _crc32(out, span.crc)
        except _CODEC_ERRORS as exc:
            span.decoder = None
            span.data.clear()
            raise SourceIOError(
                f"gzip blob: corrupt deflate data in the span at uncompressed offset "
                f"{span.start} (checkpoint {span.number}, compressed offset near {span.next_in}): {exc}"
            ) from exc
        if span.complete:
            self._finish(span)

    def _finish(self, span: _Span) -> None:
        """Check a completed span against the next checkpoint's window and hand the live
        decoder (and any bytes decoded past the end) on to the next span.

        The caller holds `span.lock`; successor spans are locked here before they become
        visible to other readers.
        """
        held: _Span | None = None
        try:
            while True:
                size = span.end - span.start
                extra = span.data.cut(size)
                decoder, span.decoder = span.decoder, None
                number = span.number + 1
                if number >= len(self._starts):
                    if span.crc is not None and decoder is not None:
                        self._check_last_member(span, decoder)
                    self._completed(span)
                    return
                extra = self._check_window(span, number, decoder, extra)
                self._completed(span)
                if self.kept is not None and self.kept(number):
                    return  # the next span is read from where it is kept, never decoded here
                # Sequential reads: the decoder sits exactly at the next span's start, so seed
                # that span with it instead of restarting from its checkpoint later.
                nxt = _Span(number, self._starts[number], self._span_end(number))
                nxt.lock.acquire()
                with self._lock:
                    if number in self._spans:
                        nxt.lock.release()
                        return
                    nxt.data.append(extra)
                    nxt.decoder = decoder
                    nxt.next_in = span.next_in
                    nxt.piece = span.piece
                    nxt.pending, span.pending = span.pending, b""
                    nxt.crc = span.crc
                    self._spans[number] = nxt
                if held is not None:
                    held.lock.release()
                held = nxt
                if not nxt.complete:
                    return
                span = nxt  # the overshoot covered the whole next span as well
        finally:
            if held is not None:
                held.lock.release()

    def _completed(self, span: _Span) -> None:
        if self.on_span is None or not self.on_span(span.number, span.data.buffers()):
            return
        # Stored: reads of it are served from the store, its memory goes back (and is reused
        # for the next spans instead of growing the heap; readers holding it finish with it).
        with self._lock:
            if self._spans.get(span.number) is span:
                del self._spans[span.number]
                self._cached -= span.accounted
                span.accounted = 0

    def _next_member(self, span: _Span) -> bool:
        """Skip a member trailer and the next gzip header; False at the end of the blob."""
        buf = bytearray(span.decoder.unused_data)
        while True:
            header = _parse_member_start(bytes(buf))
            if header is not None:
                break
            if len(buf) >= TRAILER_SIZE and not any(buf[TRAILER_SIZE:]):
                more = self._fetch(MAX_PIECE, span.next_in)
                if not more:
                    self._check_crc(span, buf)
                    return False  # trailer, then only zero padding: the end of the blob
            else:
                more = self._fetch(FIRST_PIECE, span.next_in)
                if not more:
                    raise SourceIOError(
                        f"gzip blob: truncated or garbled after a member ending at uncompressed "
                        f"offset {span.start + len(span.data)}"
                    )
            span.next_in += len(more)
            buf += more
        self._check_crc(span, buf)
        if header < 0:
            raise SourceIOError(
                f"gzip blob: garbage instead of a gzip member header after uncompressed offset "
                f"{span.start + len(span.data)}"
            )
        span.decoder = _new_decoder()
        span.pending = bytes(buf[header:])
        span.crc = 0
        span.boundary = len(span.data)
        return True

    def _check_window(self, span: _Span, number: int, decoder: Any, extra: bytes) -> bytes:
        """Compare the end of a completed span with checkpoint `number`'s window; return
        `extra` (bytes decoded past the span), possibly grown by the probe below.

        Only bytes of the current gzip member are compared: a window may hold anything
        before a member start (erofs-utils leaves stale buffer bytes there).
        """
        size = span.end - span.start
        valid = min(WINDOW_SIZE, size - span.boundary)
        window = (self._index.checkpoints[number].window if self._windows is None
                  else self._windows.known(number))
        if window is None:  # not here yet (a profile zinfo): the verifier checks it later
            with self._lock:
                self._unchecked.add(span.number)
            return extra
        if span.data.copy(size - valid, valid) == window[WINDOW_SIZE - valid :]:
            return extra
        # A checkpoint exactly at a member start carries no usable window (erofs' rule adds
        # one there). If the decoder is at its member's end, that is what this is.
        if not extra and not decoder.eof:
            tail = span.pending
            if not tail and not decoder.holds_input:
                tail = self._fetch(FIRST_PIECE, span.next_in)
                span.next_in += len(tail)
            span.pending = b""
            extra = decoder.decompress(tail, 1)
        if decoder.eof and not extra:
            return extra
        span.data.clear()
        raise SourceIOError(
            f"gzip blob: decoded data does not match zinfo checkpoint {number} at "
            f"uncompressed offset {span.end} (corrupt blob, or a zinfo of another blob)"
        )

    def _check_last_member(self, span: _Span, decoder: Any) -> None:
        """At the end of the layer data, read on to the member's trailer and check its CRC."""
        span.decoder = decoder
        try:
            while not decoder.eof:
                data = span.pending
                if not data and not decoder.holds_input:
                    data = self._fetch(FIRST_PIECE, span.next_in)
                    if not data:
                        raise SourceIOError("gzip blob: truncated: no trailer after the layer data")
                    span.next_in += len(data)
                span.pending = b""
                # Output past `size` (tar record padding when the size came from the meta)
                # still counts for the member's CRC.
                span.crc = _crc32(decoder.decompress(data, MIN_OUTPUT), span.crc or 0)
            buf = bytearray(decoder.unused_data)
            if len(buf) < 4:
                buf += self._fetch(4 - len(buf), span.next_in)
            self._check_crc(span, buf)
        except _CODEC_ERRORS as exc:
            raise SourceIOError(f"gzip blob: corrupt deflate data at the end of the blob: {exc}") from exc
        finally:
            span.decoder = None

    @staticmethod
    def _check_crc(span: _Span, trailer: bytearray) -> None:
        """Compare a whole member's CRC-32 with its trailer (RFC 1952 §2.3.1), when known."""
        stored = int.from_bytes(trailer[:4], "little")
        if span.crc is not None and span.crc != stored:
            raise SourceIOError(
                f"gzip blob: CRC-32 mismatch for the member ending at uncompressed offset "
                f"{span.start + len(span.data)} (trailer {stored:08x}, data {span.crc:08x}): "
                "corrupt blob"
            )

    def _measure(self) -> int:
        """Decode the last span to its end to learn the uncompressed size."""
        span = self._span(len(self._starts) - 1)
        with span.lock:
            self._decode(span, _UNKNOWN, to_eof=True)
            span.end = span.start + len(span.data)
            span.decoder = None
        self._account(span)
        return span.end


def _parse_member_start(buf: bytes) -> int | None:
    """Offset of the deflate data after a trailer + gzip header in `buf` (RFC 1952 §2.3).

    None when more bytes are needed; -1 when the bytes after the trailer are not a gzip header.
    """
    pos = TRAILER_SIZE
    if len(buf) < pos + 10:
        if len(buf) > pos and buf[pos] != 0x1F:
            return -1 if any(buf[pos:]) else None
        return None
    if buf[pos] != 0x1F or buf[pos + 1] != 0x8B or buf[pos + 2] != 8:
        return -1 if any(buf[pos:]) else None
    flags = buf[pos + 3]
    pos += 10
    if flags & 4:  # FEXTRA
        if len(buf) < pos + 2:
            return None
        pos += 2 + int.from_bytes(buf[pos : pos + 2], "little")
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            end = buf.find(b"\0", pos)
            if end < 0:
                return None
            pos = end + 1
    if flags & 2:  # FHCRC
        pos += 2
    if len(buf) < pos:
        return None
    return pos
