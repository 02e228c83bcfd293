"""Span digests: the sha256 of each checkpoint span's compressed bytes, computed in the index
pass and checked before a span is decoded (VerifiedSource).

Span i covers blob bytes [start_i, end_i): start_0 = 0 (the gzip header included), start_i =
in_i - 1 when checkpoint i starts mid-byte (that byte's high bits are its first bits) else in_i,
end_i = in_{i+1}, and the last span ends at the blob's end. Neighbours may share one byte.
The extents are recorded with their digests, so a reader needs nothing else to check them.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SpanDigest:
    """A run of compressed blob bytes and its sha256 (hex)."""

    offset: int
    length: int
    sha256: str


class SpanHasher:
    """Hashes a blob's bytes, fed once and in order, into the whole-blob sha256 and one sha256
    per span. Span ends are announced with `cut` at checkpoint time, usually before their
    bytes arrive; a cut at exactly the bytes fed so far is handled too (the shared partial
    byte is remembered). Not thread-safe: call from one thread, in stream order."""

    def __init__(self) -> None:
        self.blob = hashlib.sha256()
        self.digests: list[SpanDigest] = []
        self._span = hashlib.sha256()
        self._start = 0
        self._fed = 0
        self._cuts: deque[tuple[int, int]] = deque()  # (end of this span, start of the next)
        self._last_byte = b""

    def cut(self, in_offset: int, bits: int) -> None:
        """Checkpoint at `in_offset`/`bits` (not checkpoint 0): the current span ends there."""
        start = in_offset - 1 if bits else in_offset
        if in_offset <= self._fed:
            # Everything up to the cut was already fed: only when it falls exactly here.
            self._close(in_offset, start)
            if start < in_offset:
                self._span.update(self._last_byte)
        else:
            self._cuts.append((in_offset, start))

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        base = self._fed
        self.blob.update(view)
        done = 0
        while self._cuts and self._cuts[0][0] <= base + len(view):
            end, start = self._cuts.popleft()
            self._span.update(view[done : end - base])
            done = end - base
            self._close(end, start)
            self._span.update(view[start - base : end - base])
        self._span.update(view[done:])
        self._fed = base + len(view)
        if len(view):
            self._last_byte = bytes(view[-1:])

    def finish(self) -> list[SpanDigest]:
        """Close the last span at the end of the blob; return every span's digest, in order."""
        self._close(self._fed, self._fed)
        return self.digests

    def _close(self, end: int, next_start: int) -> None:
        self.digests.append(SpanDigest(self._start, end - self._start, self._span.hexdigest()))
        self._span = hashlib.sha256()
        self._start = next_start
