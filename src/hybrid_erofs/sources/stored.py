"""StoredLayerSource: layer data served from its LayerStore where spans are stored, from the
GzipSource below otherwise; sits directly above GzipSource, whose completed spans it stores.
"""

from __future__ import annotations

import os

from ..errors import SourceIOError
from ..gzindex.source import GzipSource
from ..source import check_range
from .layerstore import LayerStore


class StoredLayerSource:
    """Layer data: stored spans read from local disk (and offered to exporters as a file
    range, FileRanged, for splice), the rest decoded by `inner` and stored as it completes
    whole spans.

    Args:
        inner: the GzipSource of the layer; owned, closed by `close()`. Its completed spans
            are handed to `store` from here on (its `on_span` hook).
        store: where decoded spans are kept; owned, flushed and closed by `close()`.

    Thread-safe.
    """

    def __init__(self, inner: GzipSource, store: LayerStore) -> None:
        if store.size != inner.size or store.span_count != len(inner.index.checkpoints):
            raise ValueError(f"layer store of {store.size} bytes in {store.span_count} spans "
                             f"does not fit a layer of {inner.size} bytes in "
                             f"{len(inner.index.checkpoints)} spans")
        self.inner = inner
        self.store = store
        inner.on_span = store.put

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if not self.store.has(length, offset):
            return self.inner.pread(length, offset)
        try:
            data = os.pread(self.store.fd, length, offset)
        except OSError as exc:
            raise SourceIOError(f"{self.store.directory}: read of {length} bytes at offset "
                                f"{offset} of the stored layer failed: {exc.strerror}") from exc
        if len(data) != length:
            return self.inner.pread(length, offset)  # the file was cut behind our back
        return data

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        check_range(self, length, offset)
        return (self.store.fd, offset) if self.store.has(length, offset) else None

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.store.close()


__all__ = ["StoredLayerSource"]
