"""Kernel view of our meta || tar equals the kernel view of mkfs.erofs --tar=i's, for every corpus
tar, wherever erofs-utils unpacks what containerd unpacks (where it does not, ours must equal
containerd's tree: tests/integration/test_tar_parity.py checks that for every archive).

Also checked: fsck.erofs accepts our images and extracts every file from the tar device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.erofs.writer import MetaBuilder
from tests.conftest import _load_tool, ci_required
from tests.integration.conftest import require_kernel_erofs
from tests.mounting import concat, kernel_mount, walk_tree
from tests.tar_oracle import comparable, containerd_apply, explicit_paths, missing_prerequisites

pytestmark = [pytest.mark.integration, pytest.mark.root]

CORPUS_NAMES = sorted(_load_tool("make_tar_corpus").corpus())
BUILD_TIME = 1_700_000_000
UUID = "00000000-0000-0000-0000-000000000000"
MKFS, FSCK = "mkfs.erofs-oracle", "fsck.erofs-oracle"




@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_kernel_erofs(MKFS, FSCK)
    missing = missing_prerequisites()
    if missing:
        ci_required(f"the containerd oracle needs: apt-get install {' '.join(missing)}")






def build_ours(tar: Path, out: Path, *, aufs: bool) -> MetaBuilder:
    builder = MetaBuilder(aufs=aufs, build_time=BUILD_TIME)
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            builder.feed(memoryview(chunk))
    out.write_bytes(builder.finish())
    return builder


def build_oracle(tar: Path, out: Path, *, aufs: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}  # it clamps mtimes
    cmd = [MKFS, "--quiet", "--tar=i", "-T", str(BUILD_TIME), "--mkfs-time", "-U", UUID]
    proc = subprocess.run([*cmd, *(["--aufs"] if aufs else []), str(out), str(tar)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"mkfs.erofs failed on {tar.name}: {proc.stderr}"


def kernel_view(meta: Path, tar: Path, work: Path, *, via: str) -> dict[str, dict[str, Any]]:
    device = concat(meta, tar, work / f"{meta.stem}.img")
    try:
        with kernel_mount(device, work / f"mnt-{meta.stem}", via=via) as mnt:
            return walk_tree(mnt)
    finally:
        device.unlink()


def assert_fsck_ok(meta: Path, tar: Path, work: Path) -> None:
    proc = subprocess.run([FSCK, str(meta)], capture_output=True, text=True)
    assert proc.returncode == 0, f"fsck {meta.name}: {proc.stdout}{proc.stderr}"
    extract = work / "extract"
    proc = subprocess.run([FSCK, f"--device={tar}", f"--extract={extract}", str(meta)],
                          capture_output=True, text=True)
    shutil.rmtree(extract, ignore_errors=True)
    assert proc.returncode == 0, f"fsck --extract {meta.name}: {proc.stdout}{proc.stderr}"


def compare_with_oracle(tar: Path, work: Path, *, aufs: bool, via: str) -> int:
    """Ours == mkfs's on every path, except where mkfs's differs from containerd's and ours
    is containerd's (root and implied directories 0755 root:root, symlinks 0777, hard links
    taking their header's attributes, xattrs containerd does not set, times before 1970)."""
    ours, oracle = work / "ours.erofs", work / "oracle.erofs"
    build_ours(tar, ours, aufs=aufs)
    build_oracle(tar, oracle, aufs=aufs)
    assert_fsck_ok(ours, tar, work)
    explicit = explicit_paths(tar)
    got = comparable(kernel_view(ours, tar, work, via=via), explicit)
    want = comparable(kernel_view(oracle, tar, work, via=via), explicit)
    assert containerd_apply(tar, work / "containerd", overlay=aufs) is None
    parity = comparable(walk_tree(work / "containerd"), explicit)
    differing = [p for p in sorted(set(got) | set(want)) if got.get(p) != want.get(p)]
    wrong = [p for p in differing if got.get(p) != parity.get(p) or want.get(p) == parity.get(p)]
    assert not wrong, "\n".join(
        f"{p!r}:\n  ours   {got.get(p)}\n  mkfs   {want.get(p)}\n  containerd {parity.get(p)}"
        for p in wrong[:10])
    return len(got)


@pytest.mark.parametrize("via", ["file", "loop"])
@pytest.mark.parametrize("aufs", [False, True], ids=["plain", "aufs"])
@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_matches_oracle(prerequisites: None, corpus: Path, tmp_path: Path, name: str,
                               aufs: bool, via: str) -> None:
    assert compare_with_oracle(corpus / name, tmp_path, aufs=aufs, via=via) >= 1


def test_same_meta_with_separate_tar_device(prerequisites: None, corpus: Path,
                                            tmp_path: Path) -> None:
    """The meta alone, file-backed, with the tar as `-o device=` (erofs-tarindex.md §1.4)."""
    import ctypes

    tar = corpus / "tarfile-pax.tar"
    meta = tmp_path / "ours.erofs"
    build_ours(tar, meta, aufs=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    rc = libc.mount(bytes(meta), bytes(mnt), b"erofs", 1, f"device={tar}".encode())
    if rc != 0:
        pytest.fail(f"mount with device= failed: {os.strerror(ctypes.get_errno())}")
    try:
        separate = walk_tree(mnt)
    finally:
        libc.umount2(bytes(mnt), 0)
    assert separate == kernel_view(meta, tar, tmp_path, via="file")


def test_real_rootfs_tar_matches_oracle(prerequisites: None, tmp_path: Path) -> None:
    """A real root filesystem tar, e.g. debootstrap --variant=minbase + tar --xattrs."""
    rootfs = os.environ.get("HYBRID_EROFS_ROOTFS_TAR")
    if not rootfs:
        ci_required("HYBRID_EROFS_ROOTFS_TAR is not set (a tar of a real root filesystem)")
    paths = compare_with_oracle(Path(rootfs), tmp_path, aufs=False, via="file")
    assert paths > 100
