"""EROFS on-disk structures for the reader: constants, value types, and pure parsers.

Byte layouts follow erofs-tarindex.md §1 (superblock §1.2, device slot §1.4, inodes §1.5,
dirents §1.6, xattrs §1.7) and the kernel's fs/erofs/erofs_fs.h. No I/O happens here.
"""

from __future__ import annotations

import stat
import struct
import uuid as uuidlib
from dataclasses import dataclass

from hybrid_erofs.errors import ErofsFormatError

MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
SB_SIZE = 128
SLOT_SIZE = 128
NULL_ADDR = 0xFFFFFFFF

COMPAT_SB_CHKSUM = 0x1
INCOMPAT_DEVICE_TABLE = 0x8
INCOMPAT_FRAGMENTS = 0x20
INCOMPAT_XATTR_PREFIXES = 0x40
INCOMPAT_48BIT = 0x80
INCOMPAT_KNOWN = 0x1FF            # everything up to METABOX in Linux 6.18

LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED = 0, 2, 4
LAYOUT_NAMES = {0: "flat-plain", 1: "compressed-full", 2: "flat-inline", 3: "compressed-compact",
                4: "chunk-based"}
IFMT_EXTENDED = 0x1
IFMT_NLINK_1 = 0x10               # compact non-dir with nlink 1; i_nb holds startblk_hi (48-bit)
IFMT_ALL = 0x1F
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_48BIT = 0x40
CHUNK_FORMAT_ALL = 0x7F

DIRENT_SIZE = 12
MAX_NAME = 255
# Dirent file_type (EROFS_FT_*) <-> S_IFMT
FT_BY_MODE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
              stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
FT_MAX = 8

# Short xattr name prefixes by e_name_index (EROFS_XATTR_INDEX_*); 5 is lustre.
XATTR_PREFIXES = {1: b"user.", 2: b"system.posix_acl_access", 3: b"system.posix_acl_default",
                  4: b"trusted.", 5: b"lustre.", 6: b"security."}
XATTR_LONG_PREFIX = 0x80

SB = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQBBHIQQ")
SLOT = struct.Struct("<64sIIHH52x")
COMPACT = struct.Struct("<HHHHIIIIHHI")
EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
DIRENT = struct.Struct("<QHBB")
CHUNK_INDEX = struct.Struct("<HHI")
XATTR_HEADER = struct.Struct("<IB7x")
XATTR_ENTRY = struct.Struct("<BBH")


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """One extra device (§1.4): `blocks` long, mapped at block `uniaddr` of the flat disk."""

    tag: bytes
    blocks: int
    uniaddr: int


@dataclass(frozen=True, slots=True)
class Superblock:
    """The parsed superblock (§1.2). `blocks` counts the primary (meta) device only."""

    checksum: int
    feature_compat: int
    feature_incompat: int
    blkszbits: int
    root_nid: int
    inos: int
    epoch: int
    fixed_nsec: int
    build_time: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: str
    volume_name: str
    extra_devices: int
    devt_slotoff: int
    xattr_prefix_count: int
    xattr_prefix_start: int
    packed_nid: int
    devices: tuple[DeviceSlot, ...]

    @property
    def block_size(self) -> int:
        return 1 << self.blkszbits

    @property
    def is_48bit(self) -> bool:
        return bool(self.feature_incompat & INCOMPAT_48BIT)

    @property
    def device_id_mask(self) -> int:
        # roundup_pow_of_two(extra_devices + 1) - 1, as the kernel masks chunk device ids
        return (1 << self.extra_devices.bit_length()) - 1 if self.extra_devices else 0


