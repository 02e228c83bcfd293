"""ProfileWarmup: the snapshotter fetches a layer's prefetch-profile spans into the chunk cache
while the layer's mount daemon starts (the snapshotter has the index files then; a daemon
needs most of a second before its own fetch begins, and the link would idle meanwhile).

Only compressed bytes, and under the chunk store's cross-process fetch locks: the daemon's own
fetch of the same spans finds them on disk or waits for them, never fetches them twice, and
checks them against the bound span digests when it decodes them, as any fetched bytes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ..device import RegistryOptions, open_registry_layer_blob
from ..errors import HybridErofsError
from ..gzindex.sidecar import load_sidecar, sidecar_path
from ..gzindex.spans import SpanDigest
from ..sources.chunkcache import ChunkCacheSource
from .profile import profile_spans

log = logging.getLogger(__name__)


class ProfileWarmup:
    """Fetch the spans a profile lists (in its order, `workers` at once) of blob `blob` of
    registry image `source` into the chunk cache of `registry`. start() runs it on a thread;
    stop() ends it after the spans in flight. Errors end it quietly (logged): the daemon
    fetches what is missing itself."""

    def __init__(self, source: str, blob: str, *, zinfo: Path, prefetch: Path,
                 registry: RegistryOptions, workers: int = 2) -> None:
        self.source = source
        self.blob = blob
        self.zinfo = zinfo
        self.prefetch = prefetch
        self.registry = replace(registry, blob=blob, layer=None, platform=None)
        self.workers = workers
        self.fetched = 0  # spans read through the cache (from the registry, or found there)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"warmup:{self.blob[:19]}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.join(timeout_s)

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the warm-up to end."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        try:
            ranges = self._ranges()
            if not ranges:
                return
            cache, _digest = open_registry_layer_blob(self.source, self.registry)
        except (HybridErofsError, OSError) as exc:
            log.info("%s: no warm-up of the prefetch profile: %s", self.blob, exc)
            return
        try:
            if not isinstance(cache, ChunkCacheSource):  # a local blob: nothing to fetch
                return
            with ThreadPoolExecutor(self.workers) as pool:
                for done in pool.map(lambda span: self._load(cache, span), ranges):
                    self.fetched += done
        except (HybridErofsError, OSError) as exc:
            log.info("%s: warm-up of the prefetch profile stopped: %s", self.blob, exc)
        finally:
            cache.close()

    def _ranges(self) -> Sequence[SpanDigest]:
        spans = profile_spans(self.prefetch, zinfo=self.zinfo)
        if not spans:
            return ()
        digests = load_sidecar(sidecar_path(self.zinfo)).spans
        return [digests[n] for n in dict.fromkeys(spans) if 0 <= n < len(digests)]

    def _load(self, cache: ChunkCacheSource, span: SpanDigest) -> int:
        if self._stop.is_set():
            return 0
        with cache.exact_reads():  # per thread: no readahead past the span
            cache.pread(span.length, span.offset)
        return 1


__all__ = ["ProfileWarmup"]
