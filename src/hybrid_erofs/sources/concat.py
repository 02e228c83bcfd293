"""ConcatSource: several ByteSources read back to back as one, and open_disk() (meta || layer data).

Sits directly below the exporter: the device the kernel mounts is `m.erofs || uncompressed tar`.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence

from ..errors import InvalidInput
from ..source import ByteSource, FileRanged, check_range, read_into

BLOCK = 512
PAGE = 4096  # the kernel's page: what it reads (and drops) of the device at a time
# erofs-tarindex.md §1.2 (superblock at byte 1024, little-endian) and §1.4 (device slot).
SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
INCOMPAT_DEVICE_TABLE = 0x8
INCOMPAT_48BIT = 0x80
_SB_END = SUPERBLOCK_OFFSET + 0x5A  # through devt_slotoff
SLOT_SIZE = 128


class ConcatSource:
    """The parts read one after another as a single ByteSource.

    Reads that straddle part boundaries are split and joined. Parts of size 0 are allowed.

    Args:
        parts: the sources, in order; owned, closed by `close()`.

    Thread-safe if every part is (no state besides the immutable offsets table).
    """

    def __init__(self, parts: Sequence[ByteSource]) -> None:
        self._parts = list(parts)
        self._starts: list[int] = []
        offset = 0
        for part in self._parts:
            self._starts.append(offset)
            offset += part.size
        self._size = offset

    @property
    def size(self) -> int:
        return self._size

    @property
    def parts(self) -> tuple[ByteSource, ...]:
        return tuple(self._parts)

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if length == 0:
            return b""
        # Last part starting at or before `offset` (skips empty parts sharing that start).
        index = bisect.bisect_right(self._starts, offset) - 1
        pieces: list[bytes] = []
        end = offset + length
        while offset < end:
            part, start = self._parts[index], self._starts[index]
            take = min(end, start + part.size) - offset
            if take > 0:
                pieces.append(part.pread(take, offset - start))
                offset += take
            index += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        length = len(buffer)
        check_range(self, length, offset)
        if length == 0:
            return
        index = bisect.bisect_right(self._starts, offset) - 1
        done = 0
        while done < length:
            part, start = self._parts[index], self._starts[index]
            take = min(length - done, start + part.size - offset)
            if take > 0:
                read_into(part, buffer[done : done + take], offset - start)
                offset += take
                done += take
            index += 1

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        """FileRanged pass-through, when the range lies in one file-backed part."""
        check_range(self, length, offset)
        index = bisect.bisect_right(self._starts, offset) - 1
        while index + 1 < len(self._parts) and self._parts[index].size == 0:
            index += 1
        part, start = self._parts[index], self._starts[index]
        if length == 0 or offset + length > start + part.size or not isinstance(part, FileRanged):
            return None
        return part.file_range(length, offset - start)

    def close(self) -> None:
        errors: list[BaseException] = []
        for part in self._parts:
            try:
                part.close()
            except BaseException as exc:  # close every part even if one fails
                errors.append(exc)
        if errors:
            raise errors[0]


class PinnedHeadSource:
    """`inner`, with its first `length` bytes kept in memory once a read has fetched them.

    The meta's last page holds the first bytes of the layer data too (the meta ends on a
    512-byte block, pages are 4 KiB): pinning them means metadata never needs the registry
    again once read, even when the kernel drops that page while the registry is down.
    Thread-safe if `inner` is; owns `inner`.
    """

    def __init__(self, inner: ByteSource, length: int) -> None:
        self.inner = inner
        self._length = min(length, inner.size)
        self._head: bytes | None = None

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        head = self._head
        if offset + length <= self._length:
            if head is None:
                head = self._head = self.inner.pread(self._length, 0)
            return head[offset : offset + length]
        return self.inner.pread(length, offset)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        length = len(buffer)
        if offset + length <= self._length:
            buffer[:] = self.pread(length, offset)
        else:
            check_range(self, length, offset)
            read_into(self.inner, buffer, offset)

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        check_range(self, length, offset)
        if isinstance(self.inner, FileRanged):
            return self.inner.file_range(length, offset)
        return None

    def close(self) -> None:
        self._head = None
        self.inner.close()


class ZeroSource:
    """`size` zero bytes (padding the device to whole 512-byte sectors). Thread-safe."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"'size' must be >= 0 (got {size})")
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        return bytes(length)

    def close(self) -> None:
        pass


