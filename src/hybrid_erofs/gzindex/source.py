"""GzipSource: the uncompressed layer data of a gzip blob, read at random through zinfo checkpoints.

Sits above the compressed-blob stages (file, registry, cache) and below ConcatSource.
"""

from __future__ import annotations

import threading
import zlib as _stdlib_zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..errors import SourceIOError
from ..source import ByteSource, check_range
from .format import WINDOW_SIZE, GzipIndex
from .prime import primed_start

try:  # fastest first; all three honour zdict for raw inflate and release the GIL
    from isal import isal_zlib as _codec
except ImportError:  # pragma: no cover - depends on the platform's wheels
    try:
        from zlib_ng import zlib_ng as _codec
    except ImportError:
        _codec = _stdlib_zlib

CODEC_NAME: str = _codec.__name__
_CODEC_ERRORS: tuple[type[BaseException], ...] = (_codec.error, _stdlib_zlib.error)

_UNKNOWN = 1 << 62
FIRST_PIECE = 64 << 10
MAX_PIECE = 1 << 20
OUTPUT_CAP = 4 << 20
TRAILER_SIZE = 8  # RFC 1952: CRC32 and ISIZE after each member's deflate data


@dataclass(eq=False)
class _Span:
    """Decoded bytes of one checkpoint's span, and the live decoder that continues it."""

    number: int
    start: int  # uncompressed offset of the checkpoint
    end: int  # uncompressed offset of the next checkpoint, or the layer size
    data: bytearray = field(default_factory=bytearray)
    decoder: Any = None
    next_in: int = 0  # blob offset of the next compressed byte to fetch
    piece: int = FIRST_PIECE
    pending: bytes = b""  # bytes fetched but not yet given to the decoder (member boundary)
    accounted: int = 0  # len(data) as last counted in the LRU's total
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

    Thread-safe: concurrent readers of different spans decode in parallel (the codecs release
    the GIL); readers of the same span wait for one decode.
    """

    def __init__(self, inner: ByteSource, index: GzipIndex, *, size: int | None = None,
                 cache_bytes: int = 64 << 20) -> None:
        if cache_bytes < 0:
            raise ValueError(f"'cache_bytes' must be >= 0 (got {cache_bytes})")
        self._inner = inner
        self._index = index
        self._starts = [cp.out_offset for cp in index.checkpoints]
        self._cache_bytes = cache_bytes
        self._spans: OrderedDict[int, _Span] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self.decoded_bytes = 0  # bytes inflated so far (statistics)
        self.fetched_bytes = 0  # compressed bytes read from `inner`
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
            self._spans.clear()
            self._cached = 0
        self._inner.close()

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if length == 0:
            return b""
        parts: list[bytes] = []
        end = offset + length
        while offset < end:
            number = self._index.find(offset)
            span = self._span(number)
            take = min(end, span.end) - offset
            rel = offset - span.start
            with span.lock:
                if len(span.data) < rel + take:
                    self._decode(span, rel + take)
                parts.append(bytes(span.data[rel : rel + take]))
            self._account(span)
            offset += take
        return parts[0] if len(parts) == 1 else b"".join(parts)

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
        if cp.bits:
            partial = self._fetch(1, cp.in_offset - 1)[0]
            span.pending = primed_start(cp.bits, partial)
        span.next_in = cp.in_offset
        # A window of zeros at out=0 is harmless: nothing can refer back before the start.
        span.decoder = _codec.decompressobj(-15, zdict=cp.window)

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
                data = span.pending or span.decoder.unconsumed_tail
                if not data:
                    data = self._fetch(span.piece, span.next_in)
                    if not data:
                        raise SourceIOError(
                            f"gzip blob: truncated: {self._inner.size} bytes end inside the "
                            f"deflate stream at uncompressed offset {span.start + len(span.data)}"
                        )
                    span.next_in += len(data)
                    span.piece = min(span.piece * 2, MAX_PIECE)
                span.pending = b""
                out = span.decoder.decompress(data, OUTPUT_CAP)
                span.data += out
                self.decoded_bytes += len(out)
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
        """Check a completed span against the next checkpoint's window; hand on the decoder."""
        size = span.end - span.start
        extra = bytes(span.data[size:])
        del span.data[size:]
        decoder, span.decoder = span.decoder, None
        number = span.number + 1
        if number >= len(self._starts):
            return
        window = self._index.checkpoints[number].window
        have = bytes(span.data[-WINDOW_SIZE:])
        if have != window[WINDOW_SIZE - len(have) :]:
            span.data.clear()
            raise SourceIOError(
                f"gzip blob: decoded data does not match zinfo checkpoint {number} at "
                f"uncompressed offset {span.end} (corrupt blob, or a zinfo of another blob)"
            )
        # Sequential reads: the decoder is positioned exactly at the next span's start, so
        # seed that span with it instead of restarting from the checkpoint later.
        with self._lock:
            if number not in self._spans:
                nxt = _Span(number, self._starts[number], self._span_end(number))
                nxt.data += extra
                nxt.decoder = decoder
                nxt.next_in = span.next_in
                nxt.piece = span.piece
                nxt.pending = span.pending
                span.pending = b""
                self._spans[number] = nxt

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
        if header < 0:
            raise SourceIOError(
                f"gzip blob: garbage instead of a gzip member header after uncompressed offset "
                f"{span.start + len(span.data)}"
            )
        span.decoder = _codec.decompressobj(-15)
        span.pending = bytes(buf[header:])
        return True

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
