"""Pure-Python EROFS reader over ByteSources: superblock, inodes, directories, data, xattrs.

Sits above the meta image and the layer data (device 1); file data is read through the given
sources only, so a lazy source plugs in unchanged. Format: erofs-tarindex.md §1 and §6.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from hybrid_erofs.erofs.crc32c import crc32c
from hybrid_erofs.erofs.layout import (
    CHUNK_FORMAT_48BIT,
    CHUNK_FORMAT_BLKBITS_MASK,
    CHUNK_FORMAT_INDEXES,
    CHUNK_INDEX,
    COMPAT_SB_CHKSUM,
    DIRENT,
    DIRENT_SIZE,
    FT_MAX,
    INCOMPAT_FRAGMENTS,
    INCOMPAT_KNOWN,
    INCOMPAT_XATTR_PREFIXES,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    LAYOUT_NAMES,
    MAX_NAME,
    NULL_ADDR,
    SB_OFFSET,
    SB_SIZE,
    SLOT_SIZE,
    XATTR_ENTRY,
    XATTR_HEADER,
    XATTR_PREFIXES,
    Dirent,
    Extent,
    Inode,
    Superblock,
    decode_name,
    parse_inode,
    parse_superblock,
    parse_xattr_entry,
)
from hybrid_erofs.errors import ErofsFormatError, InvalidInput
from hybrid_erofs.source import ByteSource

MAX_SYMLINK = 4096       # PATH_MAX: the kernel never follows longer targets
MAX_SYMLINK_HOPS = 40    # Linux's MAXSYMLINKS


class ErofsImage:
    """Read an EROFS image: meta on `meta`, extra device k on `devices[k-1]` or inside `flat`.

    Args:
        meta: the metadata image (the primary device); owned, closed by `close()`.
        devices: sources of extra devices 1..n (device-1 block B is at B*block_size).
        flat: alternatively the whole concatenated disk (`meta || layer data`): device k block B
            is read at `(uniaddr_k + B) * block_size`, the kernel's flatdev mode.

    Every malformed structure raises ErofsFormatError naming the nid and offset; reading data
    of a device that was not given raises InvalidInput. Not thread-safe for `close()`; reads
    are as thread-safe as the sources.
    """

    def __init__(self, meta: ByteSource, *, devices: Sequence[ByteSource] = (),
                 flat: ByteSource | None = None) -> None:
        self._meta, self._devices, self._flat = meta, tuple(devices), flat
        self.superblock = self._load_superblock()
        if len(self._devices) > self.superblock.extra_devices:
            raise ErofsFormatError(f"meta image has {self.superblock.extra_devices} extra devices "
                               f"but {len(self._devices)} were given")
        self._long_prefixes = self._load_long_prefixes()
        self.root = self.inode(self.superblock.root_nid)
        if not self.root.is_dir:
            raise ErofsFormatError(f"root nid {self.root.nid}: not a directory "
                                   f"(mode 0{self.root.mode:o})")

    # -- sources ---------------------------------------------------------------------------

    @property
    def meta_size(self) -> int:
        return self._meta.size

    def close(self) -> None:
        closed: set[int] = set()
        for source in (self._meta, *self._devices, self._flat):
            if source is not None and id(source) not in closed:
                closed.add(id(source))
                source.close()

    def __enter__(self) -> ErofsImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta_bytes(self, length: int, offset: int, what: str) -> bytes:
        size = self._meta.size
        if offset < 0 or length < 0 or offset + length > size:
            raise ErofsFormatError(f"{what}: {length} bytes at offset {offset} are outside the "
                                   f"meta image (size {size})")
        return self._meta.pread(length, offset)

    def _load_superblock(self) -> Superblock:
        what = f"superblock at offset {SB_OFFSET}"
        raw = self._meta_bytes(SB_SIZE, SB_OFFSET, what)
        if struct.unpack_from("<I", raw)[0] != 0xE0F5E1E2:
            raise ErofsFormatError(f"{what}: bad magic 0x{struct.unpack_from('<I', raw)[0]:08x} "
                                   "(not an EROFS image)")
        blkszbits, extslots = raw[12], raw[13]
        if not 9 <= blkszbits <= 12:
            raise ErofsFormatError(f"{what}: unsupported block size 2^{blkszbits}")
        if SB_SIZE + 16 * extslots > (1 << 12) - SB_OFFSET:
            raise ErofsFormatError(f"{what}: {extslots} extension slots do not fit")
        checksum, compat = struct.unpack_from("<II", raw, 4)
        if compat & COMPAT_SB_CHKSUM:
            # §1.3: crc32c(seed ~0, no final xor) over the rest of the superblock's block
            # (512 B for 512-byte blocks) with the checksum field zeroed.
            block = 1 << blkszbits
            length = block - SB_OFFSET if block > SB_OFFSET else block
            buf = bytearray(self._meta_bytes(length, SB_OFFSET, f"{what}: checksum range"))
            buf[4:8] = bytes(4)
            computed = crc32c(buf)
            if computed != checksum:
                raise ErofsFormatError(f"{what}: checksum 0x{checksum:08x} does not match "
                                       f"the computed 0x{computed:08x}")
        incompat, extra_devices, devt_slotoff, dirblkbits = struct.unpack_from("<I2xHHB", raw, 0x50)
        if dirblkbits:
            raise ErofsFormatError(f"{what}: dirblkbits {dirblkbits} is not supported")
        if incompat & ~INCOMPAT_KNOWN:
            raise ErofsFormatError(f"{what}: unknown incompatible features "
                                   f"0x{incompat & ~INCOMPAT_KNOWN:x}")
        slots = b""
        if incompat & 0x8 and extra_devices:
            slots = self._meta_bytes(extra_devices * SLOT_SIZE, devt_slotoff * SLOT_SIZE,
                                     f"{what}: device table ({extra_devices} slots)")
        return parse_superblock(raw, slots)

    def _load_long_prefixes(self) -> tuple[bytes, ...]:
        sb = self.superblock
        if not (sb.feature_incompat & INCOMPAT_XATTR_PREFIXES and sb.xattr_prefix_count):
            return ()
        packed = None
        if sb.feature_incompat & INCOMPAT_FRAGMENTS and sb.packed_nid:
            packed = self.inode(sb.packed_nid)
        prefixes, offset = [], sb.xattr_prefix_start * 4
        for index in range(sb.xattr_prefix_count):
            what = f"long xattr prefix {index} at offset {offset}"

            def read(length: int, at: int, what: str = what) -> bytes:
                if packed is None:
                    return self._meta_bytes(length, at, what)
                data = self.read(packed, length, at)
                if len(data) != length:
                    raise ErofsFormatError(f"{what}: past the end of packed nid {packed.nid}")
                return data

            offset = -(-offset // 4) * 4
            length = struct.unpack("<H", read(2, offset))[0]
            payload = read(length, offset + 2)
            if not payload or payload[0] not in XATTR_PREFIXES:
                raise ErofsFormatError(f"{what}: bad base index")
            prefixes.append(XATTR_PREFIXES[payload[0]] + payload[1:])
            offset += 2 + length
        return tuple(prefixes)

    # -- inodes and data ------------------------------------------------------------------

    def inode(self, nid: int) -> Inode:
        """The inode `nid` (meta_blkaddr * block_size + nid * 32 in the meta image)."""
        sb = self.superblock
        offset = sb.meta_blkaddr * sb.block_size + nid * 32
        what = f"inode nid {nid} at offset {offset}"
        if nid < 0 or offset + 32 > self._meta.size:
            raise ErofsFormatError(f"{what}: outside the meta image (size {self._meta.size})")
        raw = self._meta.pread(min(64, self._meta.size - offset), offset)
        inode = parse_inode(raw, nid=nid, offset=offset, sb=sb)
        if inode.tail_offset > self._meta.size:
            raise ErofsFormatError(f"{what}: inode and xattrs ({inode.inode_size}+"
                                   f"{inode.xattr_size} bytes) run past the meta image")
        return inode

    def _map(self, inode: Inode, offset: int) -> Extent:
        """The extent holding logical byte `offset` (< size), as the kernel's erofs_map_blocks."""
        bs, nid = self.superblock.block_size, inode.nid
        if inode.layout in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE):
            tail = inode.layout == LAYOUT_FLAT_INLINE
            lastblk = -(-inode.size // bs) - tail
            if offset < lastblk * bs:
                return Extent(offset, lastblk * bs - offset, 0, inode.startblk * bs + offset)
            if not tail:
                raise ErofsFormatError(f"nid {nid}: offset {offset} beyond its blocks")
            physical = inode.tail_offset + offset % bs
            if inode.tail_offset % bs + inode.size - lastblk * bs > bs:
                raise ErofsFormatError(f"nid {nid}: inline data at offset {inode.tail_offset} "
                                       f"crosses a block boundary (tail {inode.size % bs} bytes)")
            return Extent(offset, inode.size - offset, 0, physical)
        if inode.layout != LAYOUT_CHUNK_BASED:
            raise ErofsFormatError(f"nid {nid}: {LAYOUT_NAMES[inode.layout]} layout "
                                   "(compressed data) is not supported")
        fmt = inode.raw_u & 0xFFFF
        chunkbits = self.superblock.blkszbits + (fmt & CHUNK_FORMAT_BLKBITS_MASK)
        unit = CHUNK_INDEX.size if fmt & CHUNK_FORMAT_INDEXES else 4
        chunknr = offset >> chunkbits
        at = -(-inode.tail_offset // unit) * unit + unit * chunknr
        raw = self._meta_bytes(unit, at, f"nid {nid}: chunk index {chunknr}")
        start = chunknr << chunkbits
        length = min(1 << chunkbits, inode.size - start) - (offset - start)
        if unit == 4:
            blk, device = struct.unpack("<I", raw)[0], 0
            hole = blk == NULL_ADDR
        else:
            hi, device_id, blk = CHUNK_INDEX.unpack(raw)
            hole = blk == NULL_ADDR and (not fmt & CHUNK_FORMAT_48BIT or hi == 0xFFFF)
            if fmt & CHUNK_FORMAT_48BIT:
                blk |= hi << 32
            device = device_id & self.superblock.device_id_mask
        if hole:
            return Extent(offset, length, None, 0)
        return Extent(offset, length, device, blk * bs + (offset - start))

    def extents(self, inode: Inode) -> Iterator[Extent]:
        """Every extent of `inode`'s data, in order (adjacent pieces are not merged)."""
        offset = 0
        while offset < inode.size:
            extent = self._map(inode, offset)
            if extent.length <= 0:
                raise ErofsFormatError(f"nid {inode.nid}: empty mapping at offset {offset}")
            yield extent
            offset += extent.length

    def device_source(self, device: int) -> tuple[ByteSource, int]:
        """(source, byte offset of the device's start in it) for an extra device >= 1."""
        sb = self.superblock
        if not 1 <= device <= len(sb.devices):
            raise ErofsFormatError(f"device id {device}: the image has {len(sb.devices)} "
                                   "extra devices")
        if device <= len(self._devices):
            return self._devices[device - 1], 0
        if self._flat is not None:
            return self._flat, sb.devices[device - 1].uniaddr * sb.block_size
        raise InvalidInput(f"device {device}: file data lives there but no layer was given")

    def _read_extent(self, nid: int, extent: Extent, length: int) -> bytes:
        if extent.device is None:
            return bytes(length)
        physical, bs = extent.physical, self.superblock.block_size
        if extent.device:
            source, base = self.device_source(extent.device)
        elif self._flat is not None:
            source, base = self._flat, 0
        elif physical + length <= self._meta.size or not self._devices:
            source, base = self._meta, 0
        else:
            # Non-flat multi-device: device-0 addresses past the meta fall into the slot
            # whose [uniaddr, uniaddr+blocks) range holds them (kernel erofs_map_dev).
            for number, slot in enumerate(self.superblock.devices[:len(self._devices)], 1):
                if slot.uniaddr * bs <= physical < (slot.uniaddr + slot.blocks) * bs:
                    source, base = self._devices[number - 1], -slot.uniaddr * bs
                    break
            else:
                source, base = self._meta, 0
        if physical < 0 or base + physical + length > source.size:
            raise ErofsFormatError(f"nid {nid}: {length} bytes at device {extent.device} offset "
                                   f"{physical} are outside the device (size {source.size - base})")
        return source.pread(length, base + physical)

    def read(self, inode: Inode, length: int, offset: int = 0) -> bytes:
        """Up to `length` bytes of `inode`'s data from `offset` (short only at end of file)."""
        if length < 0 or offset < 0:
            raise ValueError(f"read of {length} bytes at offset {offset}: negative argument")
        end, parts = min(inode.size, offset + length), []
        while offset < end:
            extent = self._map(inode, offset)
            take = min(extent.length, end - offset)
            if take <= 0:
                raise ErofsFormatError(f"nid {inode.nid}: empty mapping at offset {offset}")
            parts.append(self._read_extent(inode.nid, extent, take))
            offset += take
        return b"".join(parts)

    def iter_read(self, inode: Inode, *, piece: int = 1 << 20) -> Iterator[bytes]:
        """The whole file in pieces of at most `piece` bytes."""
        for offset in range(0, inode.size, piece):
            yield self.read(inode, piece, offset)

    # -- names ----------------------------------------------------------------------------

    def listdir(self, inode: Inode) -> list[Dirent]:
        """Every dirent of directory `inode`, `.` and `..` included, in on-disk order."""
        if not inode.is_dir:
            raise InvalidInput(f"nid {inode.nid}: not a directory")
        bs, nid, entries = self.superblock.block_size, inode.nid, []
        for start in range(0, inode.size, bs):
            size = min(inode.size - start, bs)
            block = self.read(inode, size, start)
            where = f"directory nid {nid} block at offset {start}"
            nameoff0 = struct.unpack_from("<H", block, 8)[0] if size >= DIRENT_SIZE else 0
            if nameoff0 < DIRENT_SIZE or nameoff0 >= size or nameoff0 % DIRENT_SIZE:
                raise ErofsFormatError(f"{where}: invalid de[0].nameoff {nameoff0}")
            count = nameoff0 // DIRENT_SIZE
            for index in range(count):
                child, nameoff, ftype, _ = DIRENT.unpack_from(block, index * DIRENT_SIZE)
                if index + 1 < count:
                    end = struct.unpack_from("<H", block, (index + 1) * DIRENT_SIZE + 8)[0]
                else:
                    nul = block.find(b"\0", nameoff, size)
                    end = size if nul < 0 else nul
                if not nameoff0 <= nameoff < end <= size or end - nameoff > MAX_NAME:
                    raise ErofsFormatError(f"{where}: bogus dirent {index} (nameoff {nameoff}, "
                                           f"name end {end}, block size {size})")
                name = block[nameoff:end]
                if ftype >= FT_MAX or b"/" in name:
                    raise ErofsFormatError(f"{where}: bogus dirent {index} (type {ftype}, "
                                           f"name {name!r})")
                entries.append(Dirent(decode_name(name), child, ftype))
        return entries

    def _child(self, directory: Inode, name: str, path: str) -> Inode:
        for entry in self.listdir(directory):
            if entry.name == name:
                return self.inode(entry.nid)
        raise InvalidInput(f"{path}: no such file or directory in the image")

    def lookup(self, path: str, *, follow_symlinks: bool = False) -> Inode:
        """The inode at `path` (relative to the image root); symlinks on the way are followed,
        the last component only with `follow_symlinks`."""
        parts, stack, hops = path.split("/"), [self.root], 0
        parts.reverse()
        while parts:
            name = parts.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            if not stack[-1].is_dir:
                raise InvalidInput(f"{path}: not a directory in the image")
            node = self._child(stack[-1], name, path)
            if node.is_symlink and (parts or follow_symlinks):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise InvalidInput(f"{path}: too many levels of symbolic links")
                target = self.readlink(node)
                if target.startswith("/"):
                    del stack[1:]
                parts.extend(reversed(target.split("/")))
                continue
            stack.append(node)
        return stack[-1]

    def walk(self, path: str = "/") -> Iterator[tuple[str, Inode]]:
        """(path, inode) for `path` and everything below it, depth first, dirent order.

        A directory reached twice (a loop or a hard-linked directory) is an ErofsFormatError.
        """
        top = "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
        start = self.lookup(top)
        yield top, start
        seen, pending = {start.nid}, [(top, start)]
        while pending:
            dirpath, directory = pending.pop()
            children = []
            for entry in self.listdir(directory):
                if entry.name in (".", ".."):
                    continue
                child = self.inode(entry.nid)
                childpath = dirpath.rstrip("/") + "/" + entry.name
                yield childpath, child
                if child.is_dir:
                    if child.nid in seen:
                        raise ErofsFormatError(f"directory nid {child.nid} reached twice "
                                               f"(again at {childpath}): directory loop")
                    seen.add(child.nid)
                    children.append((childpath, child))
            pending.extend(reversed(children))

    def readlink(self, inode: Inode) -> str:
        """The target of symlink `inode`."""
        if not inode.is_symlink:
            raise InvalidInput(f"nid {inode.nid}: not a symbolic link")
        if inode.size >= MAX_SYMLINK:
            raise ErofsFormatError(f"nid {inode.nid}: symlink target of {inode.size} bytes "
                                   f"exceeds PATH_MAX")
        return decode_name(self.read(inode, inode.size))

    # -- xattrs ---------------------------------------------------------------------------

    def xattrs(self, inode: Inode) -> dict[str, bytes]:
        """Inline and shared xattrs by full name; the first of duplicate names wins (kernel)."""
        if not inode.xattr_size:
            return {}
        at = inode.offset + inode.inode_size
        where = f"nid {inode.nid}: xattrs at offset {at}"
        body = self._meta_bytes(inode.xattr_size, at, where)
        if len(body) < XATTR_HEADER.size:
            raise ErofsFormatError(f"{where}: xattr area of {len(body)} bytes has no header")
        _, shared_count = XATTR_HEADER.unpack_from(body)
        position = XATTR_HEADER.size + 4 * shared_count
        if position > len(body):
            raise ErofsFormatError(f"{where}: {shared_count} shared xattr ids overflow the area")
        out: dict[str, bytes] = {}
        sb = self.superblock
        for number in range(shared_count):
            xid = struct.unpack_from("<I", body, XATTR_HEADER.size + 4 * number)[0]
            shared_at = sb.xattr_blkaddr * sb.block_size + xid * 4
            shared_where = f"nid {inode.nid}: shared xattr {xid} at offset {shared_at}"
            head = self._meta_bytes(XATTR_ENTRY.size, shared_at, shared_where)
            name_len, _, value_size = XATTR_ENTRY.unpack(head)
            entry = self._meta_bytes(XATTR_ENTRY.size + name_len + value_size, shared_at,
                                     shared_where)
            name, value, _ = parse_xattr_entry(entry, 0, shared_where, self._long_prefixes)
            out.setdefault(name, value)
        while position < len(body):
            name, value, size = parse_xattr_entry(body, position, where, self._long_prefixes)
            out.setdefault(name, value)
            position += size
        return out
