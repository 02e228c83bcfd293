"""VerifiedSource: checks compressed blob bytes against the span digests of the zinfo sidecar
before anything above (GzipSource) decodes them. Sits above ChunkCacheSource, whose chunks it
drops when they fail (so bad bytes are refetched, never cached for good).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..errors import SourceIOError
from ..gzindex.spans import SpanDigest
from ..metrics.samples import Sample, counter, gauge
from ..source import ByteSource, Prefetching, check_range

log = logging.getLogger("hybrid_erofs.verify")


@runtime_checkable
class Invalidating(Protocol):
    """Optional capability of a cache: forget the bytes of a range (ChunkCacheSource)."""

    def invalidate(self, length: int, offset: int) -> None: ...


class VerifiedSource:
    """A ByteSource whose reads return only bytes that passed their span's sha256.

    A read fetches every span it touches whole (a span is one checkpoint's compressed bytes,
    about span/ratio), verifies it, and keeps the last `cache_spans` verified spans, since
    GzipSource reads a span in growing pieces. A mismatch raises SourceIOError (not
    transient) and logs the span: never unverified bytes. When `inner` is a cache
    (`Invalidating`), the span's cached bytes are dropped and fetched once more before
    giving up, so a bad copy in the cache (a flaky or tampering server, a bad disk) heals
    instead of failing every later read; bytes that fail twice are dropped again.

    Args:
        inner: the blob (usually the chunk cache); owned, closed by `close()`.
        spans: the sidecar's digests, covering [0, inner.size) in order.
        name: how messages name the blob (a digest or a path).
        cache_spans: verified spans kept in memory (default 8).
        cache_bytes: and at most this many bytes of them (default 16 MiB); the span being
            read is kept whatever its size.

    Thread-safe; concurrent readers of one span wait for a single fetch.
    """

    def __init__(self, inner: ByteSource, spans: Sequence[SpanDigest], *, name: str = "blob",
                 cache_spans: int = 8, cache_bytes: int = 16 << 20) -> None:
        if cache_spans < 1:
            raise ValueError(f"'cache_spans' must be >= 1 (got {cache_spans})")
        end = spans[-1].offset + spans[-1].length if spans else 0
        if end != inner.size:
            raise SourceIOError(
                f"{name}: span digests cover {end} bytes but the blob has {inner.size}"
            )
        self._inner = inner
        self._spans = list(spans)
        self._starts = [s.offset for s in spans]
        self._name = name
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_spans = cache_spans
        self._cache_bytes = cache_bytes
        self._held = 0
        self._lock = threading.Lock()
        self._span_locks = [threading.Lock() for _ in spans]
        self.verified_spans = 0  # statistics: spans fetched and checked
        self.failed_spans = 0  # statistics: fetches of a span that failed the check

    @property
    def size(self) -> int:
        return self._inner.size

    def metric_samples(self) -> list[Sample]:
        with self._lock:
            held = self._held
        return [counter("spans_verified", self.verified_spans,
                        "Compressed spans fetched and found to match their sha256"),
                counter("verification_failures", self.failed_spans,
                        "Fetches of a span whose bytes did not match its sha256"),
                gauge("verified_cache_bytes", held,
                      "Verified compressed spans kept in memory")]

    def release_memory(self) -> int:
        """Drop the verified spans kept in memory (Releasing); a read of one later fetches
        it from `inner` again and checks it again. Returns the bytes dropped."""
        with self._lock:
            dropped, self._held = self._held, 0
            self._cache.clear()
        return dropped

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if length == 0:
            return b""
        parts: list[bytes] = []
        end = offset + length
        # Neighbouring spans may share a byte; the later span serves it.
        number = bisect_right(self._starts, offset) - 1
        while offset < end:
            span = self._spans[number]
            data = self._verified(number)
            stop = min(end, span.offset + span.length)
            parts.append(data[offset - span.offset : stop - span.offset])
            offset = stop
            number += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def prefetch(self, length: int, offset: int) -> None:
        """Pass the prefetch on to `inner` (a cache): nothing is kept or trusted here until a
        read fetches the span and checks it."""
        check_range(self, length, offset)
        if isinstance(self._inner, Prefetching):
            self._inner.prefetch(length, offset)

    def _verified(self, number: int) -> bytes:
        with self._lock:
            data = self._cache.get(number)
            if data is not None:
                self._cache.move_to_end(number)
                return data
        with self._span_locks[number]:
            with self._lock:
                data = self._cache.get(number)
            if data is not None:
                return data
            span = self._spans[number]
            invalidating = isinstance(self._inner, Invalidating)
            for attempt in range(2 if invalidating else 1):
                data = self._inner.pread(span.length, span.offset)
                digest = hashlib.sha256(data).hexdigest()
                if digest == span.sha256:
                    break
                log.error("%s: span %d (bytes %d-%d) has sha256 %s, expected %s%s", self._name,
                          number, span.offset, span.offset + span.length - 1, digest,
                          span.sha256, "; fetching it again" if invalidating and not attempt
                          else "")
                self.failed_spans += 1
                if isinstance(self._inner, Invalidating):
                    self._inner.invalidate(span.length, span.offset)
            else:
                raise SourceIOError(
                    f"{self._name}: span {number} (compressed bytes {span.offset}-"
                    f"{span.offset + span.length - 1}) failed verification: sha256 {digest[:12]}... "
                    f"instead of {span.sha256[:12]}... (corrupt or tampered blob)", logged=True
                )
            self.verified_spans += 1
            with self._lock:
                self._cache[number] = data
                self._held += len(data)
                while len(self._cache) > 1 and (len(self._cache) > self._cache_spans
                                                or self._held > self._cache_bytes):
                    self._held -= len(self._cache.popitem(last=False)[1])
            return data

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._held = 0
        self._inner.close()