def _device_slot(meta: ByteSource, name: str) -> tuple[int, int, int]:
    """Parse the meta's superblock and device slot: (block size, slot blocks, slot uniaddr)."""
    if meta.size % BLOCK:
        raise InvalidInput(
            f"{name}: size {meta.size} is not a multiple of {BLOCK} bytes: not a tar-index meta image"
        )
    if meta.size < _SB_END:
        raise InvalidInput(f"{name}: only {meta.size} bytes: too small for an EROFS superblock")
    sb = meta.pread(_SB_END - SUPERBLOCK_OFFSET, SUPERBLOCK_OFFSET)
    (magic,) = struct.unpack_from("<I", sb, 0x00)
    if magic != EROFS_MAGIC:
        raise InvalidInput(
            f"{name}: bad EROFS magic {magic:#010x} at offset {SUPERBLOCK_OFFSET} "
            f"(expected {EROFS_MAGIC:#010x})"
        )
    blkszbits = sb[0x0C]
    if not 9 <= blkszbits <= 16:
        raise InvalidInput(f"{name}: block size 2^{blkszbits} is not supported")
    (incompat,) = struct.unpack_from("<I", sb, 0x50)
    extra_devices, devt_slotoff = struct.unpack_from("<HH", sb, 0x56)
    if not incompat & INCOMPAT_DEVICE_TABLE or extra_devices == 0:
        raise InvalidInput(
            f"{name}: no device table: not a tar-index meta image (made by mkfs.erofs --tar=i?)"
        )
    if extra_devices != 1:
        raise InvalidInput(f"{name}: {extra_devices} extra devices; a tar-index meta has exactly 1")
    slot_offset = devt_slotoff * SLOT_SIZE
    if slot_offset + SLOT_SIZE > meta.size:
        raise InvalidInput(
            f"{name}: device slot at offset {slot_offset} is past the end ({meta.size} bytes)"
        )
    slot = meta.pread(SLOT_SIZE, slot_offset)
    blocks, uniaddr, blocks_hi, uniaddr_hi = struct.unpack_from("<IIHH", slot, 64)
    if incompat & INCOMPAT_48BIT:  # §1.4: the _hi halves count only in 48-bit images
        blocks |= blocks_hi << 32
        uniaddr |= uniaddr_hi << 32
    return 1 << blkszbits, blocks, uniaddr


def open_disk(meta: ByteSource, layer: ByteSource, *, name: str = "m.erofs") -> ConcatSource:
    """Check that `meta` is a tar-index image made for `layer`, then return `meta || layer`.

    Checks (before anything is served): meta size a multiple of 512, EROFS magic, one extra
    device whose slot says the tar starts right after the meta, and the layer data not shorter
    than the slot's block count. The device is padded with zeros to whole 512-byte sectors.
    The layer bytes that share the meta's last page are kept once read (PinnedHeadSource).

    Args:
        meta: the meta image; owned by the result.
        layer: the uncompressed layer data; owned by the result.
        name: how errors name the meta (its path).

    Raises:
        InvalidInput: the meta is not a tar-index image, or not one for a layer this size.
        The sources are not closed on error (the caller still owns them then).
    """
    block_size, blocks, uniaddr = _device_slot(meta, name)
    if uniaddr * block_size != meta.size:
        raise InvalidInput(
            f"{name}: device table says the layer starts at block {uniaddr} but the meta is "
            f"{meta.size // block_size} blocks"
        )
    # The slot counts tar blocks through the end-of-archive marker (mkfs: ceil(tar_end/512));
    # the layer data may run longer (record padding) but never shorter. Round the layer up to
    # whole blocks so a tar whose last member lacks its padding still passes.
    layer_blocks = -(-layer.size // block_size)
    if layer_blocks < blocks:
        raise InvalidInput(
            f"{name}: device table says the layer data has {blocks} blocks "
            f"({blocks * block_size} bytes) but it is only {layer.size} bytes"
        )
    head = -meta.size % PAGE
    parts: list[ByteSource] = [meta, PinnedHeadSource(layer, head) if head else layer]
    pad = -(meta.size + layer.size) % BLOCK
    if pad:
        parts.append(ZeroSource(pad))
    return ConcatSource(parts)


__all__ = ["ConcatSource", "PinnedHeadSource", "ZeroSource", "open_disk"]
