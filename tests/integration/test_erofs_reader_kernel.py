"""The pure-Python reader's view of oracle-built meta images equals the kernel's view of meta || tar.

Images come from `mkfs.erofs --tar=i` over the tar corpus (tools/make_tar_corpus.py); the kernel
mounts the concatenation (file-backed mount(2) and loop) and tests/mounting.walk_tree walks it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.erofs.layout import Inode
from hybrid_erofs.erofs.reader import ErofsImage
from hybrid_erofs.source import FileSource
from tests.conftest import _load_tool, ci_required
from tests.integration.conftest import require_kernel_erofs
from tests.mounting import concat, kernel_mount, walk_tree

pytestmark = [pytest.mark.integration, pytest.mark.root]

CORPUS_NAMES = sorted(_load_tool("make_tar_corpus").corpus())
MKFS = "mkfs.erofs-oracle"
MKFS_ARGS = ["--quiet", "--tar=i", "-T", "1700000000", "--mkfs-time",
             "-U", "00000000-0000-0000-0000-000000000001"]
# Namespaces the kernel lists (fs/erofs/xattr.c); mkfs stores other names under index 0,
# which the kernel hides (erofs-tarindex.md §1.7).
KERNEL_XATTR_PREFIXES = ("user.", "trusted.", "security.", "system.posix_acl_access",
                         "system.posix_acl_default")
TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chr",
         stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock"}




@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_kernel_erofs(MKFS)






def reader_tree(image: ErofsImage) -> dict[str, dict[str, Any]]:
    """The reader's walk in tests/mounting.walk_tree's format (st_ino == nid in the kernel)."""
    entries: list[tuple[str, Inode]] = sorted((path.lstrip("/"), inode)
                                              for path, inode in image.walk())
    first_by_nid: dict[int, str] = {}
    tree: dict[str, dict[str, Any]] = {}
    for rel, inode in entries:
        kind = TYPES[stat.S_IFMT(inode.mode)]
        entry: dict[str, Any] = {
            "type": kind, "mode": stat.S_IMODE(inode.mode), "uid": inode.uid, "gid": inode.gid,
            "mtime_ns": inode.mtime_ns, "nlink": inode.nlink,
            "xattrs": {name: value for name, value in sorted(image.xattrs(inode).items())
                       if name.startswith(KERNEL_XATTR_PREFIXES)},
        }
        if kind != "dir":
            entry["size"] = inode.size
            entry["link_group"] = first_by_nid.setdefault(inode.nid, rel)
        if kind in ("chr", "blk"):
            entry["rdev"] = inode.rdev
        if kind == "symlink":
            entry["target"] = image.readlink(inode)
        if kind == "file":
            digest = hashlib.sha256()
            for piece in image.iter_read(inode, piece=1 << 16):
                digest.update(piece)
            entry["sha256"] = digest.hexdigest()
        tree[rel] = entry
    return tree


def _build(tar: Path, meta: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}  # it clamps mtimes
    proc = subprocess.run([MKFS, *MKFS_ARGS, str(meta), str(tar)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, f"mkfs.erofs failed on {tar.name}: {proc.stderr}"


@pytest.mark.usefixtures("prerequisites")
@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_reader_walk_equals_kernel_view(name: str, corpus: Path, tmp_path: Path) -> None:
    tar, meta = corpus / name, tmp_path / "meta.erofs"
    _build(tar, meta)
    disk = concat(meta, tar, tmp_path / "disk.img")
    with ErofsImage(FileSource(meta), devices=[FileSource(tar)]) as image:
        ours = reader_tree(image)
        inos = {path.lstrip("/"): inode.nid for path, inode in image.walk()}
    with ErofsImage(FileSource(meta), flat=FileSource(disk)) as image:
        assert reader_tree(image) == ours, "flat mode differs from devices mode"
    with kernel_mount(disk, tmp_path / "mnt", via="file") as mnt:
        kernel = walk_tree(mnt)
        kernel_inos = {rel: os.lstat(mnt / rel).st_ino for rel in kernel}
    assert sorted(ours) == sorted(kernel)
    for path in kernel:
        assert ours[path] == kernel[path], path
    assert inos == kernel_inos  # the kernel uses the nid as st_ino


@pytest.mark.usefixtures("prerequisites")
def test_reader_equals_kernel_over_loop_device(corpus: Path, tmp_path: Path) -> None:
    tar, meta = corpus / "tarfile-pax.tar", tmp_path / "meta.erofs"
    _build(tar, meta)
    disk = concat(meta, tar, tmp_path / "disk.img")
    with ErofsImage(FileSource(meta), devices=[FileSource(tar)]) as image:
        ours = reader_tree(image)
    with kernel_mount(disk, tmp_path / "mnt", via="loop") as mnt:
        assert walk_tree(mnt) == ours


@pytest.mark.usefixtures("prerequisites")
def test_rootfs_tar_when_available(tmp_path: Path) -> None:
    """A real Debian root filesystem (CI exports HYBRID_EROFS_ROOTFS_TAR)."""
    rootfs = os.environ.get("HYBRID_EROFS_ROOTFS_TAR")
    if not rootfs:
        ci_required("HYBRID_EROFS_ROOTFS_TAR is not set (a tar of a real root filesystem)")
    tar, meta = Path(rootfs), tmp_path / "meta.erofs"
    _build(tar, meta)
    disk = concat(meta, tar, tmp_path / "disk.img")
    with ErofsImage(FileSource(meta), devices=[FileSource(tar)]) as image:
        ours = reader_tree(image)
    with kernel_mount(disk, tmp_path / "mnt", via="file") as mnt:
        kernel = walk_tree(mnt)
    assert sorted(ours) == sorted(kernel)
    assert [p for p in kernel if ours[p] != kernel[p]] == []