@dataclass(frozen=True, slots=True)
class Inode:
    """`stat`-like view of one inode plus what the reader needs to map its data (§1.5).

    `mtime`/`mtime_nsec` are absolute (compact inodes: epoch + i_mtime, fixed_nsec).
    `rdev` is (major, minor) for character and block devices, else (0, 0).
    """

    nid: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    ino: int
    rdev: tuple[int, int]
    layout: int
    extended: bool
    offset: int            # absolute byte offset of the inode in the meta image
    inode_size: int        # 32 (compact) or 64 (extended)
    xattr_size: int        # xattr_isize (0 when none)
    raw_u: int             # i_u: startblk_lo, rdev or chunk format
    startblk: int          # for flat layouts (startblk_hi merged on 48-bit images)

    @property
    def ftype(self) -> int:
        return FT_BY_MODE.get(stat.S_IFMT(self.mode), 0)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def mtime_ns(self) -> int:
        return self.mtime * 1_000_000_000 + self.mtime_nsec

    @property
    def tail_offset(self) -> int:
        """Where the inline tail or the chunk index area begins (before alignment)."""
        return self.offset + self.inode_size + self.xattr_size


@dataclass(frozen=True, slots=True)
class Extent:
    """`length` bytes of a file at logical `offset`: on `device` at byte `physical`, or a hole.

    `physical` is device-relative (device 0 = meta); `device` is None for a hole (zeros).
    """

    offset: int
    length: int
    device: int | None
    physical: int


@dataclass(frozen=True, slots=True)
class Dirent:
    """One directory entry (§1.6); `name` is decoded as UTF-8 with surrogateescape."""

    name: str
    nid: int
    ftype: int


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def parse_superblock(raw: bytes, slots: bytes) -> Superblock:
    """Parse the 128-byte superblock `raw`; `slots` holds extra_devices * 128 slot bytes."""
    (magic, checksum, compat, blkszbits, _extslots, rootnid_2b, inos, epoch, fixed_nsec, blocks_lo,
     meta_blkaddr, xattr_blkaddr, uuid, volume, incompat, _u1, extra_devices, devt_slotoff,
     _dirblkbits, prefix_count, prefix_start, packed_nid, _filter, _ishare, _reserved, build_time,
     rootnid_8b, _reserved2) = SB.unpack(raw)
    is_48bit = bool(incompat & INCOMPAT_48BIT)
    if is_48bit and rootnid_8b:
        # 48-bit images move the root nid to rootnid_8b; rootnid_2b then holds blocks_hi.
        root_nid, blocks = rootnid_8b, blocks_lo | rootnid_2b << 32
    else:
        root_nid, blocks = rootnid_2b, blocks_lo
    if not incompat & INCOMPAT_DEVICE_TABLE:
        extra_devices = 0
    devices = []
    for index in range(extra_devices):
        tag, dblocks, uniaddr, blocks_hi, uniaddr_hi = SLOT.unpack_from(slots, index * SLOT_SIZE)
        if is_48bit:
            dblocks |= blocks_hi << 32
            uniaddr |= uniaddr_hi << 32
        devices.append(DeviceSlot(_cstr(tag), dblocks, uniaddr))
    if magic != MAGIC:
        raise ErofsFormatError(f"superblock at offset {SB_OFFSET}: bad magic 0x{magic:08x}")
    return Superblock(
        checksum=checksum, feature_compat=compat, feature_incompat=incompat, blkszbits=blkszbits,
        root_nid=root_nid, inos=inos, epoch=epoch, fixed_nsec=fixed_nsec,
        build_time=epoch + build_time, blocks=blocks, meta_blkaddr=meta_blkaddr,
        xattr_blkaddr=xattr_blkaddr, uuid=str(uuidlib.UUID(bytes=uuid)),
        volume_name=decode_name(_cstr(volume)), extra_devices=extra_devices,
        devt_slotoff=devt_slotoff, xattr_prefix_count=prefix_count,
        xattr_prefix_start=prefix_start, packed_nid=packed_nid, devices=tuple(devices))


def decode_dev(value: int) -> tuple[int, int]:
    """Linux new_decode_dev(): i_u of a chr/blk inode -> (major, minor)."""
    return (value & 0xFFF00) >> 8, (value & 0xFF) | ((value >> 12) & 0xFFF00)


