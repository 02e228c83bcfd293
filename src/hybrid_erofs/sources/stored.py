"""StoredLayerSource: layer data served from its LayerStore where spans are stored, from the
GzipSource below otherwise; sits directly above GzipSource, whose completed spans it stores.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence

from ..errors import SourceIOError
from ..gzindex.source import GzipSource
from ..metrics.samples import Sample
from ..source import check_range
from .layerstore import LayerStore

# Stored bytes a sequential reader gets ahead of it in the page cache (posix_fadvise WILLNEED):
# splices from one fd shared by libfuse's threads, out of order, defeat the kernel's own
# readahead for the file.
READAHEAD = 16 << 20


class StoredLayerSource:
    """Layer data: stored spans read from local disk (and offered to exporters as a file
    range, FileRanged, for splice), the rest decoded by `inner` and, while `store_reads` is
    on, stored as it completes whole spans.

    Args:
        inner: the GzipSource of the layer; owned, closed by `close()`. Its completed spans
            are handed to `store` from here on (its `on_span` hook) while `store_reads` is on.
        store: where decoded spans are kept; owned, flushed and closed by `close()`.
        store_reads: store the spans decoded (default on). Off, the layer stays as lazy as
            its reads: a mount without background fetch writes no decoded data (what a full
            read of a 1.4 GB layer spent 14 % of its CPU on), still serves what is stored.

    Thread-safe.
    """

    def __init__(self, inner: GzipSource, store: LayerStore, *, store_reads: bool = True) -> None:
        if store.size != inner.size or store.span_count != len(inner.index.checkpoints):
            raise ValueError(f"layer store of {store.size} bytes in {store.span_count} spans "
                             f"does not fit a layer of {inner.size} bytes in "
                             f"{len(inner.index.checkpoints)} spans")
        self.inner = inner
        self.store = store
        self.store_reads = store_reads
        inner.on_span = self._keep
        inner.kept = store.serves
        self._starts = [cp.out_offset for cp in inner.index.checkpoints]
        self._lock = threading.Lock()
        # Spans in the order reads first touched them, with the monotonic time of that first
        # read (a prefetch profile is made of this); background fetches and decode-ahead do
        # not read through here.
        self._read_order: dict[int, float] = {}
        self._recent_ends: deque[int] = deque(maxlen=8)
        self._advised_end = 0
        self.progress: Callable[[], object] | None = None  # a BackgroundFetcher's progress()

    def _keep(self, number: int, data: Sequence[memoryview]) -> bool:
        """GzipSource's hook: a span decoded in full (and checked) goes to the store; True
        when the store serves it from now on."""
        return self.store_reads and self.store.put(number, data)

    def spans_read(self) -> list[int]:
        """Span numbers in the order reads first touched them."""
        with self._lock:
            return list(self._read_order)

    def first_reads(self) -> list[tuple[int, float]]:
        """(span, when: time.monotonic()) in the order reads first touched them."""
        with self._lock:
            return list(self._read_order.items())

    def _read_ahead(self, length: int, offset: int) -> None:
        """A stored read that continues a recent one: have the next READAHEAD bytes read
        from disk now, once per window."""
        end = offset + length
        with self._lock:
            sequential = offset in self._recent_ends
            self._recent_ends.append(end)
            if not sequential or end + READAHEAD // 2 <= self._advised_end:
                return
            start = max(end, self._advised_end)
            self._advised_end = end + READAHEAD
        if start < self.size:
            with contextlib.suppress(OSError):  # advice only
                os.posix_fadvise(self.store.fd, start, min(READAHEAD, self.size - start),
                                 os.POSIX_FADV_WILLNEED)

    def _note(self, length: int, offset: int) -> None:
        if length <= 0:
            return
        first = bisect_right(self._starts, offset) - 1
        last = bisect_right(self._starts, offset + length - 1) - 1
        order = self._read_order
        if first in order and last in order:
            return
        now = time.monotonic()
        with self._lock:
            for number in range(first, last + 1):
                order.setdefault(number, now)

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        self._note(length, offset)
        if not self._stored_any(length, offset):
            return self.inner.pread(length, offset)
        if self.store.has(length, offset):
            self._served(length, offset)
            try:
                data = os.pread(self.store.fd, length, offset)
            except OSError as exc:
                raise SourceIOError(f"{self.store.directory}: read of {length} bytes at offset "
                                    f"{offset} of the stored layer failed: {exc.strerror}") from exc
            if len(data) != length:
                return self.inner.pread(length, offset)  # the file was cut behind our back
            return data
        buffer = bytearray(length)
        self._fill(memoryview(buffer), offset)
        return bytes(buffer)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        check_range(self, len(buffer), offset)
        self._note(len(buffer), offset)
        self._fill(buffer, offset)

    def _stored_any(self, length: int, offset: int) -> bool:
        first = bisect_right(self._starts, offset) - 1
        last = bisect_right(self._starts, offset + length - 1) - 1
        return any(self.store.serves(number) for number in range(first, last + 1))

    def _fill(self, buffer: memoryview, offset: int) -> None:
        """Fill `buffer` with the layer data at `offset`: runs of stored spans from the store,
        the others decoded by `inner`, in order (a stored span is not in `inner`'s memory)."""
        end, done = offset + len(buffer), 0
        while offset < end:
            number = bisect_right(self._starts, offset) - 1
            stored = self.store.serves(number)
            stop = self._span_end(number)
            while stop < end and self.store.serves(number + 1) == stored:
                number += 1
                stop = self._span_end(number)
            stop = min(stop, end)
            piece = buffer[done : done + stop - offset]
            if not stored or not self._read_stored(piece, offset):
                self.inner.pread_into(piece, offset)
            done += stop - offset
            offset = stop

    def _read_stored(self, buffer: memoryview, offset: int) -> bool:
        """Read `buffer` from the store; False when the file came back short (cut behind our
        back: the caller decodes instead)."""
        self._served(len(buffer), offset)
        done = 0
        try:
            while done < len(buffer):
                got = os.preadv(self.store.fd, [buffer[done:]], offset + done)
                if got <= 0:
                    return False
                done += got
        except OSError as exc:
            raise SourceIOError(f"{self.store.directory}: read of {len(buffer)} bytes at "
                                f"offset {offset} of the stored layer failed: "
                                f"{exc.strerror}") from exc
        return True

    def _served(self, length: int, offset: int) -> None:
        """Stored bytes about to be read: the page cache gets those after them, and `inner`'s
        forward-reader tracking sees the read (its decode-ahead goes on past them)."""
        self._read_ahead(length, offset)
        self.inner.note_read(length, offset)

    def _span_end(self, number: int) -> int:
        return self._starts[number + 1] if number + 1 < len(self._starts) else self.size

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        check_range(self, length, offset)
        if not self.store.has(length, offset):
            return None
        self._note(length, offset)
        self._served(length, offset)
        return self.store.fd, offset

    def metric_samples(self) -> list[Sample]:
        """The background fetch of this layer (metrics.Reporting), when it has one."""
        from ..fetching.background import FetchProgress, progress_samples

        progress = self.progress() if self.progress is not None else None
        return progress_samples(progress) if isinstance(progress, FetchProgress) else []

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.store.close()


__all__ = ["StoredLayerSource"]
