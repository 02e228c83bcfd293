"""ImageWarmup: the snapshotter fetches the prefetch-profile spans of an image's layers into the
chunk cache while their daemons start, in the container's first-read order across all layers
(`first_read_ms`), a few in flight in total; the daemons follow it (fetching/background.py).

Only compressed bytes, and under the chunk store's cross-process fetch locks: a daemon's own
fetch of the same spans finds them on disk or waits for them, never fetches them twice, and
checks them against the bound span digests when it decodes them, as any fetched bytes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ..device import RegistryOptions, open_registry_layer_blob
from ..errors import HybridErofsError
from ..gzindex.sidecar import load_sidecar, sidecar_path
from ..sources.chunkcache import ChunkCacheSource
from .profile import usable_profile

log = logging.getLogger(__name__)


class WarmTarget(Protocol):
    """Where a layer's spans are fetched into: a ChunkCacheSource."""

    def exact_reads(self) -> AbstractContextManager[None]: ...
    def pread(self, length: int, offset: int) -> bytes: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WarmSpan:
    """One span to fetch: when the container first read it (ms, or its place in its profile),
    its layer, and its compressed range."""

    at: float
    layer: str
    offset: int
    length: int


@dataclass(slots=True)
class _Layer:
    open: Callable[[], WarmTarget | None]
    remaining: int
    target: WarmTarget | None = None
    opened: bool = False
    dropped: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ImageWarmup:
    """The profile spans of one image's layers, fetched earliest first across layers with
    `workers` in flight in total. add() a layer when its index files are here (a layer added
    later slots its spans in by time); the threads end when nothing is left. Errors end a
    layer's warm-up quietly (logged): its daemon fetches what is missing itself. Thread-safe."""

    def __init__(self, *, workers: int = 2, name: str = "image") -> None:
        self.workers = workers
        self.name = name
        self.order: list[WarmSpan] = []  # spans in the order they were started (tests)
        self.fetched = 0  # spans read through the caches (from the registry, or found there)
        self._heap: list[tuple[float, int, WarmSpan, _Layer]] = []
        self._seq = itertools.count()
        self._layers: dict[str, _Layer] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def add(self, layer: str, spans: Sequence[WarmSpan],
            open_target: Callable[[], WarmTarget | None]) -> None:
        """Queue `layer`'s spans; `open_target` opens its cache when its first span is due
        (None: nothing to fetch, a local blob)."""
        if not spans:
            return
        entry = _Layer(open_target, len(spans))
        with self._lock:
            self._layers[layer] = entry
            for span in spans:
                heapq.heappush(self._heap, (span.at, next(self._seq), span, entry))
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"warmup:{self.name[:19]}")
                self._threads.append(thread)
                thread.start()

    def drop(self, layer: str) -> None:
        """Fetch nothing more of `layer` (its mount failed); spans in flight finish."""
        with self._lock:
            entry = self._layers.get(layer)
            if entry is not None:
                entry.dropped = True

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the queued spans (those added so far) to be fetched."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._heap:
                    return
                _at, _seq, span, entry = heapq.heappop(self._heap)
                if not entry.dropped:
                    self.order.append(span)
            if not entry.dropped:
                self._fetch(span, entry)
            self._done(span.layer, entry)

    def _fetch(self, span: WarmSpan, entry: _Layer) -> None:
        try:
            with entry.lock:
                if not entry.opened:
                    entry.opened = True
                    entry.target = entry.open()
                target = entry.target
            if target is None:
                return
            with target.exact_reads():  # per thread: no readahead past the span
                target.pread(span.length, span.offset)
            with self._lock:
                self.fetched += 1
        except (HybridErofsError, OSError) as exc:
            log.info("%s: warm-up of the prefetch profile stopped: %s", span.layer, exc)
            entry.dropped = True
        except Exception as exc:  # a bug must not end the other layers' warm-up
            log.error("%s: warm-up of the prefetch profile stopped: %r", span.layer, exc,
                      exc_info=True)
            entry.dropped = True

    def _done(self, layer: str, entry: _Layer) -> None:
        with self._lock:
            entry.remaining -= 1
            last = entry.remaining == 0
            if last and self._layers.get(layer) is entry:
                del self._layers[layer]
        if last and entry.target is not None:
            entry.target.close()


def profile_warm_spans(blob: str, *, zinfo: Path, prefetch: Path) -> list[WarmSpan]:
    """The compressed ranges of the spans `prefetch` lists, each with its first-read time
    (none when the profile does not number the spans of `zinfo`)."""
    profile = usable_profile(prefetch, zinfo=zinfo)
    if profile is None:
        return []
    digests = load_sidecar(sidecar_path(zinfo)).spans
    seen: set[int] = set()
    spans = []
    for at, number in profile.timed():
        if 0 <= number < len(digests) and number not in seen:
            seen.add(number)
            spans.append(WarmSpan(at, blob, digests[number].offset, digests[number].length))
    return spans


def registry_target(source: str, blob: str,
                    registry: RegistryOptions) -> Callable[[], WarmTarget | None]:
    """Opens the chunk cache of blob `blob` of registry image `source` (None: a local blob)."""
    def open_target() -> WarmTarget | None:
        cache, _digest = open_registry_layer_blob(
            source, replace(registry, blob=blob, layer=None, platform=None))
        if isinstance(cache, ChunkCacheSource):
            return cache
        cache.close()
        return None
    return open_target


__all__ = ["ImageWarmup", "WarmSpan", "WarmTarget", "profile_warm_spans", "registry_target"]
