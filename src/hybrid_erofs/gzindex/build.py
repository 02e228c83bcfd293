"""Checkpoint builder: one streaming pass over a gzip blob with inflate(Z_BLOCK).

Emits zran/SOCI checkpoints, hands every uncompressed byte to an optional sink (the EROFS
meta builder), and records blob size, layer size and the blob's sha256.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ..errors import GzipFormatError
from ..filekind import detect_format, not_gzip_message
from .format import WINDOW_SIZE, Checkpoint, GzipIndex
from .inflate import Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END, load_engine, new_stream
from .spans import SpanDigest, SpanHasher

DEFAULT_SPAN = 4 << 20
INPUT_SIZE = 1 << 20
OUTPUT_SIZE = 1 << 20

Sink = Callable[[memoryview], None]
Progress = Callable[[int], None]

class Reader(Protocol):
    def readinto(self, buffer: memoryview) -> int | None: ...


class _IterReader:
    """readinto() over an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")

    def readinto(self, buffer: memoryview) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk).cast("B")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What one indexing pass learned about a blob."""

    index: GzipIndex
    blob_size: int
    layer_size: int
    blob_sha256: str
    span_digests: tuple[SpanDigest, ...]  # sha256 of each span's compressed bytes (spans.py)
    members: int
    elapsed_s: float
    engine: str
    member_starts: tuple[int, ...] = ()  # uncompressed offset where each gzip member begins


def build_index(
    stream: BinaryIO | Reader | Iterable[bytes],
    *,
    span: int = DEFAULT_SPAN,
    every_member: bool = False,
    sink: Sink | None = None,
    engine: str = "auto",
    progress: Progress | None = None,
    name: str = "<stream>",
) -> BuildResult:
    """Index a gzip blob in one pass.

    Args:
        stream: a binary file (anything with `readinto`) or an iterable of byte chunks.
        span: a checkpoint is taken at the first block end more than `span` uncompressed
            bytes after the previous one (zran/SOCI rule); default 4 MiB.
        every_member: also take one at every gzip member start (erofs-utils' rule).
        sink: receives the uncompressed bytes in order, in chunks of up to 1 MiB; the
            memoryview is valid only during the call.
        engine: "auto" (zlib-ng when importable, else system zlib), "zlib-ng" or "zlib".
        progress: called with the number of blob bytes read so far, after each read.
        name: how errors name the blob.

    Raises:
        GzipFormatError: not gzip (the detected format is named), corrupt, truncated,
            or trailing garbage after the last member.
    """
    if span < 1:
        raise ValueError(f"'span' must be >= 1 (got {span})")
    reader: Reader = stream if hasattr(stream, "readinto") else _IterReader(stream)  # type: ignore[assignment]
    return _Builder(reader, span=span, every_member=every_member, sink=sink, engine=engine,
                    progress=progress, name=name).run()


class _Builder:
    def __init__(self, reader: Reader, *, span: int, every_member: bool, sink: Sink | None,
                 engine: str, progress: Progress | None, name: str) -> None:
        self.reader, self.span, self.every_member = reader, span, every_member
        self.sink, self.progress, self.name = sink, progress, name
        self.lib = load_engine(engine)
        # Two input buffers used in turn: while inflate reads one, a hashing thread digests
        # the bytes already consumed from the other (hashlib releases the GIL), so the blob
        # sha256 and the span digests cost no time on the inflate thread.
        self.buffers = [ctypes.create_string_buffer(INPUT_SIZE) for _ in range(2)]
        self.pending: list[Future[None] | None] = [None, None]
        self.current = 0
        self.inview = memoryview(self.buffers[0]).cast("B")
        self.in_addr = ctypes.addressof(self.buffers[0])
        self.in_fill = 0  # valid bytes in the current buffer
        self.retired = 0  # bytes at its start already handed to the hasher
        self.blob_read = 0
        self.eof = False
        self.spans = SpanHasher()
        self.hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash")

    def _retire(self, end: int) -> None:
        """Hand current-buffer bytes [retired, end) to the hashing thread."""
        if end > self.retired:
            job = self.hashing.submit(self.spans.feed, self.inview[self.retired : end])
            self.pending[self.current] = job
            self.retired = end

    def _fill(self, strm: ctypes.Structure, want: int) -> None:
        """Make at least `want` unconsumed input bytes available unless the blob ends first."""
        avail = int(strm.avail_in)
        if avail >= want or self.eof:
            return
        start = self.in_fill - avail
        self._retire(start)
        old = self.inview
        self.current ^= 1
        job = self.pending[self.current]
        if job is not None:
            job.result()  # the hasher is done with this buffer: it may be overwritten
            self.pending[self.current] = None
        self.inview = memoryview(self.buffers[self.current]).cast("B")
        self.in_addr = ctypes.addressof(self.buffers[self.current])
        if avail:
            self.inview[:avail] = old[start : self.in_fill]
        self.retired = 0
        fill = avail
        while fill < want and not self.eof:
            n = self.reader.readinto(self.inview[fill:])
            if not n:
                self.eof = True
                break
            fill += n
            self.blob_read += n
            if self.progress is not None:
                self.progress(self.blob_read)
        self.in_fill = fill
        strm.next_in = self.in_addr
        strm.avail_in = fill

    def _hash_results(self) -> tuple[str, tuple[SpanDigest, ...]]:
        """Hash the rest of the blob; return its sha256 and the span digests."""
        self._retire(self.in_fill)
        self.hashing.shutdown(wait=True)
        for job in self.pending:
            if job is not None:
                job.result()
        return self.spans.blob.hexdigest(), tuple(self.spans.finish())

    def run(self) -> BuildResult:
        started = time.perf_counter()
        strm = new_stream()
        ref = ctypes.byref(strm)
        self._fill(strm, 512)
        head = bytes(self.inview[: min(self.in_fill, 512)])
        kind = detect_format(head)
        if kind != "gzip":
            raise GzipFormatError(not_gzip_message(self.name, head))
        if self.lib.init(ref) != Z_OK:
            raise MemoryError("inflateInit2 failed")
        try:
            return self._loop(strm, ref, started)
        finally:
            self.lib.end(ref)
            self.hashing.shutdown(wait=True, cancel_futures=True)

    def _loop(self, strm: ctypes.Structure, ref: object, started: float) -> BuildResult:
        lib, span, sink = self.lib, self.span, self.sink
        out_total = WINDOW_SIZE + OUTPUT_SIZE
        outbuf = ctypes.create_string_buffer(out_total)  # zeroed: the first window is all zeros
        outview = memoryview(outbuf).cast("B")
        out_addr = ctypes.addressof(outbuf)
        pos = sink_from = WINDOW_SIZE
        totout = last_out = 0
        members = 0
        member_starts = [0]
        force = False
        checkpoints: list[Checkpoint] = []
        inflate = lib.inflate
        while True:
            if strm.avail_in == 0:
                self._fill(strm, 1)
                if strm.avail_in == 0:
                    raise GzipFormatError(
                        f"{self.name}: truncated gzip: the stream ends inside member {members + 1} "
                        f"after {self.blob_read} compressed bytes ({totout} bytes decompressed)"
                    )
            if pos == out_total:
                if sink is not None and pos > sink_from:
                    sink(outview[sink_from:pos])
                outview[:WINDOW_SIZE] = outview[pos - WINDOW_SIZE : pos]
                pos = sink_from = WINDOW_SIZE
            room = out_total - pos
            # Only the first block end past last_out + span can become a checkpoint, so
            # inflate freely (Z_NO_FLUSH, up to 1 MiB a call) until that threshold and stop
            # at each block end (Z_BLOCK) only beyond it: ~30x fewer calls than Z_BLOCK
            # everywhere, and the same checkpoints.
            free = last_out + span - totout
            if totout == 0 or force or free <= 0:
                flush = Z_BLOCK
            else:
                flush = Z_NO_FLUSH
                room = min(room, free)
            strm.next_out = out_addr + pos
            strm.avail_out = room
            rc = inflate(ref, flush)
            produced = room - strm.avail_out
            pos += produced
            totout += produced
            if rc == Z_STREAM_END:
                members += 1
                if not self._next_member(strm, members, totout):
                    break
                member_starts.append(totout)
                lib.reset(ref)
                force = self.every_member
                continue
            if rc != Z_OK and rc != Z_BUF_ERROR:
                consumed = self.blob_read - strm.avail_in
                msg = strm.msg.decode(errors="replace") if strm.msg else f"inflate error {rc}"
                raise GzipFormatError(
                    f"{self.name}: corrupt gzip data near compressed offset {consumed} "
                    f"(uncompressed {totout}): {msg}"
                )
            if flush != Z_BLOCK:
                continue
            data_type = strm.data_type
            # zlib.h: bit 7 = stopped at a block end (or after the gzip header), bit 6 = in the
            # last block, bits 0-2 = unused bits of the last input byte.
            if data_type & 128 and not data_type & 64 and force and checkpoints and (
                totout == last_out
            ):
                # A member start right after an empty member: a checkpoint at this
                # uncompressed offset exists (readers need both offsets to increase).
                force = False
            elif data_type & 128 and not data_type & 64 and (
                not checkpoints or totout - last_out > span or force
            ):
                consumed = self.blob_read - strm.avail_in
                window = bytes(outview[pos - WINDOW_SIZE : pos])
                checkpoints.append(Checkpoint(consumed, totout, data_type & 7, window))
                if len(checkpoints) > 1:
                    self.hashing.submit(self.spans.cut, consumed, data_type & 7)
                last_out = totout
                force = False
        if sink is not None and pos > sink_from:
            sink(outview[sink_from:pos])
        elapsed = time.perf_counter() - started
        # A checkpoint at the very end (an empty last member under --every-member) has no data
        # to resume into; erofs-utils never makes one since it stops at the end of the tar.
        while len(checkpoints) > 1 and checkpoints[-1].out_offset >= totout:
            checkpoints.pop()
        blob_sha256, digests = self._hash_results()
        index = GzipIndex(span=span, checkpoints=tuple(checkpoints))
        return BuildResult(index, self.blob_read, totout, blob_sha256, digests, members,
                           elapsed, self.lib.name, tuple(member_starts))

    def _next_member(self, strm: ctypes.Structure, members: int, totout: int) -> bool:
        """After a member's trailer: True if another member follows; False at a clean end.

        Trailing zero bytes are accepted (gzip(1) and Python's gzip skip them too);
        anything else after the last member is an error.
        """
        self._fill(strm, 2)
        avail = int(strm.avail_in)
        if avail == 0:
            return False
        start = self.in_fill - avail
        if avail >= 2 and self.inview[start] == 0x1F and self.inview[start + 1] == 0x8B:
            return True
        offset = self.blob_read - avail
        while True:
            chunk = self.inview[self.in_fill - avail : self.in_fill]
            if any(chunk):
                raise GzipFormatError(
                    f"{self.name}: trailing garbage after gzip member {members} at compressed "
                    f"offset {offset} ({totout} bytes decompressed)"
                )
            strm.avail_in = 0
            self._fill(strm, 1)
            avail = int(strm.avail_in)
            if avail == 0:
                return False
