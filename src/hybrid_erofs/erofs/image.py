"""Serialise a Tree into an EROFS tar-index meta image (erofs-tarindex.md §1 and §4, pass 2).

512-byte blocks; regular files are chunk-indexed into device #1 (the tar that follows the meta).
"""

from __future__ import annotations

import bisect
import stat
import struct
from itertools import accumulate, repeat

from hybrid_erofs.erofs.crc32c import crc32c
from hybrid_erofs.erofs.sparse import HOLE, SparseLayout
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
# The common inode, a regular file without xattrs whose data is one chunk (size <= 2^40):
# inode + its chunk index (advise 0, device 1, blkaddr), padded to the 32-byte slot.
_COMPACT_FILE = struct.Struct("<HHHHIIIIHHIHHI24x")
_EXTENDED_FILE = struct.Struct("<HHHHQIIIIqII16xHHI24x")
_ONE_CHUNK_MAX = 1 << 40

_FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
               stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}

# A directory's dirents in byte order, '.' and '..' included: names and the inodes they name.
Listing = tuple[list[bytes], list[Node]]


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


def dir_blocks(names: list[bytes]) -> tuple[list[tuple[int, int]], int]:
    """Pack byte-sorted names into 512-byte dir blocks, 12-byte dirent + name each (§1.6).

    Returns each block's [start, end) range of `names` and the directory size (the last
    block is not padded).
    """
    size = 12 * len(names) + sum(map(len, names))
    if size <= BLOCK:
        return [(0, len(names))], size
    ranges: list[tuple[int, int]] = []
    start = used = 0
    for end, name in enumerate(names):
        need = 12 + len(name)
        if used + need > BLOCK:
            ranges.append((start, end))
            start = end
            used = 0
        used += need
    ranges.append((start, len(names)))
    return ranges, BLOCK * (len(ranges) - 1) + used


def set_device_tag(image: bytes | bytearray, tag: bytes) -> bytes:
    """`image` (a meta this module wrote) with device slot #1's tag set to `tag` (at most 64
    bytes) and the superblock checksum updated. The kernel reads the tag only for non-flat
    mounts (as a device path, §1.4); hybrid-erofs records the layer blob's digest there, as
    Nydus names its data blobs."""
    if len(tag) > 64:
        raise ValueError(f"'tag' must be at most 64 bytes (got {len(tag)})")
    out = bytearray(image)
    out[SLOT_OFFSET:SLOT_OFFSET + 64] = tag.ljust(64, b"\0")
    struct.pack_into("<I", out, SB_OFFSET + 4, 0)
    struct.pack_into("<I", out, SB_OFFSET + 4, crc32c(out[SB_OFFSET:SB_OFFSET + BLOCK]))
    return bytes(out)


class _Plan:
    """Layout of an inode written after the data blocks are placed (dirs, long symlinks)
    or through the general path (xattrs, empty files, devices)."""

    __slots__ = ("blocks", "copyblk", "extended", "ino", "layout", "listing", "nlink", "node",
                 "sparse", "startblk", "tail", "xbody")

    def __init__(self, node: Node, ino: int, nlink: int, xbody: bytes,
                 listing: Listing | None) -> None:
        self.node, self.ino, self.nlink, self.xbody = node, ino, nlink, xbody
        self.listing = listing
        self.blocks: list[tuple[int, int]] = []
        self.extended = False
        self.layout = LAYOUT_FLAT_PLAIN
        self.tail = 0
        self.startblk = NULL_ADDR
        self.sparse: tuple[SparseLayout, list[bytearray]] | None = None
        self.copyblk: list[int] = []


