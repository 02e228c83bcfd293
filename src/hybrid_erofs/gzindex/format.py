"""SOCI zinfo checkpoint files: read v1 and v2 (told apart by length, as SOCI and erofs-utils do), write v2.

v2 = <le32 count><le64 span> + count x (<le64 in><le64 out><u8 bits><32 KiB window>);
v1 is the same without checkpoint 0 (implied in=10, out=0, bits=0, zero window).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import IndexFormatError
from ..outfile import write_atomic

WINDOW_SIZE = 32768
HEADER = struct.Struct("<IQ")
TUPLE = struct.Struct("<QQB")
RECORD_SIZE = TUPLE.size + WINDOW_SIZE  # 32785
ZERO_WINDOW = bytes(WINDOW_SIZE)
# The smallest gzip header is 10 bytes, so a v1 file's implied first checkpoint sits there.
V1_FIRST_IN = 10


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A place to resume inflating: compressed `in_offset` (first full byte), `bits` unused
    high bits of byte `in_offset - 1`, uncompressed `out_offset`, and the 32 KiB of output
    before it (the deflate history)."""

    in_offset: int
    out_offset: int
    bits: int
    window: bytes


@dataclass(frozen=True, slots=True)
class GzipIndex:
    """Checkpoints of one gzip blob, sorted by both offsets. `version` is what was read (1 or 2)."""

    span: int
    checkpoints: tuple[Checkpoint, ...]
    version: int = 2

    def __len__(self) -> int:
        return len(self.checkpoints)

    def find(self, offset: int) -> int:
        """Index of the last checkpoint with out_offset <= offset."""
        cps = self.checkpoints
        lo, hi = 0, len(cps)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cps[mid].out_offset <= offset:
                lo = mid
            else:
                hi = mid
        return lo


def parse_index(data: bytes, *, name: str = "zinfo", blob_size: int | None = None,
                layer_size: int | None = None, strict: bool = True) -> GzipIndex:
    """Parse and validate a zinfo file's bytes; raise IndexFormatError naming `name` and numbers.

    `strict=False` is for zinfos of other tools: erofs-utils puts a checkpoint at every gzip
    member start, so empty members give several checkpoints at one uncompressed offset; the
    first of each such run is kept (decoding from it passes through the empty members) and
    the rest dropped, which is safe also when those were forged.
    """
    size = len(data)
    if size < HEADER.size:
        raise IndexFormatError(
            f"{name}: truncated zinfo: {size} bytes, the header alone is {HEADER.size}"
        )
    count, span = HEADER.unpack_from(data, 0)
    body = size - HEADER.size
    if body == count * RECORD_SIZE:
        version, stored = 2, count
    elif count >= 1 and body == (count - 1) * RECORD_SIZE:
        version, stored = 1, count - 1
    else:
        full, rest = divmod(body, RECORD_SIZE)
        what = "truncated zinfo" if rest else "checkpoint count does not match the file length"
        raise IndexFormatError(
            f"{name}: {what}: header says {count} checkpoint{'' if count == 1 else 's'}, "
            f"{size} bytes hold {full} whole records of {RECORD_SIZE} and {rest} bytes more"
        )
    if count == 0:
        raise IndexFormatError(f"{name}: zinfo has no checkpoints (it needs at least one at out=0)")
    checkpoints: list[Checkpoint] = []
    if version == 1:
        checkpoints.append(Checkpoint(V1_FIRST_IN, 0, 0, ZERO_WINDOW))
    view = memoryview(data)
    offset = HEADER.size
    for _ in range(stored):
        in_offset, out_offset, bits = TUPLE.unpack_from(data, offset)
        window = bytes(view[offset + TUPLE.size : offset + RECORD_SIZE])
        checkpoints.append(Checkpoint(in_offset, out_offset, bits, window))
        offset += RECORD_SIZE
    if not strict:
        kept = checkpoints[:1]
        for cp in checkpoints[1:]:
            if cp.out_offset != kept[-1].out_offset:
                kept.append(cp)
        checkpoints = kept
    index = GzipIndex(span=span, checkpoints=tuple(checkpoints), version=version)
    validate_index(index, name=name, blob_size=blob_size, layer_size=layer_size)
    return index


def validate_index(index: GzipIndex, *, name: str = "zinfo", blob_size: int | None = None,
                   layer_size: int | None = None) -> None:
    """Check the invariants a reader relies on; raise IndexFormatError otherwise.

    Both offsets strictly increase (two checkpoints at one uncompressed offset would make a
    read start decoding at the wrong place), compressed offsets lie inside the blob and
    uncompressed ones inside the layer data when their sizes are known, `bits` is 0..7.
    Forged windows at plausible offsets are not caught here: only binding (the sidecar's
    zinfo digest) or verification against the blob catch them (docs/security.md).
    """
    cps = index.checkpoints
    if not cps:
        raise IndexFormatError(f"{name}: zinfo has no checkpoints")
    if cps[0].out_offset != 0:
        raise IndexFormatError(
            f"{name}: first checkpoint is at uncompressed offset {cps[0].out_offset}, not 0"
        )
    previous: Checkpoint | None = None
    for number, cp in enumerate(cps):
        if not 0 <= cp.bits <= 7:
            raise IndexFormatError(f"{name}: checkpoint {number}: bits is {cp.bits}, at most 7")
        if cp.bits and cp.in_offset == 0:
            raise IndexFormatError(f"{name}: checkpoint {number}: bits {cp.bits} at compressed offset 0")
        if len(cp.window) != WINDOW_SIZE:
            raise IndexFormatError(
                f"{name}: checkpoint {number}: window is {len(cp.window)} bytes, not {WINDOW_SIZE}"
            )
        if previous is not None:
            if cp.in_offset <= previous.in_offset:
                raise IndexFormatError(
                    f"{name}: checkpoint {number}: compressed offset does not increase "
                    f"({previous.in_offset} -> {cp.in_offset})"
                )
            if cp.out_offset <= previous.out_offset:
                raise IndexFormatError(
                    f"{name}: checkpoint {number}: uncompressed offset does not increase "
                    f"({previous.out_offset} -> {cp.out_offset})"
                )
        if blob_size is not None and cp.in_offset >= blob_size:
            raise IndexFormatError(
                f"{name}: checkpoint {number}: compressed offset {cp.in_offset} "
                f"is past the end of the {blob_size}-byte blob"
            )
        if layer_size is not None and number and cp.out_offset >= layer_size:
            raise IndexFormatError(
                f"{name}: checkpoint {number}: uncompressed offset {cp.out_offset} "
                f"is past the end of the {layer_size} bytes of layer data"
            )
        previous = cp


def load_index(path: str | os.PathLike[str], *, blob_size: int | None = None,
               strict: bool = True) -> GzipIndex:
    """Read a zinfo file (v1 or v2) and validate it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise IndexFormatError(f"{path}: is a directory, not a zinfo file") from exc
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_index(data, name=str(path), blob_size=blob_size, strict=strict)


def dump_index(index: GzipIndex) -> bytes:
    """Serialise as zinfo v2 (every checkpoint, checkpoint 0 included)."""
    parts = [HEADER.pack(len(index.checkpoints), index.span)]
    for cp in index.checkpoints:
        parts.append(TUPLE.pack(cp.in_offset, cp.out_offset, cp.bits))
        parts.append(cp.window)
    return b"".join(parts)


def write_index(index: GzipIndex, path: str | os.PathLike[str]) -> None:
    """Write `index` as zinfo v2 to `path` atomically."""
    write_atomic(path, dump_index(index))
