"""What `status` shows of a mount: the daemon's metrics (metrics/) as a dict, asked live from the
daemon over a unix socket (StatsServer, query_stats), or the last copy it wrote to its stats file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..metrics import DaemonMetrics, Sample, as_dict, gauge, stack_samples
from ..sources.cachedir import scan_blobs
from ..sources.chunkcache import ChunkCacheSource
from ..sources.metered import iter_stages

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 2.0


def _status_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The names `status` has always shown, from the metrics' values."""
    hits, misses = values.get("chunk_cache_hits"), values.get("chunk_cache_misses")
    fetched = values.get("fetched_bytes", values.get("gzip_input_bytes", 0))
    lookups = (hits or 0) + (misses or 0)
    return {"reads": int(values.get("reads", 0)), "bytes_served": int(values.get("read_bytes", 0)),
            "errors": int(values.get("read_errors", 0)), "bytes_fetched": int(fetched),
            "cache_hits": None if hits is None else int(hits),
            "cache_misses": None if misses is None else int(misses),
            "hit_rate": (hits or 0) / lookups if lookups else None,
            "spans_verified": int(values.get("spans_verified", 0)),
            "bytes_decoded": int(values.get("decoded_bytes", 0))}


def collect_stats(device: object) -> dict[str, Any]:
    """One layer's stack as `status` shows it: reads served, errors (EIO), compressed bytes
    fetched, cache hit rate, and every other value its stages report."""
    values = as_dict(stack_samples(device))
    return {"updated": time.time(), **values, **_status_fields(values)}


def collect_image_stats(devices: Sequence[object]) -> dict[str, Any]:
    """collect_stats() summed over the layers, each layer's own under "layers" (bottom first)."""
    metrics = DaemonMetrics()
    for n, device in enumerate(devices):
        metrics.add_layer(str(n), device)
    return daemon_stats(metrics)


def daemon_stats(metrics: DaemonMetrics) -> dict[str, Any]:
    """A daemon's metrics as `status` shows them: totals, daemon-wide values (memory, cache
    size) and, under "layers", each layer's own."""
    snapshot = metrics.snapshot()
    snapshot["layers"] = [{**layer, **_status_fields(layer)} for layer in snapshot["layers"]]
    return {**snapshot, **_status_fields(snapshot)}


def cache_samples(metrics: DaemonMetrics) -> list[Sample]:
    """The chunk cache directories the daemon's layers use, as daemon-wide samples: their
    size on disk (a directory scan, at scrape time) and their limit."""
    limits: dict[Path, int | None] = {}
    for stack in metrics.stacks():
        for stage in iter_stages(stack):
            if isinstance(stage, ChunkCacheSource):
                limits[stage.cache_dir] = stage.max_bytes
    size = sum(blob.disk_bytes for cache_dir in limits for blob in scan_blobs(cache_dir,
                                                                               count=False))
    if not limits:
        return []
    return [gauge("chunk_cache_size_bytes", size, "Bytes the chunk cache directory holds"),
            gauge("chunk_cache_limit_bytes", sum(limit or 0 for limit in limits.values()),
                  "Size limit of the chunk cache directory (0: none)")]


class StatsServer:
    """Answers each connection on a unix socket with `stats()` as one JSON line, from a
    daemon thread until `close()`: `status` then shows counters as they are now."""

    def __init__(self, path: Path, stats: Callable[[], dict[str, Any]]) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead daemon's socket
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    data = json.dumps(outer._stats(), sort_keys=True).encode() + b"\n"
                except Exception:  # a stage failing to report must not kill the server
                    log.exception("collecting stats failed")
                    data = b"{}\n"
                with contextlib.suppress(OSError):
                    self.request.sendall(data)

        self._stats = stats
        self.path = path
        old_umask = os.umask(0o177)  # the socket is the owner's only (0600)
        try:
            with _short_path(path) as address:
                self._server = socketserver.ThreadingUnixStreamServer(address, Handler)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="stats",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """`path` spelt through /proc/self/fd, so that a socket deep in a long directory still fits
    in sun_path (108 bytes)."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def query_stats(path: Path, *, timeout_s: float = QUERY_TIMEOUT_S) -> dict[str, Any] | None:
    """The stats a daemon answers on `path` now, or None (no daemon there, or no answer)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, \
                _short_path(path) as address:
            sock.settimeout(timeout_s)
            sock.connect(address)
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        loaded = json.loads(data)
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) and loaded else None


__all__ = ["StatsServer", "cache_samples", "collect_image_stats", "collect_stats",
           "daemon_stats", "query_stats"]