class ImageWriter:
    """Lays out and writes the meta image for one finished Tree.

    Args:
        epoch: superblock build time (compact inodes carry this mtime).
        uuid: 16 bytes. volume_label: up to 16 bytes (from a tar 'V' header).
        tar_size: bytes of layer data (the device slot's block count).

    build() records each inode's nid on its Node and sets directory sizes.
    """

    def __init__(self, root: Node, *, epoch: int, uuid: bytes, volume_label: bytes,
                 tar_size: int,
                 sparse: dict[int, tuple[SparseLayout, list[bytearray]]] | None = None) -> None:
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
        self._sparse = sparse or {}
        self.inodes = 0

    def _order(self) -> tuple[list[Node], dict[Node, int], dict[Node, Listing]]:
        """BFS from the root, children in byte order, each inode once.

        Returns the inodes, their link counts and each directory's listing.
        """
        nodes = [self._root]
        nlinks: dict[Node, int] = {}
        listings: dict[Node, Listing] = {}
        for node in nodes:  # grows while iterating: BFS
            children = node.children
            if children is None:
                continue
            names = sorted(children)
            kids = [children[name] for name in names]
            subdirs = 0
            for child in kids:
                if child.children is not None:
                    subdirs += 1
                    nodes.append(child)
                elif child in nlinks:
                    nlinks[child] += 1
                else:
                    nlinks[child] = 1
                    nodes.append(child)
            nlinks[node] = 2 + subdirs
            parent = node.parent
            assert parent is not None
            for name, kid in ((b".", node), (b"..", parent)):
                at = bisect.bisect(names, name)
                names.insert(at, name)
                kids.insert(at, kid)
            if b"." in children or b".." in children:  # aufs '.wh..' / '.wh...' whiteouts
                kids = [node if name == b"." else parent if name == b".." else kid
                        for name, kid in zip(names, kids, strict=True)]
            listings[node] = names, kids
        return nodes, nlinks, listings

    def build(self) -> bytes:
        """Return the whole meta image; its length is blocks_lo * 512."""
        nodes, nlinks, listings = self._order()
        self.inodes = len(nodes)
        image = bytearray(FIRST_INODE)
        later: list[_Plan] = []  # inodes that point at data blocks: written once those are placed
        epoch = self._epoch
        compact_file, extended_file = _COMPACT_FILE.pack, _EXTENDED_FILE.pack
        for ino, node in enumerate(nodes, 1):
            size = node.size
            nlink = nlinks[node]
            if 0 < size <= _ONE_CHUNK_MAX and node.mode & 0o170000 == stat.S_IFREG \
                    and not node.xattrs and node.sparse is None:
                node.nid = len(image) >> 5
                i_u = CHUNK_FORMAT_INDEXES | (max(9, (size - 1).bit_length()) - 9)
                if (node.uid <= 0xFFFF and node.gid <= 0xFFFF and nlink <= 0xFFFF
                        and size <= 0xFFFFFFFF and node.mtime == epoch and node.nsec == 0):
                    image += compact_file(LAYOUT_CHUNK_BASED << 1, 0, node.mode & 0xFFFF, nlink,
                                          size, 0, i_u, ino, node.uid, node.gid, 0,
                                          0, 1, node.data_offset >> 9)
                else:
                    image += extended_file(1 | LAYOUT_CHUNK_BASED << 1, 0, node.mode & 0xFFFF, 0,
                                           size, i_u, ino, node.uid, node.gid, node.mtime,
                                           node.nsec, nlink, 0, 1, node.data_offset >> 9)
                continue
            plan = self._place(image, node, ino, nlink, listings.get(node))
            if plan.node.size and (plan.layout != LAYOUT_CHUNK_BASED or plan.sparse):
                later.append(plan)
            else:
                inode = self._inode(plan, self._i_u(plan), b"")
                image[node.nid * 32:node.nid * 32 + len(inode)] = inode
        if nodes[0].nid > 0xFFFF:
            raise AssertionError("root nid must fit rootnid_2b")
        block = -(-len(image) // BLOCK)
        for plan in later:
            if plan.sparse is not None:
                for buffer in plan.sparse[1]:  # chunks copied into the meta (sparse.py)
                    plan.copyblk.append(block)
                    block += len(buffer) // BLOCK
                continue
            size = plan.node.size
            full = size // BLOCK if plan.tail else -(-size // BLOCK)
            if full:
                plan.startblk = block
                block += full
        meta_blocks = block
        image += bytes(meta_blocks * BLOCK - len(image))
        for plan in later:
            self._write_later(image, plan)
        self._write_super(image, nodes[0].nid, len(nodes), meta_blocks)
        return bytes(image)

    def _place(self, image: bytearray, node: Node, ino: int, nlink: int,
               listing: Listing | None) -> _Plan:
        """Choose inode format and data layout, reserve the inode slot and set the nid."""
        plan = _Plan(node, ino, nlink, xattr_body(node.xattrs), listing)
        if listing is not None:
            plan.blocks, node.size = dir_blocks(listing[0])
        size = node.size
        # Compact only when nothing is lost (§1.5; unlike mkfs we also require nsec == 0).
        plan.extended = not (node.uid <= 0xFFFF and node.gid <= 0xFFFF and nlink <= 0xFFFF
                             and size <= 0xFFFFFFFF and node.mtime == self._epoch
                             and node.nsec == 0)
        head = (64 if plan.extended else 32) + len(plan.xbody)
        fmt = node.mode & 0o170000
        slot = head
        if fmt == stat.S_IFREG and size > 0:
            plan.layout = LAYOUT_CHUNK_BASED
            if node.sparse is not None:
                plan.sparse = self._sparse[node.data_offset]
                chunks = len(plan.sparse[0].entries)
            else:
                chunkbits = min(40, max(9, (size - 1).bit_length()))
                chunks = -(-size // (1 << chunkbits))
            slot = -(-head // 8) * 8 + 8 * chunks
        elif fmt in (stat.S_IFDIR, stat.S_IFLNK) and size > 0:
            tail = size % BLOCK
            if tail and head + tail <= BLOCK:
                plan.layout, plan.tail = LAYOUT_FLAT_INLINE, tail
                slot = head + tail
                # The inline tail must not cross a block boundary (§1.8).
                if (len(image) + head) % BLOCK + tail > BLOCK:
                    image += bytes(-len(image) % BLOCK)
        node.nid = len(image) >> 5
        image += bytes(-(-slot // 32) * 32)
        return plan

    @staticmethod
    def _i_u(plan: _Plan) -> int:
        """i_u of an inode without data blocks: chunk format, device number or 0."""
        node = plan.node
        fmt = node.mode & 0o170000
        if plan.sparse is not None:
            return CHUNK_FORMAT_INDEXES | (plan.sparse[0].chunkbits - 9)
        if plan.layout == LAYOUT_CHUNK_BASED:
            chunkbits = min(40, max(9, (node.size - 1).bit_length()))
            return CHUNK_FORMAT_INDEXES | (chunkbits - 9)
        return node.rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0

    def _write_later(self, image: bytearray, plan: _Plan) -> None:
        """Write a directory's or symlink's data blocks and its inode (with the inline tail),
        or a sparse file's copied chunks and its inode."""
        iloc = plan.node.nid * 32
        if plan.sparse is not None:
            for startblk, buffer in zip(plan.copyblk, plan.sparse[1], strict=True):
                image[startblk * BLOCK:startblk * BLOCK + len(buffer)] = buffer
            inode = self._inode(plan, self._i_u(plan), b"")
            image[iloc:iloc + len(inode)] = inode
            return
        data = plan.node.target if plan.listing is None else self._dir_data(plan)
        full = len(data) - plan.tail
        if full:
            start = plan.startblk * BLOCK
            image[start:start + full] = data[:full]
        inode = self._inode(plan, plan.startblk, data[full:])
        iloc = plan.node.nid * 32
        image[iloc:iloc + len(inode)] = inode

    @staticmethod
    def _dir_data(plan: _Plan) -> bytes:
        assert plan.listing is not None
        names, kids = plan.listing
        nids = [kid.nid for kid in kids]
        types = [_FILE_TYPES.get(kid.mode & 0o170000, 0) for kid in kids]
        pack = _DIRENT.pack
        out = bytearray()
        for start, end in plan.blocks:
            if start:
                out += bytes(-len(out) % BLOCK)
            block = names[start:end]
            nameoffs = accumulate(map(len, block), initial=12 * len(block))
            out += b"".join(map(pack, nids[start:end], nameoffs, types[start:end], repeat(0)))
            out += b"".join(block)
        return bytes(out)

    @staticmethod
    def _inode(plan: _Plan, i_u: int, tail: bytes) -> bytes:
        """The inode, its xattr ibody and its inline tail or chunk indexes."""
        node = plan.node
        i_format = int(plan.extended) | (plan.layout << 1)
        icount = (len(plan.xbody) - 12) // 4 + 1 if plan.xbody else 0
        if plan.extended:
            head = _EXTENDED.pack(i_format, icount, node.mode & 0xFFFF, 0, node.size, i_u,
                                  plan.ino, node.uid, node.gid, node.mtime, node.nsec,
                                  plan.nlink)
        else:
            head = _COMPACT.pack(i_format, icount, node.mode & 0xFFFF, plan.nlink, node.size,
                                 0, i_u, plan.ino, node.uid, node.gid, 0)
        inode = head + plan.xbody
        if plan.layout != LAYOUT_CHUNK_BASED:
            return inode + tail
        inode += bytes(-len(inode) % 8)
        if plan.sparse is not None:
            # Holes are null chunks; copies live in the meta (device 0), the rest in the tar.
            pack = _CHUNK_INDEX.pack
            return inode + b"".join(
                pack(0, 0, NULL_ADDR) if entry == HOLE else
                pack(0, 0, plan.copyblk[-2 - entry]) if entry < 0 else pack(0, 1, entry)
                for entry in plan.sparse[0].entries)
        chunk_blocks = 1 << (i_u & 0x1F)
        first = node.data_offset // BLOCK
        count = -(-node.size // (chunk_blocks * BLOCK))
        return inode + b"".join(_CHUNK_INDEX.pack(0, 1, first + k * chunk_blocks)
                                for k in range(count))

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
