"""Serialise a Tree into an EROFS tar-index meta image (erofs-tarindex.md §1 and §4, pass 2).

512-byte blocks; regular files are chunk-indexed into device #1 (the tar that follows the meta).
"""

from __future__ import annotations

import bisect
import stat
import struct

from hybrid_erofs.erofs.crc32c import crc32c
from hybrid_erofs.erofs.tree import Node, split_xattr_name
from hybrid_erofs.errors import TarFormatError

BLOCK = 512
EROFS_MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
SLOT_OFFSET = 1152          # device slot #1: devt_slotoff 9 * 128
FIRST_INODE = 1280          # after superblock + one device slot (§1.1)
COMPAT_SB_CHKSUM = 0x1
COMPAT_MTIME = 0x2
INCOMPAT_DEVICE_TABLE = 0x8
LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED = 0, 2, 4
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFFFFFF
MAX_TAR_SIZE = 1 << 41      # 2^32 blocks of 512 B; beyond needs the 48-bit layout (§2)

_SB = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQBBHIQQ")
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
_DIRENT = struct.Struct("<QHBB")
_CHUNK_INDEX = struct.Struct("<HHI")
_XATTR_ENTRY = struct.Struct("<BBH")
_XATTR_HEADER = bytes(12)   # h_name_filter = 0 (compat XATTR_FILTER clear), no shared xattrs

_FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
               stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}


def xattr_body(xattrs: dict[bytes, bytes]) -> bytes:
    """Inline xattr ibody (§1.7); entries in mkfs order (name + NUL + value)."""
    if not xattrs:
        return b""
    parts = [_XATTR_HEADER]
    for name, value in sorted(xattrs.items(), key=lambda kv: kv[0] + b"\0" + kv[1]):
        index, suffix = split_xattr_name(name)
        entry = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        parts.append(entry + bytes(-len(entry) % 4))
    return b"".join(parts)


