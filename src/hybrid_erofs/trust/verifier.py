"""Verification against the layer itself: one pass over the whole blob recomputes what `index`
would make of it and compares the index files in use with it.

Indexes are deterministic, so a node needs nothing but the blob: its sha256 (the manifest's
layer digest), the layer data's sha256 (the config's diff_id), every zinfo checkpoint (offsets,
bits, window), the sidecar (sizes, digests of each span, of the zinfo and of the meta), and the
meta's tree entry by entry against the tar headers (names, types, modes, owners, times, sizes,
link targets, data offsets, xattrs, devices, hard links). Used by `hybrid-erofs verify`, by
mounts of unbound indexes (in the background) and by the background fetch when a layer is
complete. Trust model: docs/security.md.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..erofs.layout import Inode, decode_dev
from ..erofs.reader import ErofsImage
from ..erofs.tar import TarMember, TarParser
from ..erofs.tree import Node, Tree, clean
from ..errors import GzipFormatError, HybridErofsError, IndexFormatError, TarFormatError
from ..filekind import detect_format
from ..gzindex.build import DEFAULT_SPAN, BuildResult, build_index
from ..gzindex.format import WINDOW_SIZE, GzipIndex, parse_index
from ..gzindex.sidecar import Sidecar, parse_sidecar, sha256_digest, sidecar_path
from ..printable import printable
from ..source import ByteSource, MemorySource
from .binding import meta_blob_digest

log = logging.getLogger(__name__)

PIECE = 4 << 20


@dataclass(frozen=True, slots=True)
class LayerIndexFiles:
    """The index files of one layer: its meta, and for a gzip layer its zinfo and sidecar
    (default: the zinfo's name plus `.json`, when that file exists)."""

    meta: Path
    zinfo: Path | None = None
    sidecar: Path | None = None

    def sidecar_file(self) -> Path | None:
        if self.sidecar is not None:
            return self.sidecar
        if self.zinfo is not None and sidecar_path(self.zinfo).exists():
            return sidecar_path(self.zinfo)
        return None


@dataclass(frozen=True, slots=True)
class LayerVerification:
    """What `verify_layer` found. `ok` when nothing differs; `problems` holds the first
    `max_problems` differences (each one line, archive data escaped), `problem_count` all."""

    name: str
    problems: tuple[str, ...]
    problem_count: int
    blob_digest: str
    blob_size: int
    layer_digest: str
    layer_size: int
    entries: int
    checkpoints: int
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def summary(self) -> str:
        """One line: "NAME: verified against blob D (...)" or the first problem."""
        if self.ok:
            return (f"{self.name}: verified against blob {self.blob_digest} ({self.entries} "
                    f"entries, {self.checkpoints} checkpoints, layer {self.layer_digest})")
        more = f" (and {self.problem_count - 1} more)" if self.problem_count > 1 else ""
        return f"{self.name}: does not match its layer: {self.problems[0]}{more}"

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok,
                "blob": {"digest": self.blob_digest, "size": self.blob_size},
                "layer": {"digest": self.layer_digest, "size": self.layer_size},
                "entries": self.entries, "checkpoints": self.checkpoints,
                "problem_count": self.problem_count, "problems": list(self.problems),
                "elapsed_s": round(self.elapsed_s, 3)}


def iter_source(source: ByteSource, *, piece: int = PIECE) -> Iterator[bytes]:
    """The bytes of `source` from 0 to its end, in pieces (a blob in the chunk cache, say)."""
    for offset in range(0, source.size, piece):
        yield source.pread(min(piece, source.size - offset), offset)


class _Problems:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: list[str] = []
        self.count = 0

    def __call__(self, line: str) -> None:
        self.count += 1
        if len(self.lines) < self.limit:
            self.lines.append(line)


