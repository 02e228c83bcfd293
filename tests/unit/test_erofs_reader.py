"""ErofsImage against oracle-built images: committed fixtures (fixtures/erofs/README.md) and,
with the oracle installed, tars built here; corrupt images must raise ErofsFormatError only."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import stat
import struct
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest

from hybrid_erofs.erofs.crc32c import crc32c
from hybrid_erofs.erofs.layout import Inode
from hybrid_erofs.erofs.reader import ErofsImage
from hybrid_erofs.erofs.verify import verify_image
from hybrid_erofs.errors import ErofsFormatError, InvalidInput
from hybrid_erofs.source import MemorySource
from tests.conftest import require_oracle

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "erofs"
TAR_FIXTURES = ["tarfile-gnu", "raw-features"]
MKFS = "mkfs.erofs-oracle"


def _bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _image(meta: bytes, *layers: bytes) -> ErofsImage:
    return ErofsImage(MemorySource(meta), devices=[MemorySource(layer) for layer in layers])


def _fix_crc(meta: bytearray) -> bytearray:
    """Recompute the superblock checksum (512-byte blocks), so a corruption gets past it."""
    block = 1 << meta[1024 + 12]
    length = block - 1024 if block > 1024 else block
    buf = bytearray(meta[1024:1024 + length])
    buf[4:8] = bytes(4)
    struct.pack_into("<I", meta, 1028, crc32c(buf))
    return meta


# -- expected tree from the tar (mkfs rules of erofs-tarindex.md §2, enough for these tars) ----

def _norm(name: str) -> str:
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/" + "/".join(parts)


def _pax_xattrs(pax: Mapping[str, str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[key.removeprefix("SCHILY.xattr.")] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key.removeprefix("LIBARCHIVE.xattr.")).decode()
            out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return out


def expected_tree(tar_bytes: bytes) -> dict[str, dict[str, Any]]:
    """path -> {member, data, xattrs, group}; hard links share one dict (one node)."""
    tree: dict[str, dict[str, Any]] = {"/": {"member": None, "xattrs": {}}}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            path = _norm(member.name)
            if not (member.isfile() or member.isdir() or member.issym() or member.islnk()
                    or member.ischr() or member.isblk() or member.isfifo()):
                continue
            # Implicit parents, including those a later '..' leaves (a/../b makes /a; §2).
            parts = [p for p in member.name.split("/") if p not in ("", ".")][:-1]
            for depth in range(1, len(parts) + 1):
                parent = _norm("/".join(parts[:depth]))
                tree.setdefault(parent, {"member": None, "xattrs": {}})
            old = tree.get(path)
            if member.islnk():
                target = tree[_norm(member.linkname)]
                if target is not old:
                    tree[path] = target
                continue
            if old is not None and member.isdir() and old["member"] is None or (
                    old is not None and member.isdir() and old["member"].isdir()):
                old["member"] = member
                old["xattrs"] = {**old["xattrs"], **_pax_xattrs(member.pax_headers)}
                continue
            if old is not None and path != "/":
                for other in [p for p in tree if p.startswith(path + "/")]:
                    del tree[other]
            data = tar.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            tree[path] = {"member": member, "data": data, "xattrs": _pax_xattrs(member.pax_headers)}
    return tree


def _mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime), 0
    seconds, _, fraction = text.partition(".")
    nsec = int((fraction + "000000000")[:9]) if fraction else 0
    return (int(seconds), nsec) if not seconds.startswith("-") or not nsec else (
        int(seconds) - 1, 1_000_000_000 - nsec)


def compare_with_tar(image: ErofsImage, tar_bytes: bytes, *, all_time: int | None = None) -> None:
    expected = expected_tree(tar_bytes)
    walked = dict(image.walk())
    assert sorted(walked) == sorted(expected)
    nid_of: dict[int, int] = {}
    for path, node in expected.items():
        inode, member = walked[path], node["member"]
        assert nid_of.setdefault(id(node), inode.nid) == inode.nid, f"{path}: hard link group"
        if member is None:
            assert inode.is_dir, path
            continue
        kinds = {tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG,
                 tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
                 tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                 tarfile.FIFOTYPE: stat.S_IFIFO, tarfile.CONTTYPE: stat.S_IFREG}
        assert stat.S_IFMT(inode.mode) == kinds[member.type], path
        assert stat.S_IMODE(inode.mode) == member.mode & 0o7777, path
        assert (inode.uid, inode.gid) == (member.uid, member.gid), path
        expected_mtime = (all_time, 0) if all_time is not None else _mtime(member)
        assert (inode.mtime, inode.mtime_nsec) == expected_mtime, path
        assert image.xattrs(inode) == node["xattrs"], path
        if member.isfile():
            assert inode.size == member.size
            assert image.read(inode, inode.size + 10) == node["data"], path
        elif member.issym():
            assert image.readlink(inode) == member.linkname, path
        elif member.ischr() or member.isblk():
            assert inode.rdev == (member.devmajor, member.devminor), path


# -- committed fixtures ------------------------------------------------------------------------

@pytest.mark.parametrize("name", TAR_FIXTURES)
def test_tar_fixture_matches_tar_members(name: str) -> None:
    tar = _bytes(f"{name}.tar")
    with _image(_bytes(f"{name}.erofs"), tar) as image:
        compare_with_tar(image, tar)
        sb = image.superblock
        assert sb.uuid == "00000000-0000-0000-0000-000000000001"
        assert sb.build_time == 1_700_000_000 and sb.block_size == 512
        assert sb.blocks * 512 == image.meta_size
        assert [slot.uniaddr for slot in sb.devices] == [sb.blocks]
        assert sb.inos == len({inode.nid for _, inode in image.walk()})


def test_all_time_image_has_compact_inodes() -> None:
    tar = _bytes("tarfile-gnu.tar")
    with _image(_bytes("tarfile-gnu.alltime.erofs"), tar) as image:
        compare_with_tar(image, tar, all_time=1_700_000_000)
        kinds = {inode.extended for _, inode in image.walk()}
        assert kinds == {False, True}    # the 3000000:4000000 owner needs an extended inode


@pytest.mark.parametrize("name", TAR_FIXTURES)
def test_flat_disk_reads_like_separate_devices(name: str) -> None:
    meta, tar = _bytes(f"{name}.erofs"), _bytes(f"{name}.tar")
    with _image(meta, tar) as split, ErofsImage(MemorySource(meta),
                                                flat=MemorySource(meta + tar)) as flat:
        for (path, a), (path_b, b) in zip(split.walk(), flat.walk(), strict=True):
            assert (path, a) == (path_b, b)
            if a.is_reg:
                assert split.read(a, a.size) == flat.read(b, b.size)


def _dir_image_checks(image: ErofsImage) -> None:
    assert image.superblock.block_size == 4096
    inode = image.lookup("/small")
    assert image.read(inode, 100) == b"hello\n"
    assert image.lookup("/hard").nid == inode.nid and inode.nlink == 2
    assert image.xattrs(inode) == {"user.shared": b"same"}
    rand = image.lookup("/link", follow_symlinks=True)
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(313))[:10000]
    assert image.read(rand, 1 << 20) == data
    assert image.read(rand, 100, 9950) == data[9950:]
    assert image.xattrs(rand) == {"user.shared": b"same", "security.test": b"sec"}
    assert image.xattrs(image.lookup("/sub")) == {"trusted.overlay.opaque": b"y"}
    sparse = image.lookup("sparse")
    expected = bytearray(20000)
    expected[12288] = ord("x")
    assert image.read(sparse, 20000) == expected
    assert image.lookup("/chr").rdev == (4, 5)
    assert stat.S_ISFIFO(image.lookup("/fifo").mode)
    assert image.readlink(image.lookup("/link")) == "sub/rand"
    assert image.lookup("/sub/../empty/./").is_dir
    assert image.listdir(image.lookup("/empty"))[0].name in (".", "..")
    assert sorted(path for path, _ in image.walk()) == [
        "/", "/chr", "/empty", "/fifo", "/hard", "/link", "/small", "/sparse", "/sub", "/sub/rand"]


def test_directory_image_with_block_map_holes_and_shared_xattrs() -> None:
    with _image(_bytes("dir-4k.erofs")) as image:
        _dir_image_checks(image)
        holes = [e for e in image.extents(image.lookup("/sparse")) if e.device is None]
        assert len(holes) == 4


def test_directory_image_with_blob_device() -> None:
    with _image(_bytes("dir-blob.erofs"), _bytes("dir-blob.bin")) as image:
        _dir_image_checks(image)
    with _image(_bytes("dir-blob.erofs")) as image, pytest.raises(InvalidInput, match="device 1"):
        image.read(image.lookup("/small"), 6)


def test_lookup_errors() -> None:
    with _image(_bytes("dir-4k.erofs")) as image:
        with pytest.raises(InvalidInput, match="no such file"):
            image.lookup("/nope")
        with pytest.raises(InvalidInput, match="not a directory"):
            image.lookup("/small/x")
        with pytest.raises(InvalidInput, match="not a directory"):
            image.listdir(image.lookup("/small"))
        with pytest.raises(InvalidInput, match="not a symbolic link"):
            image.readlink(image.root)


def test_verify_fixtures_clean() -> None:
    for name in TAR_FIXTURES:
        with _image(_bytes(f"{name}.erofs"), _bytes(f"{name}.tar")) as image:
            report = verify_image(image, read_data=True)
            assert report.problems == () and report.ok
            files = {inode.nid: inode.size for _, inode in image.walk() if inode.is_reg}
            assert (report.files, report.bytes_read) == (len(files), sum(files.values()))


def test_crc32c_vector() -> None:
    assert crc32c(b"123456789") ^ 0xFFFFFFFF == 0xE3069283


# -- corruption --------------------------------------------------------------------------------

def _first_file(meta: bytes, tar: bytes) -> Inode:
    with _image(meta, tar) as image:
        return next(inode for _, inode in image.walk() if inode.is_reg and inode.size)


def test_bad_magic() -> None:
    meta = bytearray(_bytes("tarfile-gnu.erofs"))
    meta[1024] ^= 0xFF
    with pytest.raises(ErofsFormatError, match="bad magic"):
        _image(bytes(meta))


def test_bad_checksum() -> None:
    meta = bytearray(_bytes("tarfile-gnu.erofs"))
    meta[1024 + 0x30] ^= 1                       # a uuid byte
    with pytest.raises(ErofsFormatError, match="checksum"):
        _image(bytes(meta))


@pytest.mark.parametrize("length", [0, 1000, 1100, 1300, 1500, 2048])
def test_truncated_meta(length: int) -> None:
    meta, tar = _bytes("tarfile-gnu.erofs")[:length], _bytes("tarfile-gnu.tar")
    with pytest.raises(ErofsFormatError), _image(meta, tar) as image:
        for _, inode in image.walk():
            image.read(inode, inode.size)


def test_dirent_nameoff_out_of_range() -> None:
    meta = bytearray(_bytes("tarfile-gnu.erofs"))
    with _image(bytes(meta)) as image:
        block = next(iter(image.extents(image.root))).physical
    struct.pack_into("<H", meta, block + 12 + 8, 0xFFF0)    # de[1].nameoff
    with _image(bytes(_fix_crc(meta))) as image, pytest.raises(ErofsFormatError, match="dirent"):
        image.listdir(image.root)


def test_chunk_index_past_the_device() -> None:
    meta, tar = bytearray(_bytes("tarfile-gnu.erofs")), _bytes("tarfile-gnu.tar")
    inode = _first_file(bytes(meta), tar)
    at = -(-inode.tail_offset // 8) * 8
    struct.pack_into("<I", meta, at + 4, 10_000)             # startblk_lo
    with _image(bytes(_fix_crc(meta)), tar) as image:
        with pytest.raises(ErofsFormatError, match="outside the device"):
            image.read(image.inode(inode.nid), 1)
        report = verify_image(image, read_data=True)
        assert not report.ok and any("past" in line for line in report.problems)
    struct.pack_into("<H", meta, at + 2, 3)                  # device id 3 & mask 1 = 1: fine
    with _image(bytes(_fix_crc(meta)), tar) as image:
        assert not verify_image(image).ok


def test_directory_loop() -> None:
    meta = bytearray(_bytes("tarfile-gnu.erofs"))
    with _image(bytes(meta)) as image:
        sub = next(e for e in image.listdir(image.root) if e.ftype == 2 and e.name[0] == "d")
        block = next(iter(image.extents(image.inode(sub.nid)))).physical
        entries = image.listdir(image.inode(sub.nid))
        index = next(i for i, e in enumerate(entries) if e.name not in (".", ".."))
    struct.pack_into("<Q", meta, block + 12 * index, image.root.nid)
    with _image(bytes(_fix_crc(meta))) as image, pytest.raises(ErofsFormatError, match="loop"):
        list(image.walk())


def _exercise(image: ErofsImage) -> None:
    for _, inode in image.walk():
        image.xattrs(inode)
        if inode.is_symlink:
            image.readlink(inode)
        if inode.is_reg:    # bounded: a flipped size may claim petabytes of holes
            image.read(inode, 1 << 16)
            image.read(inode, 1 << 16, max(0, inode.size - (1 << 16)))
    verify_image(image)


@pytest.mark.parametrize("name", ["tarfile-gnu", "raw-features", "dir-4k"])
def test_fuzz_flipped_bytes_raise_only_format_errors(name: str) -> None:
    original = _bytes(f"{name}.erofs")
    layers = [_bytes(f"{name}.tar")] if name != "dir-4k" else []
    rng = random.Random(f"erofs-fuzz-{name}")
    outcomes = {"ok": 0, "format": 0}
    for _ in range(300):
        meta = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            meta[rng.randrange(1024, len(meta))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.9:
            _fix_crc(meta)
        try:
            with _image(bytes(meta), *layers) as image:
                _exercise(image)
            outcomes["ok"] += 1
        except ErofsFormatError:
            outcomes["format"] += 1
    assert outcomes["format"] > 0 and outcomes["ok"] > 0


# -- oracle-built from a tar made here ---------------------------------------------------------

def _oracle_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, data: bytes = b"", **attrs: Any) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), attrs.pop("mtime", 1_650_000_000)
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)
        add("dir", tarfile.DIRTYPE, mode=0o750, uid=1, gid=2)
        for size in (0, 1, 511, 512, 513, 10_000, 70_000):
            add(f"dir/f{size}", tarfile.REGTYPE, os.urandom(size), mode=0o644)
        add("dir/x", tarfile.REGTYPE, b"xattrs", pax_headers={
            "SCHILY.xattr.user.a": "1", "SCHILY.xattr.trusted.t": "2",
            "SCHILY.xattr.security.s": "3", "mtime": "1650000000.5"})
        add("dir/hl", tarfile.LNKTYPE, linkname="dir/f1")
        add("sym", tarfile.SYMTYPE, linkname="dir/f1" + "/.." * 0, mode=0o777)
        add("longsym", tarfile.SYMTYPE, linkname="t" * 700)
        add("chr", tarfile.CHRTYPE, devmajor=300, devminor=70_000)
        add("blk", tarfile.BLKTYPE, devmajor=8, devminor=1)
        add("fifo", tarfile.FIFOTYPE, mode=0o600)
        add("big/" + "n" * 200, tarfile.REGTYPE, b"long name", uid=70_000, gid=100_000)
        for number in range(120):
            add(f"many/entry-{number:03d}-{'x' * 30}", tarfile.REGTYPE, b"%d" % number)
    return out.getvalue()


@pytest.mark.integration
def test_oracle_image_of_a_fresh_tar(tmp_path: Path) -> None:
    require_oracle(MKFS)
    tar = _oracle_tar()
    (tmp_path / "t.tar").write_bytes(tar)
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    subprocess.run([MKFS, "--quiet", "--tar=i", "-T", "1700000000", "--mkfs-time",
                    "-U", "00000000-0000-0000-0000-000000000001", str(tmp_path / "m.erofs"),
                    str(tmp_path / "t.tar")], check=True, env=env)
    with _image((tmp_path / "m.erofs").read_bytes(), tar) as image:
        compare_with_tar(image, tar)
        assert verify_image(image, read_data=True).ok