def parse_inode(raw: bytes, *, nid: int, offset: int, sb: Superblock) -> Inode:
    """Parse an inode from `raw` (at least 32 bytes; 64 for an extended inode)."""
    where = f"inode nid {nid} at offset {offset}"
    i_format = struct.unpack_from("<H", raw)[0]
    if i_format & ~IFMT_ALL:
        raise ErofsFormatError(f"{where}: unsupported i_format 0x{i_format:x}")
    layout = (i_format >> 1) & 0x7
    if layout > LAYOUT_CHUNK_BASED:
        raise ErofsFormatError(f"{where}: unknown data layout {layout}")
    startblk_hi = 0
    if i_format & IFMT_EXTENDED:
        if len(raw) < EXTENDED.size:
            raise ErofsFormatError(f"{where}: extended inode runs past the end of the image")
        (_, icount, mode, i_nb, size, i_u, ino, uid, gid, mtime, nsec,
         nlink) = EXTENDED.unpack_from(raw)
        isize, startblk_hi = EXTENDED.size, i_nb
        if size >= 1 << 63:
            raise ErofsFormatError(f"{where}: negative i_size {size - (1 << 64)}")
    else:
        (_, icount, mode, i_nb, size, i_mtime, i_u, ino, uid, gid,
         _reserved) = COMPACT.unpack_from(raw)
        isize = COMPACT.size
        mtime, nsec = sb.epoch + i_mtime, sb.fixed_nsec
        if i_format & IFMT_NLINK_1 and not stat.S_ISDIR(mode):
            nlink, startblk_hi = 1, i_nb
        else:
            nlink = i_nb
    if stat.S_IFMT(mode) not in FT_BY_MODE:
        raise ErofsFormatError(f"{where}: bogus i_mode 0{mode:o}")
    if nsec >= 1_000_000_000:
        raise ErofsFormatError(f"{where}: mtime nanoseconds {nsec} out of range")
    rdev = decode_dev(i_u) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else (0, 0)
    startblk = i_u | (startblk_hi << 32 if sb.is_48bit else 0)
    if layout == LAYOUT_CHUNK_BASED and i_u & 0xFFFF & ~CHUNK_FORMAT_ALL:
        raise ErofsFormatError(f"{where}: unsupported chunk format 0x{i_u & 0xFFFF:x}")
    return Inode(nid=nid, mode=mode, nlink=nlink, uid=uid, gid=gid, size=size, mtime=mtime,
                 mtime_nsec=nsec, ino=ino, rdev=rdev, layout=layout,
                 extended=bool(i_format & IFMT_EXTENDED), offset=offset, inode_size=isize,
                 xattr_size=12 + 4 * (icount - 1) if icount else 0, raw_u=i_u,
                 startblk=startblk)


def parse_xattr_entry(body: bytes, at: int, where: str,
                      long_prefixes: tuple[bytes, ...]) -> tuple[str, bytes, int]:
    """(name, value, padded entry size) of the xattr entry at body[at:]."""
    if at + XATTR_ENTRY.size > len(body):
        raise ErofsFormatError(f"{where}: truncated xattr entry header")
    name_len, index, value_size = XATTR_ENTRY.unpack_from(body, at)
    end = at + XATTR_ENTRY.size + name_len + value_size
    if end > len(body):
        raise ErofsFormatError(f"{where}: xattr entry of {end - at} bytes is truncated")
    if index & XATTR_LONG_PREFIX:
        if index & 0x7F >= len(long_prefixes):
            raise ErofsFormatError(f"{where}: unknown long xattr prefix {index & 0x7F}")
        prefix = long_prefixes[index & 0x7F]
    elif index == 0:
        prefix = b""    # mkfs keeps unknown namespaces whole; the kernel hides them (§1.7)
    elif index in XATTR_PREFIXES:
        prefix = XATTR_PREFIXES[index]
    else:
        raise ErofsFormatError(f"{where}: unknown xattr name index {index}")
    name_end = at + XATTR_ENTRY.size + name_len
    name = decode_name(prefix + body[at + XATTR_ENTRY.size:name_end])
    return name, body[name_end:end], -(-(end - at) // 4) * 4