def verify_layer(blob: ByteSource | BinaryIO | Iterable[bytes], files: LayerIndexFiles, *,
                 blob_digest: str | None = None, diff_id: str | None = None,
                 root_owner: tuple[int, int] | None = None, max_problems: int = 20,
                 progress: Callable[[int], None] | None = None,
                 name: str | None = None) -> LayerVerification:
    """Read the whole `blob` once and compare the index `files` with it.

    Args:
        blob: the compressed blob (or plain tar): a ByteSource (read in 4 MiB pieces, e.g.
            a complete blob in the chunk cache), a binary file, or an iterable of chunks.
        files: the index in use.
        blob_digest: what the blob must hash to (the manifest's layer descriptor), if known.
        diff_id: what the layer data must hash to (the image config), if known.
        root_owner: uid/gid the root directory must have when the tar has no entry for it
            (`index --all-layers` uses 0:0); default: whatever the meta says (the indexer's
            choice, not the tar's).
        max_problems: keep at most this many problem lines (all are counted).
        progress: called with the blob bytes read so far.
        name: how the result names the layer (default: the meta's path).

    Returns a LayerVerification; differences are problems, not exceptions. Raises only
    when a file cannot be read at all (HybridErofsError) or the blob source fails
    (SourceIOError).
    """
    started = time.monotonic()
    problem = _Problems(max_problems)
    label = name or str(files.meta)
    meta_bytes = _read(files.meta)
    image = _open_meta(meta_bytes, files.meta, problem)
    side_file = files.sidecar_file()
    sidecar = _load_sidecar(side_file, problem) if side_file is not None else None
    zinfo_bytes = _read(files.zinfo) if files.zinfo is not None else None
    index = _load_zinfo(files.zinfo, zinfo_bytes, strict=sidecar is not None, problem=problem)
    aufs = _whiteouts_converted(image, sidecar)
    owner, root_mtime = _root_facts(image, root_owner)
    tree = Tree(aufs=aufs, root_uid=owner[0], root_gid=owner[1], root_mtime=root_mtime)
    capture = _SparseCapture(_copied_extents(image))
    parser = TarParser(capture.watching(tree.add))
    layer_hash = hashlib.sha256()

    def sink(view: memoryview) -> None:
        layer_hash.update(view)
        parser.feed(view)
        capture.feed(view)

    chunks = _chunks(blob)
    first = next(chunks, b"")
    stream = itertools.chain((first,), chunks)
    kind = detect_format(first[:512])
    result: BuildResult | None = None
    tar_ok = True
    try:
        if kind == "gzip":
            span = index.span if index is not None else (sidecar.span if sidecar else DEFAULT_SPAN)
            result = build_index(_Counted(stream, progress), span=span,
                                 every_member=_every_member(index, sidecar), sink=sink,
                                 name=label)
            blob_size, blob_hex, layer_size = result.blob_size, result.blob_sha256, result.layer_size
        else:
            blob_hash, blob_size = hashlib.sha256(), 0
            for chunk in _Counted(stream, progress):
                blob_hash.update(chunk)
                blob_size += len(chunk)
                sink(memoryview(chunk))
            blob_hex, layer_size = blob_hash.hexdigest(), blob_size
            if files.zinfo is not None:
                problem(f"blob: a {kind} file, but a zinfo is given (the layer was gzip)")
        parser.close()
    except GzipFormatError as exc:
        problem(f"blob: {exc}")
        blob_hex, blob_size, layer_size, tar_ok = "", 0, 0, False
    except TarFormatError as exc:
        problem(f"layer data: {exc}")
        tar_ok = False
        if result is None:
            blob_hex, blob_size, layer_size = "", 0, 0
    actual_blob = f"sha256:{blob_hex}" if blob_hex else "unknown"
    actual_layer = f"sha256:{layer_hash.hexdigest()}"
    if blob_hex:
        _check_digests(actual_blob, actual_layer, blob_digest=blob_digest, diff_id=diff_id,
                       meta_bytes=meta_bytes, problem=problem)
    if result is not None:
        _check_zinfo(files.zinfo, index, result, problem)
    if sidecar is not None and blob_hex:
        _check_sidecar(side_file, sidecar, actual_blob=actual_blob, blob_size=blob_size,
                       actual_layer=actual_layer, layer_size=layer_size, result=result,
                       zinfo_bytes=zinfo_bytes, meta_bytes=meta_bytes, problem=problem)
    entries = 0
    if image is not None and tar_ok:
        entries = compare_tree(image, tree.root, problem, captured=capture)
        _check_device(image, parser.end_offset, problem)
    return LayerVerification(
        name=label, problems=tuple(problem.lines), problem_count=problem.count,
        blob_digest=actual_blob, blob_size=blob_size, layer_digest=actual_layer,
        layer_size=layer_size, entries=entries,
        checkpoints=len(index) if index is not None else 0,
        elapsed_s=time.monotonic() - started)


