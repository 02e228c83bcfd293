"""Chunk layout of a sparse tar member: holes as null chunks, data chunks pointing into the tar,
and the chunks neither can express copied into the meta (docs/tar.md, "Sparse files").

Used by the meta builder when the parser hands over a member with a sparse map.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 512
MIN_CHUNKBITS, MAX_CHUNKBITS = 9, 40     # 512 B .. 1 TiB chunks (chunk format bits 0..31)
INDEX_ENTRY = 8                          # struct erofs_inode_chunk_index
HOLE = -1                                # a null chunk: startblk_lo = EROFS_NULL_ADDR
# Data copied into the meta (chunks the tar cannot back): refused past these bounds.
MAX_COPY_PER_FILE = 4 << 20
MAX_COPY_PER_IMAGE = 64 << 20


@dataclass(frozen=True, slots=True)
class Copy:
    """A chunk whose bytes are copied into the meta: `length` bytes (block-padded in the
    meta), filled from the tar ranges (tar offset, length, offset in the chunk)."""

    chunk: int
    length: int
    pieces: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class SparseLayout:
    """How a sparse file's chunks map: `entries[k]` is a tar block (device 1), HOLE, or
    -(2 + i) for `copies[i]` (placed in the meta by the image writer)."""

    chunkbits: int
    entries: tuple[int, ...]
    copies: tuple[Copy, ...]

    @property
    def copied_bytes(self) -> int:
        return sum(-(-copy.length // BLOCK) * BLOCK for copy in self.copies)

    @property
    def meta_bytes(self) -> int:
        """What the file adds to the meta beyond its inode: chunk index plus copies."""
        return INDEX_ENTRY * len(self.entries) + self.copied_bytes


def _tar_offsets(data_offset: int, segments: tuple[tuple[int, int], ...]) -> list[int]:
    """Where each segment's bytes are in the tar: stored one after another."""
    out, at = [], data_offset
    for _, length in segments:
        out.append(at)
        at += length
    return out


def _copied(size: int, segments: tuple[tuple[int, int], ...], tar: list[int],
            chunkbits: int, *, interior: bool) -> tuple[set[int], int]:
    """The chunks that must be copied with 2^chunkbits chunks: the boundary ones as a set,
    plus the interior chunks of misaligned segments (a set only with `interior`, always
    counted).

    A chunk can point into the tar only when one segment covers all of it (up to the end of
    the file) and the segment's tar bytes for it start on a block boundary; a chunk no
    segment touches is a hole; every other chunk is copied.
    """
    chunk = 1 << chunkbits
    copied: set[int] = set()
    inner = 0
    for (offset, length), at in zip(segments, tar, strict=True):
        end = offset + length
        first, last = offset // chunk, (end - 1) // chunk
        aligned = (at - offset) % BLOCK == 0
        for number in (first, last):
            start, stop = number * chunk, min(number * chunk + chunk, size)
            if not (aligned and offset <= start and end >= stop):
                copied.add(number)
        if not aligned and last > first + 1:
            inner += last - first - 1
            if interior:
                copied.update(range(first + 1, last))
    return copied, inner


def _cost(size: int, segments: tuple[tuple[int, int], ...], tar: list[int],
          chunkbits: int) -> int:
    """Meta bytes of the layout with 2^chunkbits chunks: chunk index plus copies."""
    chunk = 1 << chunkbits
    copied, inner = _copied(size, segments, tar, chunkbits, interior=False)
    copy_bytes = sum(min(chunk, size - n * chunk) for n in copied) + inner * chunk
    return INDEX_ENTRY * -(-size // chunk) + copy_bytes


def plan_sparse(size: int, data_offset: int,
                segments: tuple[tuple[int, int], ...]) -> SparseLayout:
    """The layout with the fewest meta bytes (chunk index + copied chunks) over every chunk
    size from 512 B to 1 TiB."""
    tar = _tar_offsets(data_offset, segments)
    best: tuple[int, int] | None = None
    for chunkbits in range(MAX_CHUNKBITS, MIN_CHUNKBITS - 1, -1):
        index_bytes = INDEX_ENTRY * -(-size // (1 << chunkbits))
        if best is not None and index_bytes >= best[0]:
            break  # smaller chunks only make the index bigger
        cost = _cost(size, segments, tar, chunkbits)
        if best is None or cost <= best[0]:
            best = (cost, chunkbits)
    assert best is not None
    chunkbits = best[1]
    copied = _copied(size, segments, tar, chunkbits, interior=True)[0]
    chunk = 1 << chunkbits
    count = -(-size // chunk)
    entries = [HOLE] * count
    order = sorted(copied)
    slot = {number: index for index, number in enumerate(order)}
    pieces: dict[int, list[tuple[int, int, int]]] = {number: [] for number in order}
    for (offset, length), at in zip(segments, tar, strict=True):
        end = offset + length
        number = offset // chunk
        while number * chunk < end:
            start = number * chunk
            lo, hi = max(offset, start), min(end, start + chunk)
            if number in slot:
                pieces[number].append((at + lo - offset, hi - lo, lo - start))
            else:
                entries[number] = (at + start - offset) // BLOCK
            number += 1
    for number, index in slot.items():
        entries[number] = -(2 + index)
    copies = tuple(Copy(number, min(chunk, size - number * chunk), tuple(pieces[number]))
                   for number in order)
    return SparseLayout(chunkbits, tuple(entries), copies)
