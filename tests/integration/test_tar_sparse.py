"""Sparse members (GNU old 'S', PAX sparse 0.0 / 0.1 / 1.0) mount with every file equal to Go's
reading of them, hole-aware: Go's test archives (the 60 GB ones included), CPython's
testtar.tar, and archives GNU tar (every sparse format) and bsdtar write from files with holes
on a tmpfs; through the kernel over meta || tar and through `hybrid-erofs mount` of a gzip
layer; fsck.erofs accepts the images.

The oracle is Go's archive/tar (tools/containerd_apply `list`): containerd 1.6 expands PAX
sparse members the same way but refuses old GNU 'S' members ("unhandled tar header type 83");
we expand those too, as Go's reader, GNU tar and bsdtar do (docs/tar.md).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.erofs.tree import clean
from hybrid_erofs.erofs.writer import MetaBuilder
from tests.conftest import ci_required
from tests.integration.conftest import require_fuse_and_erofs, require_kernel_erofs
from tests.mounting import concat, daemons_for, kernel_mount
from tests.tar_oracle import (
    GO_TESTDATA,
    go_list,
    missing_prerequisites,
    sparse_mismatch,
    split_testtar,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

FSCK = "fsck.erofs-oracle"
GO_SPARSE = ("sparse-formats.tar", "gnu-nil-sparse-data.tar", "gnu-nil-sparse-hole.tar",
             "pax-nil-sparse-data.tar", "pax-nil-sparse-hole.tar", "gnu-sparse-big.tar",
             "pax-sparse-big.tar")
TOOLS = ("gnutar-gnu", "gnutar-oldgnu", "gnutar-posix-0.0", "gnutar-posix-0.1",
         "gnutar-posix-1.0", "bsdtar-pax")
STARTED = time.monotonic()


@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_kernel_erofs(FSCK)
    missing = missing_prerequisites()
    if missing:
        ci_required(f"the Go oracle needs: apt-get install {' '.join(missing)}")


def _files_with_holes(root: Path) -> None:
    """Holes at page granularity (tmpfs): data at odd lengths, a 1.5 GiB file, a file that is
    all hole, and one without holes. (fsck.erofs 1.9.4 --extract fails on any chunk-based
    file over 2 GiB with null chunks, which the kernel reads right: Go's 60 GB archives
    cover that size through the kernel.)"""
    with open(root / "a", "wb") as f:
        f.write(b"A" * 4096)
        f.seek(512 << 10)
        f.write(b"B" * 4196)
        f.truncate((1 << 20) + 123)
    with open(root / "big", "wb") as f:
        for offset, byte in ((0, b"C"), ((1 << 30) + 4096, b"D"), ((3 << 29) - 4096, b"E")):
            f.seek(offset)
            f.write(byte * 4096)
    with open(root / "hole", "wb") as f:
        f.truncate(10 << 20)
    (root / "dense").write_bytes(bytes(range(256)) * 40)


@pytest.fixture(scope="module")
def archives(prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("sparse")
    out = {name: GO_TESTDATA / name for name in GO_SPARSE}
    out["testtar-sparse"] = split_testtar(work)[1]
    holes = work / "holes"
    holes.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(holes)], check=True)
    try:
        _files_with_holes(holes)
        commands = {
            "gnutar-gnu": ["tar", "--sparse", "--format=gnu"],
            "gnutar-oldgnu": ["tar", "--sparse", "--format=oldgnu"],
            **{f"gnutar-posix-{v}": ["tar", "--sparse", "--format=posix", f"--sparse-version={v}"]
               for v in ("0.0", "0.1", "1.0")},
            "bsdtar-pax": ["bsdtar", "--format", "pax"],
        }
        for name, argv in commands.items():
            out[name] = work / f"{name}.tar"
            subprocess.run([*argv, "-cf", str(out[name]), "-C", str(holes), "."], check=True)
    finally:
        subprocess.run(["umount", str(holes)], check=True)
    return out


def _build(tar: Path, meta: Path) -> None:
    builder = MetaBuilder(build_time=1_700_000_000)
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            builder.feed(memoryview(chunk))
    meta.write_bytes(builder.finish())


def _go_data_sha(path: Path) -> str:
    """tools/containerd_apply's data map hash of a plain file: its non-zero 4 KiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4096):
            if block.count(0) != len(block):
                digest.update(block)
    return digest.hexdigest()


