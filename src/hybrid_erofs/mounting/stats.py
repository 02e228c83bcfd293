"""What `status` shows of a mount: counters gathered from the stages of its device stack."""

from __future__ import annotations

import time
from typing import Any

from ..gzindex.source import GzipSource
from ..sources.chunkcache import ChunkCacheSource
from ..sources.metered import MeteredSource, iter_stages
from ..sources.verify import VerifiedSource


def collect_stats(device: MeteredSource) -> dict[str, Any]:
    """What `status` shows: reads served, errors, compressed bytes fetched, cache hit rate."""
    served = device.stats
    stats: dict[str, Any] = {"updated": time.time(), "reads": served.reads,
                             "bytes_served": served.bytes_served, "errors": served.errors,
                             "bytes_fetched": 0, "cache_hits": None, "cache_misses": None,
                             "hit_rate": None, "spans_verified": 0, "bytes_decoded": 0}
    fetched_by_gzip = 0
    for stage in iter_stages(device):
        if isinstance(stage, ChunkCacheSource):
            cache = stage.stats
            stats["bytes_fetched"] += cache.bytes_fetched
            stats["cache_hits"] = (stats["cache_hits"] or 0) + cache.hits
            stats["cache_misses"] = (stats["cache_misses"] or 0) + cache.misses
        elif isinstance(stage, GzipSource):
            fetched_by_gzip += stage.fetched_bytes
            stats["bytes_decoded"] += stage.decoded_bytes
        elif isinstance(stage, VerifiedSource):
            stats["spans_verified"] += stage.verified_spans
    if stats["cache_hits"] is None:
        stats["bytes_fetched"] = fetched_by_gzip  # a local layer: bytes read from the file
    else:
        total = stats["cache_hits"] + stats["cache_misses"]
        stats["hit_rate"] = stats["cache_hits"] / total if total else None
    return stats