# -- inputs -----------------------------------------------------------------------------------------

def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{path}: no such file") from exc
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot read: {exc.strerror}") from exc


def _open_meta(data: bytes, path: Path, problem: _Problems) -> ErofsImage | None:
    try:
        return ErofsImage(MemorySource(data))
    except HybridErofsError as exc:
        problem(f"{path}: not a usable meta image: {exc}")
        return None


def _load_sidecar(path: Path, problem: _Problems) -> Sidecar | None:
    try:
        return parse_sidecar(path.read_bytes(), name=str(path))
    except (HybridErofsError, OSError) as exc:
        problem(f"{path}: {exc}")
        return None


def _load_zinfo(path: Path | None, data: bytes | None, *, strict: bool,
                problem: _Problems) -> GzipIndex | None:
    if path is None or data is None:
        return None
    try:
        return parse_index(data, name=str(path), strict=strict)
    except HybridErofsError as exc:
        problem(str(exc))
        return None


def _chunks(blob: ByteSource | BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(blob, ByteSource):
        return iter_source(blob)
    if hasattr(blob, "read"):
        reader: BinaryIO = blob  # type: ignore[assignment]
        return iter(lambda: reader.read(PIECE), b"")
    return iter(blob)


class _Counted:
    """Chunks passed through, their running total reported to `progress`."""

    def __init__(self, chunks: Iterable[bytes], progress: Callable[[int], None] | None) -> None:
        self._chunks, self._progress, self._total = iter(chunks), progress, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._total += len(chunk)
            if self._progress is not None:
                self._progress(self._total)
            yield chunk


def _whiteouts_converted(image: ErofsImage | None, sidecar: Sidecar | None) -> bool:
    """Whether the meta shows `.wh.*` entries as overlayfs whiteouts (`index --aufs`): as its
    sidecar says, else as its tree shows (a meta that kept no `.wh.` name converted them,
    or the tar has none, where both readings give the same tree)."""
    if sidecar is not None and sidecar.whiteouts is not None:
        return sidecar.whiteouts == "overlay"
    if image is None:
        return False
    try:
        return not any(path.rsplit("/", 1)[-1].startswith(".wh.") for path, _ in image.walk())
    except HybridErofsError:
        return False


def _root_facts(image: ErofsImage | None, root_owner: tuple[int, int] | None
                ) -> tuple[tuple[int, int], int]:
    """Owner and time of a root the tar has no entry for: the indexer's choice."""
    if image is None:
        return root_owner or (0, 0), 0
    owner = root_owner or (image.root.uid, image.root.gid)
    return owner, image.root.mtime


def _every_member(index: GzipIndex | None, sidecar: Sidecar | None) -> bool:
    """The checkpoint rule the zinfo was made with: as the sidecar says; else erofs-utils'
    per-member rule when two checkpoints are closer than the span (the span rule alone
    never makes them)."""
    if sidecar is not None:
        return sidecar.every_member
    if index is None:
        return False
    outs = [cp.out_offset for cp in index.checkpoints]
    return any(b - a <= index.span for a, b in itertools.pairwise(outs))


# -- comparisons -----------------------------------------------------------------------------------

def _check_digests(actual_blob: str, actual_layer: str, *, blob_digest: str | None,
                   diff_id: str | None, meta_bytes: bytes, problem: _Problems) -> None:
    if blob_digest is not None and actual_blob != blob_digest:
        problem(f"blob: hashes to {actual_blob}, the manifest says {blob_digest}")
    if diff_id is not None and actual_layer != diff_id:
        problem(f"layer data: hashes to {actual_layer}, the image config's diff_id is {diff_id}")
    try:
        recorded = meta_blob_digest(MemorySource(meta_bytes))
    except HybridErofsError:
        return  # reported by _open_meta
    if recorded is not None and recorded != actual_blob:
        problem(f"meta: built for blob {recorded}, the blob is {actual_blob}")


def _check_zinfo(path: Path | None, index: GzipIndex | None, result: BuildResult,
                 problem: _Problems) -> None:
    """Every checkpoint of the zinfo in use must be one the stream has: same offsets and bits,
    and the window must be the layer data before it (within its gzip member: a new member
    cannot refer back, and other tools leave stale bytes there)."""
    if index is None or path is None:
        return
    ours, theirs = result.index.checkpoints, index.checkpoints
    starts = result.member_starts
    for number, (want, have) in enumerate(zip(ours, theirs, strict=False)):
        if (want.in_offset, want.bits, want.out_offset) != (
                have.in_offset, have.bits, have.out_offset):
            problem(f"{path}: checkpoint {number} (compressed {have.in_offset} bit "
                    f"{have.bits}, uncompressed {have.out_offset}) is not the stream's "
                    f"(compressed {want.in_offset} bit {want.bits}, uncompressed "
                    f"{want.out_offset})")
            return
        member_start = max((s for s in starts if s <= want.out_offset), default=0)
        valid = min(WINDOW_SIZE, want.out_offset - member_start)
        if valid and want.window[WINDOW_SIZE - valid:] != have.window[WINDOW_SIZE - valid:]:
            problem(f"{path}: checkpoint {number}: the window is not the {valid} bytes of "
                    f"layer data before uncompressed offset {want.out_offset}")
    if len(ours) != len(theirs):
        problem(f"{path}: {len(theirs)} checkpoints, the stream has {len(ours)} with span "
                f"{index.span}")


def _check_sidecar(path: Path | None, sidecar: Sidecar, *, actual_blob: str, blob_size: int,
                   actual_layer: str, layer_size: int, result: BuildResult | None,
                   zinfo_bytes: bytes | None, meta_bytes: bytes, problem: _Problems) -> None:
    where = str(path)
    if (sidecar.blob_digest, sidecar.blob_size) != (actual_blob, blob_size):
        problem(f"{where}: records blob {sidecar.blob_digest} ({sidecar.blob_size} bytes), "
                f"the blob is {actual_blob} ({blob_size} bytes)")
    if sidecar.layer_size != layer_size:
        problem(f"{where}: records {sidecar.layer_size} bytes of layer data, the blob has "
                f"{layer_size}")
    if sidecar.layer_digest is not None and sidecar.layer_digest != actual_layer:
        problem(f"{where}: records layer data {sidecar.layer_digest}, it is {actual_layer}")
    if zinfo_bytes is not None and sha256_digest(zinfo_bytes) != sidecar.zinfo_digest:
        problem(f"{where}: records zinfo {sidecar.zinfo_digest}, the zinfo in use is "
                f"{sha256_digest(zinfo_bytes)}")
    if sidecar.meta_digest is not None and sha256_digest(meta_bytes) != sidecar.meta_digest:
        problem(f"{where}: records meta {sidecar.meta_digest}, the meta in use is "
                f"{sha256_digest(meta_bytes)}")
    if result is not None:
        recomputed = [(s.offset, s.length, s.sha256) for s in result.span_digests]
        recorded = [(s.offset, s.length, s.sha256) for s in sidecar.spans]
        for number, (want, have) in enumerate(zip(recomputed, recorded, strict=False)):
            if want != have:
                problem(f"{where}: span digest {number} (compressed {have[0]}+{have[1]}) is "
                        f"not the blob's (compressed {want[0]}+{want[1]}, sha256:{want[2]})")
                return
        if len(recomputed) != len(recorded):
            problem(f"{where}: {len(recorded)} span digests, the blob has {len(recomputed)}")


def _check_device(image: ErofsImage, tar_end: int, problem: _Problems) -> None:
    sb = image.superblock
    if len(sb.devices) != 1:
        problem(f"meta: {len(sb.devices)} devices, a tar-index meta has one (the layer)")
        return
    slot = sb.devices[0]
    if slot.blocks != -(-tar_end // 512):
        problem(f"meta: device 1 is {slot.blocks} blocks, the tar ends at {tar_end} bytes")
    if slot.uniaddr != sb.blocks:
        problem(f"meta: the layer is mapped at block {slot.uniaddr}, not after the meta's "
                f"{sb.blocks} blocks")


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


class _SparseCapture:
    """The tar bytes behind the chunks a meta copied into itself (sparse files, erofs/
    sparse.py), kept while the layer streams by so those chunks can be checked too; bounded
    by what the meta holds (the builder copies at most 64 MiB per image)."""

    def __init__(self, copied: dict[str, list[tuple[int, int]]]) -> None:
        self._copied = copied  # path -> [(logical offset, length)] of copied chunks
        self._ranges: list[tuple[int, int]] = []  # tar [start, end) still to capture
        self._kept: dict[int, bytearray] = {}
        self._offset = 0
        self.entries: set[str] = set()  # paths the tar has an entry for


    def watching(self, inner: Callable[[TarMember], None]) -> Callable[[TarMember], None]:
        def on_member(member: TarMember) -> None:
            inner(member)
            self.entries.add(_member_path(member.name))
            if member.sparse is None or not self._copied:
                return
            chunks = self._copied.get(_member_path(member.name), ())
            at = member.data_offset
            for offset, length in member.sparse:
                for lo, size in chunks:
                    start, end = max(offset, lo), min(offset + length, lo + size)
                    if start < end:
                        self._ranges.append((at + start - offset, at + end - offset))
                at += length
            self._ranges.sort()
        return on_member

    def feed(self, view: memoryview) -> None:
        base, end = self._offset, self._offset + len(view)
        self._offset = end
        while self._ranges and self._ranges[0][0] < end:
            start, stop = self._ranges[0]
            lo, hi = max(start, base), min(stop, end)
            if lo < hi:
                self._kept.setdefault(start, bytearray()).extend(view[lo - base:hi - base])
            if stop <= end:
                self._ranges.pop(0)
            else:
                break

    def tar_bytes(self, start: int, length: int) -> bytes | None:
        """Captured tar bytes [start, start+length), or None when they were not kept."""
        for first, data in self._kept.items():
            if first <= start and start + length <= first + len(data):
                return bytes(data[start - first:start - first + length])
        return None


def _member_path(name: bytes) -> str:
    return "/" + b"/".join(clean(name)).decode("utf-8", "surrogateescape")


def _copied_extents(image: ErofsImage | None) -> dict[str, list[tuple[int, int]]]:
    """Regular files whose meta holds some of their bytes itself (device 0 chunks)."""
    found: dict[str, list[tuple[int, int]]] = {}
    if image is None:
        return found
    try:
        for path, inode in image.walk():
            if inode.is_reg and inode.size:
                copied = [(e.offset, e.length) for e in image.extents(inode) if e.device == 0]
                if copied:
                    found[path] = copied
    except HybridErofsError:
        return found  # reported by the comparison
    return found


def compare_tree(image: ErofsImage, root: Node, problem: Callable[[str], None], *,
                 captured: _SparseCapture | None = None) -> int:
    """Compare every entry of the meta with the tree the tar's headers make (erofs/tree.py
    rules); report each difference through `problem`. Returns the entries compared.

    The attributes of a directory the tar has no entry for (the root, implied parents) are
    the indexer's choice (mkfs.erofs and containerd differ), as are a symlink's permission
    bits (Linux ignores them) and times before 1970 (containerd clamps them): only their type
    is compared. Everything else must be as the tar says."""
    seen: dict[int, int] = {}  # id(tree node) -> nid: hard links must be shared alike
    entries = 0
    pending: list[tuple[str, int, Node]] = [("/", image.root.nid, root)]
    while pending:
        path, nid, node = pending.pop()
        entries += 1
        try:
            inode = image.inode(nid)
            if node.is_dir and captured is not None and path not in captured.entries:
                if not inode.is_dir:
                    problem(f"{printable(path)}: not a directory in the meta")
                elif path == "/" and (inode.uid, inode.gid) != (node.uid, node.gid):
                    problem(f"/: owner {inode.uid}:{inode.gid} in the meta, {node.uid}:"
                            f"{node.gid} expected (the tar has no entry for the root)")
            else:
                _compare_entry(image, path, inode, node, problem, captured)
            known = seen.setdefault(id(node), nid)
            if known != nid:
                problem(f"{printable(path)}: a separate inode in the meta, a hard link of "
                        f"another entry in the layer")
            if not node.is_dir or not inode.is_dir:
                continue
            listed = {entry.name: entry.nid for entry in image.listdir(inode)
                      if entry.name not in (".", "..")}
        except HybridErofsError as exc:
            problem(f"{printable(path)}: {exc}")
            continue
        assert node.children is not None
        children = {name.decode("utf-8", "surrogateescape"): child
                    for name, child in node.children.items()}
        base = path.rstrip("/")
        for name in sorted(listed.keys() - children.keys()):
            problem(f"{printable(base + '/' + name)}: in the meta but not in the layer"
                    f"{_describe(image, listed[name])}")
        for name in sorted(children.keys() - listed.keys()):
            problem(f"{printable(base + '/' + name)}: in the layer but not in the meta")
        for name in sorted(listed.keys() & children.keys(), reverse=True):
            pending.append((base + "/" + name, listed[name], children[name]))
    return entries


def _describe(image: ErofsImage, nid: int) -> str:
    try:
        inode = image.inode(nid)
        kind = _KINDS.get(stat.S_IFMT(inode.mode), "entry")
        target = f" -> {printable(image.readlink(inode))}" if inode.is_symlink else ""
        return f" ({kind}{target}, mode {stat.filemode(inode.mode)}, {inode.uid}:{inode.gid})"
    except HybridErofsError:
        return ""


def _compare_entry(image: ErofsImage, path: str, inode: Inode, node: Node,
                   problem: Callable[[str], None], captured: _SparseCapture | None) -> None:
    shown = printable(path)
    if stat.S_IFMT(inode.mode) != stat.S_IFMT(node.mode):
        problem(f"{shown}: a {_KINDS.get(stat.S_IFMT(inode.mode), 'entry')} in the meta, a "
                f"{_KINDS.get(stat.S_IFMT(node.mode), 'entry')} in the layer")
        return
    permissions = 0 if stat.S_ISLNK(node.mode) else 0o7777
    if inode.mode & permissions != node.mode & permissions:
        problem(f"{shown}: mode {stat.filemode(inode.mode)} in the meta, "
                f"{stat.filemode(node.mode)} in the layer")
    if (inode.uid, inode.gid) != (node.uid, node.gid):
        problem(f"{shown}: owner {inode.uid}:{inode.gid} in the meta, {node.uid}:{node.gid} "
                f"in the layer")
    if (inode.mtime, inode.mtime_nsec) != (node.mtime, node.nsec) and min(
            inode.mtime, node.mtime) > 0:
        problem(f"{shown}: mtime {inode.mtime}.{inode.mtime_nsec:09d} in the meta, "
                f"{node.mtime}.{node.nsec:09d} in the layer")
    if stat.S_ISREG(node.mode) and node.sparse is not None:
        _compare_sparse(image, shown, inode, node, problem, captured)
    elif stat.S_ISREG(node.mode):
        _compare_data(image, shown, inode, node, problem)
    elif stat.S_ISLNK(node.mode):
        target = image.readlink(inode)
        if target.encode("utf-8", "surrogateescape") != node.target:
            problem(f"{shown}: links to {printable(target)} in the meta, to "
                    f"{printable(node.target)} in the layer")
    elif (stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode)) and (
            inode.rdev != decode_dev(node.rdev)):
            problem(f"{shown}: device {inode.rdev[0]},{inode.rdev[1]} in the meta, "
                    f"{','.join(map(str, decode_dev(node.rdev)))} in the layer")
    found = {name.encode("utf-8", "surrogateescape"): value
             for name, value in image.xattrs(inode).items()}
    if found != node.xattrs:
        names = sorted(set(found) ^ set(node.xattrs)) or sorted(
            name for name in found if found[name] != node.xattrs.get(name))
        problem(f"{shown}: xattrs differ ({', '.join(printable(n) for n in names[:4])})")


def _compare_data(image: ErofsImage, shown: str, inode: Inode, node: Node,
                  problem: Callable[[str], None]) -> None:
    if inode.size != node.size:
        problem(f"{shown}: {inode.size} bytes in the meta, {node.size} in the layer")
        return
    for extent in image.extents(inode):
        if extent.device != 1 or extent.physical != node.data_offset + extent.offset:
            where = ("a hole" if extent.device is None else
                     f"device {extent.device} offset {extent.physical}")
            problem(f"{shown}: bytes {extent.offset}+{extent.length} are {where} in the meta, "
                    f"at layer offset {node.data_offset + extent.offset} in the layer")
            return


def _compare_sparse(image: ErofsImage, shown: str, inode: Inode, node: Node,
                    problem: Callable[[str], None], captured: _SparseCapture | None) -> None:
    """A sparse file: data chunks must point at its segments' bytes in the tar, null chunks
    must cover holes only, and chunks copied into the meta must hold the segments' bytes
    (zeros in the holes)."""
    if inode.size != node.size:
        problem(f"{shown}: {inode.size} bytes in the meta, {node.size} in the layer")
        return
    segments, at = [], node.data_offset
    for offset, length in node.sparse or ():
        segments.append((offset, length, at))
        at += length
    for extent in image.extents(inode):
        lo, hi = extent.offset, extent.offset + extent.length
        pieces = [(max(o, lo), min(o + n, hi), t + max(o, lo) - o) for o, n, t in segments
                  if o < hi and lo < o + n]
        covered = sum(end - start for start, end, _ in pieces)
        if extent.device == 1:
            bad = covered != extent.length or any(
                tar != extent.physical + start - lo for start, _, tar in pieces)
        elif extent.device is None:
            bad = covered != 0
        else:
            expected = bytearray(extent.length)
            for start, end, tar in pieces:
                data = captured.tar_bytes(tar, end - start) if captured else None
                if data is None:
                    problem(f"{shown}: bytes {lo}+{extent.length} copied into the meta could "
                            f"not be compared (their tar bytes were not seen)")
                    return
                expected[start - lo:end - lo] = data
            bad = image.read(inode, extent.length, lo) != bytes(expected)
        if bad:
            where = ("a hole" if extent.device is None else "copied into the meta"
                     if extent.device == 0 else f"at layer offset {extent.physical}")
            problem(f"{shown}: bytes {lo}+{extent.length} are {where} in the meta, which is not "
                    f"what the tar's sparse map says")
            return


__all__ = [
    "LayerIndexFiles",
    "LayerVerification",
    "compare_tree",
    "iter_source",
    "verify_layer",
]