def _mismatches(mnt: Path, entries: list[dict[str, Any]]) -> list[str]:
    wrong = []
    for entry in entries:
        if entry["typeflag"] not in ("0", "S"):
            continue
        rel = os.fsdecode(b"/".join(clean(entry["name"].encode("utf-8", "surrogateescape"))))
        path = mnt / rel
        st = os.lstat(path)
        want = (entry["size"], entry["mode"] & 0o7777, entry["uid"], entry["gid"],
                max(entry["mtime_ns"], 0))
        got = (st.st_size, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns)
        if got != want:
            wrong.append(f"{rel}: {got} != {want}")
        elif entry.get("holes") is not None:
            problem = sparse_mismatch(path, entry)
            if problem:
                wrong.append(f"{rel}: {problem}")
        elif _go_data_sha(path) != entry["data_sha256"]:
            wrong.append(f"{rel}: content differs")
    return wrong


@pytest.mark.parametrize("name", [*GO_SPARSE, "testtar-sparse", *TOOLS])
def test_sparse_members_equal_go(archives: dict[str, Path], tmp_path: Path, name: str) -> None:
    tar = archives[name]
    meta = tmp_path / "m.erofs"
    _build(tar, meta)
    proc = subprocess.run([FSCK, str(meta)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not name.endswith("-big.tar"):  # fsck --extract would write the 60 GB file
        extract = tmp_path / "extract"
        proc = subprocess.run([FSCK, f"--device={tar}", f"--extract={extract}", str(meta)],
                              capture_output=True, text=True)
        shutil.rmtree(extract, ignore_errors=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    entries = go_list(tar)
    assert any(e.get("holes") is not None for e in entries) or name.startswith("gnu-nil")
    device = concat(meta, tar, tmp_path / "device.img")
    with kernel_mount(device, tmp_path / "mnt") as mnt:
        assert _mismatches(mnt, entries) == []


def test_the_60_gb_file_keeps_the_meta_small(archives: dict[str, Path], tmp_path: Path) -> None:
    # 60,000,000,000 bytes, six 100-byte segments 10 GB apart at odd offsets: the cheapest
    # chunk layout is 256 KiB chunks (a 228,882-entry index, 1.8 MB) and six copied chunks.
    # A chunk-based inode cannot do better (docs/tar.md, "Sparse files").
    for name in ("gnu-sparse-big.tar", "pax-sparse-big.tar"):
        meta = tmp_path / f"{name}.erofs"
        _build(archives[name], meta)
        assert meta.stat().st_size < 3_400_000


MOUNTED = (*GO_SPARSE, "testtar-sparse", *TOOLS)


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_fuse_and_erofs()
    yield {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(tmp_path / "run")}
    assert daemons_for(tmp_path / "run") == []


@pytest.mark.parametrize("name", MOUNTED)
def test_hybrid_erofs_mount_of_sparse_gzip_layers(archives: dict[str, Path], tmp_path: Path,
                                                  cli_env: dict[str, str], name: str) -> None:
    tar = archives[name]
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(tar.read_bytes(), mtime=0))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hybrid_erofs", *args], env=cli_env,
                              capture_output=True, text=True, timeout=120)

    proc = cli("index", str(layer), "-o", str(tmp_path / "l.zinfo"), "--meta",
               str(tmp_path / "m.erofs"))
    assert proc.returncode == 0, proc.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = cli("mount", "--meta", str(tmp_path / "m.erofs"), "--zinfo",
               str(tmp_path / "l.zinfo"), str(layer), str(mnt))
    assert proc.returncode == 0, proc.stderr
    try:
        wrong = _mismatches(mnt, go_list(tar))
    finally:
        assert cli("umount", str(mnt)).returncode == 0
    assert wrong == []