def dir_blocks(names: list[bytes]) -> list[list[bytes]]:
    """Pack byte-sorted names into 512-byte dir blocks: 12-byte dirent + name each (§1.6)."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in names:
        need = 12 + len(name)
        if used + need > BLOCK:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


class _Plan:
    """Per-inode layout decisions, made before nids are known."""

    __slots__ = ("blocks", "data", "extended", "layout", "names", "nid", "nlink", "node",
                 "startblk", "tail", "xbody")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.nlink = 0
        self.nid = 0
        self.startblk = NULL_ADDR
        self.names: list[bytes] = []
        self.blocks: list[list[bytes]] = []
        self.data = b""
        self.tail = 0
        self.layout = LAYOUT_FLAT_PLAIN
        self.extended = False
        self.xbody = b""


class ImageWriter:
    """Lays out and writes the meta image for one finished Tree.

    Args:
        epoch: superblock build time (compact inodes carry this mtime).
        uuid: 16 bytes. volume_label: up to 16 bytes (from a tar 'V' header).
        tar_size: bytes of layer data (the device slot's block count).
    """

    def __init__(self, root: Node, *, epoch: int, uuid: bytes, volume_label: bytes,
                 tar_size: int) -> None:
        if len(uuid) != 16:
            raise ValueError(f"'uuid' must be 16 bytes (got {len(uuid)})")
        if tar_size > MAX_TAR_SIZE:
            raise TarFormatError(
                f"tar: {tar_size} bytes exceeds {MAX_TAR_SIZE} (2 TiB); 48-bit EROFS images "
                "are not supported"
            )
        self._root = root
        self._epoch = epoch
        self._uuid = uuid
        self._label = volume_label[:16]
        self._tar_size = tar_size
        self.inodes = 0

    def _order(self) -> list[_Plan]:
        """BFS from the root, children in byte order, each inode once; counts links."""
        plans = [_Plan(self._root)]
        index = {id(self._root): 0}
        for plan in plans:  # grows while iterating: BFS
            children = plan.node.children
            if children is None:
                continue
            keys = sorted(children)
            plan.names = names = keys.copy()
            bisect.insort(names, b".")
            bisect.insort(names, b"..")
            subdirs = 0
            for name in keys:
                child = children[name]
                slot = index.get(id(child))
                if slot is None:
                    slot = index[id(child)] = len(plans)
                    plans.append(_Plan(child))
                plans[slot].nlink += 1
                if child.children is not None:
                    subdirs += 1
            plan.nlink = 2 + subdirs
        return plans

    def _decide(self, plan: _Plan) -> int:
        """Choose inode format and data layout; return the inode slot size in bytes."""
        node = plan.node
        plan.xbody = xattr_body(node.xattrs)
        size = node.size
        if node.children is not None:
            plan.blocks = dir_blocks(plan.names)
            size = BLOCK * (len(plan.blocks) - 1) + sum(12 + len(n) for n in plan.blocks[-1])
            node.size = size
        # Compact only when nothing is lost (§1.5; unlike mkfs we also require nsec == 0).
        plan.extended = not (node.uid <= 0xFFFF and node.gid <= 0xFFFF
                             and plan.nlink <= 0xFFFF and size <= 0xFFFFFFFF
                             and node.mtime == self._epoch and node.nsec == 0)
        head = (64 if plan.extended else 32) + len(plan.xbody)
        fmt = node.mode & 0o170000
        if fmt == stat.S_IFREG and size > 0:
            plan.layout = LAYOUT_CHUNK_BASED
            chunkbits = min(40, max(9, (size - 1).bit_length()))
            count = -(-size // (1 << chunkbits))
            return -(-head // 8) * 8 + 8 * count
        if fmt in (stat.S_IFDIR, stat.S_IFLNK) and size > 0:
            tail = size % BLOCK
            if tail and head + tail <= BLOCK:
                plan.layout, plan.tail = LAYOUT_FLAT_INLINE, tail
                return head + tail
        return head

    def build(self) -> bytes:
        """Return the whole meta image; its length is blocks_lo * 512."""
        plans = self._order()
        self.inodes = len(plans)
        offset = FIRST_INODE
        for plan in plans:
            slot = self._decide(plan)
            if plan.tail:
                head = slot - plan.tail
                # The inline tail must not cross a block boundary (§1.8).
                if (offset + head) % BLOCK + plan.tail > BLOCK:
                    offset = -(-offset // BLOCK) * BLOCK
            plan.nid = offset // 32
            offset += -(-slot // 32) * 32
        if plans[0].nid > 0xFFFF:
            raise AssertionError("root nid must fit rootnid_2b")
        block = -(-offset // BLOCK)
        for plan in plans:
            node = plan.node
            if plan.layout == LAYOUT_CHUNK_BASED or node.size == 0:
                continue
            full = node.size // BLOCK if plan.tail else -(-node.size // BLOCK)
            if full:
                plan.startblk = block
                block += full
        meta_blocks = block
        image = bytearray(meta_blocks * BLOCK)
        nids = {id(plan.node): plan.nid for plan in plans}
        for ino, plan in enumerate(plans, 1):
            self._write_inode(image, plan, ino, nids)
        self._write_super(image, plans[0].nid, len(plans), meta_blocks)
        return bytes(image)

    def _dir_data(self, plan: _Plan, nids: dict[int, int]) -> bytes:
        node = plan.node
        assert node.children is not None and node.parent is not None
        out = bytearray()
        for names in plan.blocks:
            start = len(out)
            nameoff = 12 * len(names)
            for name in names:
                if name == b".":
                    child, ftype = node, 2
                elif name == b"..":
                    child, ftype = node.parent, 2
                else:
                    child = node.children[name]
                    ftype = _FILE_TYPES.get(child.mode & 0o170000, 0)
                out += _DIRENT.pack(nids[id(child)], nameoff, ftype, 0)
                nameoff += len(name)
            out += b"".join(names)
            if names is not plan.blocks[-1]:
                out += bytes(BLOCK - (len(out) - start))
        return bytes(out)

    def _write_inode(self, image: bytearray, plan: _Plan, ino: int,
                     nids: dict[int, int]) -> None:
        node = plan.node
        fmt = node.mode & 0o170000
        i_u = 0
        data = b""
        if fmt == stat.S_IFDIR:
            data = self._dir_data(plan, nids)
        elif fmt == stat.S_IFLNK:
            data = node.target
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = node.rdev
        if plan.layout == LAYOUT_CHUNK_BASED:
            chunkbits = min(40, max(9, (node.size - 1).bit_length()))
            i_u = CHUNK_FORMAT_INDEXES | (chunkbits - 9)
        elif data:
            i_u = plan.startblk
            full = len(data) - plan.tail
            if full:
                start = plan.startblk * BLOCK
                image[start:start + full] = data[:full]
        iloc = plan.nid * 32
        i_format = int(plan.extended) | (plan.layout << 1)
        icount = (len(plan.xbody) - 12) // 4 + 1 if plan.xbody else 0
        if plan.extended:
            _EXTENDED.pack_into(image, iloc, i_format, icount, node.mode & 0xFFFF, 0, node.size,
                                i_u, ino, node.uid, node.gid, node.mtime, node.nsec, plan.nlink)
            head = iloc + 64
        else:
            _COMPACT.pack_into(image, iloc, i_format, icount, node.mode & 0xFFFF, plan.nlink,
                               node.size, 0, i_u, ino, node.uid, node.gid, 0)
            head = iloc + 32
        image[head:head + len(plan.xbody)] = plan.xbody
        head += len(plan.xbody)
        if plan.tail:
            image[head:head + plan.tail] = data[len(data) - plan.tail:]
        elif plan.layout == LAYOUT_CHUNK_BASED:
            head = -(-head // 8) * 8
            chunk_blocks = 1 << (i_u & 0x1F)
            first = node.data_offset // BLOCK
            for k in range(-(-node.size // (chunk_blocks * BLOCK))):
                _CHUNK_INDEX.pack_into(image, head + 8 * k, 0, 1, first + k * chunk_blocks)

    def _write_super(self, image: bytearray, root_nid: int, inodes: int,
                     meta_blocks: int) -> None:
        _SB.pack_into(
            image, SB_OFFSET, EROFS_MAGIC, 0, COMPAT_SB_CHKSUM | COMPAT_MTIME, 9, 0, root_nid,
            inodes, self._epoch, 0, meta_blocks, 0, 0, self._uuid,
            self._label.ljust(16, b"\0"), INCOMPAT_DEVICE_TABLE, 0, 1, SLOT_OFFSET // 128,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        )
        # Device slot #1: the tar, which starts right after the meta in flat mode (§1.4).
        struct.pack_into("<II", image, SLOT_OFFSET + 64, -(-self._tar_size // BLOCK),
                         meta_blocks)
        # crc covers [1024, 1536) with the checksum field zeroed; computed last (§1.3).
        struct.pack_into("<I", image, SB_OFFSET + 4, crc32c(image[SB_OFFSET:SB_OFFSET + BLOCK]))
