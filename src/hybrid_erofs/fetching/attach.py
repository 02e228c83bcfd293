"""Attach a BackgroundFetcher to a mounted layer's device stack (mounting/layer.py calls this):
find the stored layer and the chunk cache (the cache limit) in the stack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext

from ..gzindex.source import GzipSource
from ..sources.chunkcache import ChunkCacheSource
from ..sources.metered import MeteredSource, iter_stages
from ..sources.stored import StoredLayerSource
from .background import BackgroundFetcher, FetchPolicy, blob_ranges

log = logging.getLogger(__name__)


def cache_limit_reason(cache: ChunkCacheSource | None, layer: StoredLayerSource) -> str | None:
    """Why the cache cannot hold this layer in full (compressed chunks plus decoded data,
    within `cache.room`, what eviction keeps of the limit), or None: fetching on would only
    push other layers out and still not fit."""
    if cache is None or cache.room is None:
        return None
    needed = cache.size + layer.size
    if needed <= cache.room:
        return None
    return (f"the cache limit ({cache.max_bytes} bytes, of which eviction keeps {cache.room}) "
            f"cannot hold this layer in full ({cache.size} bytes of blob + {layer.size} bytes "
            f"of layer data); it stays lazy")


def attach_fetcher(device: MeteredSource, *, policy: FetchPolicy,
                   verify: Callable[[], None] | None = None, first: Sequence[int] = (),
                   on_failure: Callable[[str], None] | None = None,
                   name: str = "layer",
                   before_rest: Callable[[], object] | None = None) -> BackgroundFetcher | None:
    """A fetcher (not started) for the layer under `device`; None when the layer has no
    store to fill (a local file, an index without a sidecar, or an unbound index: its
    decoded spans are kept out of the shared store). `verify` checks the complete layer
    (LayerMount: trust/verifier.py) and raises to fail it; `before_rest` runs before the
    spans after the quiet period (BackgroundFetcher)."""
    stages = list(iter_stages(device))
    layer = next((s for s in stages if isinstance(s, StoredLayerSource)), None)
    if layer is None:
        return None
    cache = next((s for s in stages if isinstance(s, ChunkCacheSource)), None)
    gzip = next((s for s in stages if isinstance(s, GzipSource)), None)
    fetcher = BackgroundFetcher(layer, policy=policy, first=first,
                                activity=lambda: device.stats.reads, verify=verify,
                                on_failure=on_failure,
                                limit=lambda: cache_limit_reason(cache, layer), name=name,
                                exact=cache.exact_reads if cache is not None else nullcontext,
                                held=gzip.ahead_held if gzip is not None else nullcontext,
                                before_rest=before_rest,
                                present=_present(cache, blob_ranges(layer))
                                if cache is not None else None)
    layer.progress = fetcher.progress  # reported with the layer's metrics
    return fetcher


def _present(cache: ChunkCacheSource,
             ranges: list[tuple[int, int]]) -> Callable[[int], bool]:
    """Span number -> its compressed bytes are in `cache` (what a followed warm-up brings)."""
    def present(number: int) -> bool:
        offset, length = ranges[number]
        return cache.holds(length, offset)
    return present


__all__ = ["attach_fetcher", "cache_limit_reason"]
