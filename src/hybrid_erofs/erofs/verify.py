"""Check a tar-index meta image (and optionally its layer data) through ErofsImage.

Structure checks need only the meta; with the layer every regular file is read in full and the
tar header just before its data must describe it (erofs-tarindex.md §1, §2, §7).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from hybrid_erofs.erofs.layout import Inode
from hybrid_erofs.erofs.reader import ErofsImage
from hybrid_erofs.erofs.tree import clean
from hybrid_erofs.errors import ErofsFormatError, SourceIOError
from hybrid_erofs.source import ByteSource

BLOCK = 512                  # tar block; also the meta block size mkfs --tar=i uses
_PIECE = 1 << 20
_MAX_EXT_BLOCKS = 64         # how far back to look for a PAX/GNU header before a member


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify_image` saw. `problems` (failures) and `warnings` (tar member names that
    differ, see tar_header_problem) hold at most `max_problems` lines each."""

    files: int
    dirs: int
    symlinks: int
    others: int
    bytes_read: int
    elapsed_s: float
    problems: tuple[str, ...]
    problem_count: int
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem_count == 0


def _tar_number(field: bytes) -> int | None:
    """Octal or GNU base-256 tar number; None when unparsable."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _is_header(block: bytes) -> bool:
    """A ustar/GNU header with a matching (unsigned or signed) checksum."""
    if len(block) != BLOCK or block[257:262] != b"ustar":
        return False
    stored = _tar_number(block[148:156])
    body = block[:148] + b" " * 8 + block[156:]
    signed = sum(b - 256 if b > 127 else b for b in body)
    return stored in (sum(body), signed)


def _normalize(name: bytes) -> str:
    """Lexical path resolution with root clamping, as mkfs applies to tar names (§2)."""
    return "/" + b"/".join(clean(name)).decode("utf-8", "surrogateescape")


def _extension(layer: ByteSource, header_offset: int) -> tuple[bytes | None, int | None]:
    """(long name, size) from a PAX `x` or GNU `L` header whose payload ends at header_offset."""
    for back in range(1, _MAX_EXT_BLOCKS + 1):
        offset = header_offset - BLOCK * (back + 1)
        if offset < 0:
            break
        block = layer.pread(BLOCK, offset)
        size = _tar_number(block[124:136])
        if not _is_header(block) or size is None or -(-size // BLOCK) != back:
            continue
        payload = layer.pread(size, offset + BLOCK)
        if block[156:157] == b"L":
            return payload.split(b"\0", 1)[0], None
        if block[156:157] != b"x":
            return None, None
        name, pax_size = None, None
        for record in payload.split(b"\n"):
            _, _, keyvalue = record.partition(b" ")
            key, _, value = keyvalue.partition(b"=")
            if key == b"path":
                name = value
            elif key == b"size" and value.isdigit():
                pax_size = int(value)
        return name, pax_size
    return None, None


def tar_header_problem(layer: ByteSource, data_offset: int, size: int,
                       paths: list[str]) -> tuple[bool, str] | None:
    """(fatal, why) the tar header before `data_offset` does not describe a file of `size` at
    `paths`, or None when it does.

    A name mismatch alone is not fatal: a hard link keeps the data of a member whose name a
    later member replaced (mkfs: the later entry wins, §2), so only sizes and headers are sure.
    """
    where = f"{paths[0]}: data at layer offset {data_offset}"
    if data_offset < BLOCK or data_offset % BLOCK:
        return True, f"{where}: not preceded by a 512-byte aligned tar header"
    header = layer.pread(BLOCK, data_offset - BLOCK)
    if not _is_header(header):
        return True, f"{where}: no valid tar header before it"
    if header[156:157] not in (b"0", b"7", b"\0"):
        return True, f"{where}: the tar header before it has type {header[156:157]!r}, not a file"
    name = header[:100].split(b"\0", 1)[0]
    if header[345:346] != b"\0" and header[257:263] == b"ustar\0":
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    header_size = _tar_number(header[124:136])
    if header_size != size or _normalize(name) not in paths:
        long_name, pax_size = _extension(layer, data_offset - BLOCK)
        name = long_name or name
        header_size = pax_size if pax_size is not None else header_size
        truncated = long_name is None and b"\0" not in header[:100]
        if header_size != size:
            return True, f"{where}: the tar header before it says {header_size} bytes, not {size}"
        if _normalize(name) not in paths and not truncated:
            shown = name.decode("utf-8", "replace")
            return False, f"{where}: the tar header before it names {shown!r}"
    return None


class _Checker:
    """One verification pass; collects problems instead of stopping at the first."""

    def __init__(self, image: ErofsImage, *, read_data: bool, check_tar: bool,
                 max_problems: int, progress: Callable[[int, int], None] | None) -> None:
        self.image, self.read_data, self.check_tar = image, read_data, check_tar
        self.progress = progress
        self.max_problems = max_problems
        self.problems: list[str] = []
        self.problem_count = 0
        self.warnings: list[str] = []
        self.counts = {"files": 0, "dirs": 0, "symlinks": 0, "others": 0}
        self.bytes_read = 0
        # File data to read: the regular files' sizes once the tree is walked, less the holes
        # of sparse files as they are met.
        self.bytes_total = 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(text)

    def check_superblock(self) -> None:
        sb, meta_size = self.image.superblock, self.image.meta_size
        if meta_size != sb.blocks * sb.block_size:
            self.problem(f"superblock: meta image is {meta_size} bytes, not blocks {sb.blocks} "
                         f"* {sb.block_size}")
        if not sb.devices:
            self.problem("superblock: no device table (not a tar-index meta image)")
        for number, slot in enumerate(sb.devices, 1):
            if slot.uniaddr != sb.blocks:
                self.problem(f"device {number}: uniaddr {slot.uniaddr} is not the meta size in "
                             f"blocks ({sb.blocks}); the layer would start elsewhere")

    def walk(self) -> dict[int, list[str]]:
        """Visit every reachable inode; returns nid -> paths."""
        image = self.image
        root = image.root
        paths: dict[int, list[str]] = {root.nid: ["/"]}
        subdirs: dict[int, int] = {root.nid: 0}
        inodes: dict[int, Inode] = {root.nid: root}
        dentries: dict[int, int] = {}
        pending = [("/", root, root.nid)]
        while pending:
            dirpath, directory, parent = pending.pop()
            try:
                entries = image.listdir(directory)
            except (ErofsFormatError, SourceIOError) as exc:
                self.problem(str(exc))
                continue
            names = [os.fsencode(e.name) for e in entries]
            if names != sorted(names):
                self.problem(f"{dirpath}: names are not in byte order (kernel lookups fail)")
            if len(set(names)) != len(names):
                self.problem(f"{dirpath}: duplicate names")
            dots = {e.name: e.nid for e in entries if e.name in (".", "..")}
            if dots != {".": directory.nid, "..": parent}:
                self.problem(f"{dirpath}: '.'/'..' are {dots}, expected nids "
                             f"{directory.nid}/{parent}")
            for entry in entries:
                if entry.name in (".", ".."):
                    continue
                childpath = dirpath.rstrip("/") + "/" + entry.name
                try:
                    child = inodes.get(entry.nid) or image.inode(entry.nid)
                except ErofsFormatError as exc:
                    self.problem(f"{childpath}: {exc}")
                    continue
                if entry.ftype != child.ftype:
                    self.problem(f"{childpath}: dirent type {entry.ftype} but inode type "
                                 f"{child.ftype}")
                if child.is_dir:
                    subdirs[directory.nid] = subdirs.get(directory.nid, 0) + 1
                    if entry.nid in paths:
                        self.problem(f"{childpath}: directory nid {entry.nid} is also "
                                     f"{paths[entry.nid][0]} (loop or hard-linked directory)")
                        continue
                    pending.append((childpath, child, directory.nid))
                inodes[entry.nid] = child
                paths.setdefault(entry.nid, []).append(childpath)
                dentries[entry.nid] = dentries.get(entry.nid, 0) + 1
        self.bytes_total = sum(inode.size for inode in inodes.values() if inode.is_reg)
        for nid, inode in inodes.items():
            expected = 2 + subdirs.get(nid, 0) if inode.is_dir else dentries.get(nid, 0)
            if inode.nlink != expected:
                self.problem(f"{paths[nid][0]}: nlink {inode.nlink}, but {expected} links found")
            self.check_inode(paths[nid], inode)
        if len(inodes) != image.superblock.inos:
            self.problem(f"superblock: inos {image.superblock.inos} but {len(inodes)} inodes "
                         "are reachable")
        return paths

    def check_inode(self, paths: list[str], inode: Inode) -> None:
        kind = ("dirs" if inode.is_dir else "files" if inode.is_reg
                else "symlinks" if inode.is_symlink else "others")
        self.counts[kind] += 1
        try:
            self.image.xattrs(inode)
            if inode.is_symlink:
                self.image.readlink(inode)
            if inode.is_reg:
                self.check_file(paths, inode)
        except (ErofsFormatError, SourceIOError) as exc:
            self.problem(f"{paths[0]}: {exc}")

    def check_file(self, paths: list[str], inode: Inode) -> None:
        image, sb = self.image, self.image.superblock
        first_data: int | None = None
        data_extents = []
        sparse = False  # holes or chunks copied into the meta: a sparse tar member
        for extent in image.extents(inode):
            if not extent.device:
                sparse = True
                if extent.device is not None:
                    data_extents.append(extent)
                continue
            data_extents.append(extent)
            end = extent.physical + extent.length
            if extent.device > len(sb.devices):
                self.problem(f"{paths[0]}: chunk on device {extent.device}, which does not exist")
                return
            slot = sb.devices[extent.device - 1]
            if end > slot.blocks * sb.block_size:
                self.problem(f"{paths[0]}: data at device {extent.device} offset "
                             f"{extent.physical}+{extent.length} is past the device's "
                             f"{slot.blocks} blocks")
                return
            if self.read_data:
                layer, base = image.device_source(extent.device)
                if base + end > layer.size:
                    self.problem(f"{paths[0]}: data at layer offset {extent.physical}+"
                                 f"{extent.length} is past the end of the layer "
                                 f"({layer.size - base} bytes)")
                    return
            if first_data is None and extent.device == 1:
                first_data = extent.physical
        if not self.read_data:
            return
        if sparse:
            # Read what is stored, not the holes (a sparse member may be 60 GB of them); its
            # data follows a sparse map, not the tar header of a plain file.
            self.bytes_total -= inode.size - sum(extent.length for extent in data_extents)
            for extent in data_extents:
                for offset in range(extent.offset, extent.offset + extent.length, _PIECE):
                    length = min(_PIECE, extent.offset + extent.length - offset)
                    self.bytes_read += len(image.read(inode, length, offset))
                    if self.progress is not None:
                        self.progress(self.bytes_read, self.bytes_total)
            return
        for piece in image.iter_read(inode, piece=_PIECE):
            self.bytes_read += len(piece)
            if self.progress is not None:
                self.progress(self.bytes_read, self.bytes_total)
        if self.check_tar and first_data is not None:
            layer, base = image.device_source(1)
            found = tar_header_problem(_Offset(layer, base), first_data, inode.size, paths)
            if found and found[0]:
                self.problem(found[1])
            elif found and len(self.warnings) < self.max_problems:
                self.warnings.append(found[1])


class _Offset:
    """A view of `inner` starting at byte `base` (device 1 inside a flat disk)."""

    def __init__(self, inner: ByteSource, base: int) -> None:
        self._inner, self._base = inner, base

    @property
    def size(self) -> int:
        return self._inner.size - self._base

    def pread(self, length: int, offset: int) -> bytes:
        return self._inner.pread(length, self._base + offset)

    def close(self) -> None:
        pass


def verify_image(image: ErofsImage, *, read_data: bool = False, check_tar: bool = True,
                 max_problems: int = 20, progress: Callable[[int, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> VerifyReport:
    """Check `image`; with `read_data` also read every regular file from its device.

    Args:
        read_data: read all file data through the image's device sources (the layer).
        check_tar: with read_data, require a matching tar header before each file's data.
        max_problems: keep at most this many problem lines (all are counted).
        progress: called with the running count of data bytes read and the total to read
            (the regular files' sizes, each inode once).
        clock: injectable for tests.
    """
    started = clock()
    checker = _Checker(image, read_data=read_data, check_tar=check_tar,
                       max_problems=max_problems, progress=progress)
    checker.check_superblock()
    checker.walk()
    return VerifyReport(files=checker.counts["files"], dirs=checker.counts["dirs"],
                        symlinks=checker.counts["symlinks"], others=checker.counts["others"],
                        bytes_read=checker.bytes_read, elapsed_s=clock() - started,
                        problems=tuple(checker.problems), problem_count=checker.problem_count,
                        warnings=tuple(checker.warnings))
