"""The FUSE single-file export, judged by the kernel: the file equals meta || tar byte for byte,
EROFS mounts it (file-backed and through a loop device) with the same tree as the plain device
file, source failures reach readers as EIO, and nothing is left mounted or running afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.device import open_device
from hybrid_erofs.erofs.writer import MetaBuilder
from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.export.fuse import ExportBusy, ExportError, FuseExport
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import write_index
from hybrid_erofs.source import ByteSource, MemorySource, check_range
from tests.conftest import layer_tar
from tests.doubles import CountingSource
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import concat, kernel_mount, losetup_entries, walk_tree

pytestmark = [pytest.mark.integration, pytest.mark.root]

BUILD_TIME = 1_700_000_000
Tree = dict[str, dict[str, Any]]


class FailingSource(MemorySource):
    """Raises SourceIOError for any read overlapping [bad_offset, bad_offset + bad_length)."""

    def __init__(self, data: bytes, *, bad_offset: int, bad_length: int) -> None:
        super().__init__(data)
        self.bad_offset, self.bad_length = bad_offset, bad_length
        self.failures = 0

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if offset < self.bad_offset + self.bad_length and self.bad_offset < offset + length:
            self.failures += 1
            raise SourceIOError(f"failing: read of {length} bytes at offset {offset}")
        return super().pread(length, offset)


def _fuse_mounts() -> list[str]:
    with open("/proc/mounts") as mounts:
        return [line for line in mounts if ("hybrid-erofs" in line or " erofs " in line)
                and tempfile.gettempdir() in line]


@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_fuse_and_erofs()


@pytest.fixture(autouse=True)
def leaves_nothing_behind(prerequisites: None) -> Iterator[None]:
    loops = losetup_entries() if shutil.which("losetup") else []
    mounts = _fuse_mounts()
    tasks = len(os.listdir("/proc/self/task"))
    yield
    assert _fuse_mounts() == mounts
    if shutil.which("losetup"):
        assert losetup_entries() == loops
    assert not [t for t in threading.enumerate() if t.name.startswith("fuse:")]
    # libfuse's worker threads are not Python threads: count the kernel's tasks instead (a
    # thread that was joined may take a moment to leave the kernel's list).
    deadline = time.monotonic() + 2.0
    while len(os.listdir("/proc/self/task")) > tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) <= tasks


def build_layer_files(gz: Path, work: Path) -> dict[str, Path]:
    """gz, its tar, zinfo and meta (built here, not by the CLI), and `device` = meta || tar."""
    stem = gz.name.removesuffix(".tar.gz")
    zinfo, meta = work / f"{stem}.zinfo", work / f"{stem}.meta.erofs"
    with open(gz, "rb") as blob:
        write_index(build_index(blob, span=256 << 10).index, zinfo)
    tar = layer_tar(gz)
    builder = MetaBuilder(build_time=BUILD_TIME)
    builder.feed(tar.read_bytes())
    meta.write_bytes(builder.finish())
    return {"gz": gz, "tar": tar, "zinfo": zinfo, "meta": meta,
            "device": concat(meta, tar, work / "device.img")}


@pytest.fixture(scope="module")
def layer(layers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """rootfs.tar.gz with its tar, zinfo, meta and device."""
    return build_layer_files(layers["rootfs"], tmp_path_factory.mktemp("fuse-layer"))


@pytest.fixture(scope="module")
def device_bytes(layer: dict[str, Path]) -> bytes:
    return layer["device"].read_bytes()


@pytest.fixture(scope="module")
def reference_tree(layer: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Tree:
    mnt = tmp_path_factory.mktemp("reference-mnt")
    with kernel_mount(layer["device"], mnt, via="file"):
        return walk_tree(mnt)


@pytest.fixture
def stack(layer: dict[str, Path]) -> Iterator[ByteSource]:
    """The real device stack: meta || GzipSource(rootfs.tar.gz, zinfo)."""
    source = open_device(str(layer["gz"]), meta=layer["meta"], zinfo=layer["zinfo"])
    try:
        yield source
    finally:
        source.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_file_has_size_and_bytes_of_device(stack: ByteSource, device_bytes: bytes,
                                           tmp_path: Path) -> None:
    with FuseExport(stack, tmp_path, name="layer.img") as export:
        assert os.listdir(tmp_path) == ["layer.img"]
        st = os.stat(export.path)
        assert st.st_size == len(device_bytes) == stack.size
        assert st.st_mode & 0o777 == 0o444
        assert _sha256(export.path) == hashlib.sha256(device_bytes).hexdigest()
        rng = random.Random(5)
        size = len(device_bytes)
        fd = os.open(export.path, os.O_RDONLY)
        try:
            for _ in range(300):
                offset = rng.randrange(size)
                length = rng.choice([1, 511, 4096, 65536, 300_000])
                assert os.pread(fd, length, offset) == device_bytes[offset:offset + length]
            # read(2) at EOF: the short tail; beyond EOF: nothing.
            assert os.pread(fd, 4096, size - 100) == device_bytes[-100:]
            assert os.pread(fd, 4096, size) == b""
            assert os.pread(fd, 4096, size + 12345) == b""
        finally:
            os.close(fd)
        with pytest.raises(OSError) as info:
            os.open(export.path, os.O_RDWR)
        assert info.value.errno in (errno.EROFS, errno.EACCES)
        vfs = os.statvfs(tmp_path)
        assert vfs.f_bfree == 0 and vfs.f_blocks * vfs.f_frsize >= size
    assert not export.running


@pytest.mark.parametrize("via", ["file", "loop"])
def test_kernel_mounts_the_fuse_file(stack: ByteSource, reference_tree: Tree,
                                     layer: dict[str, Path], tmp_path: Path, via: str) -> None:
    (tmp_path / "fuse").mkdir()
    with FuseExport(stack, tmp_path / "fuse", head_bytes=layer["meta"].stat().st_size) as export, \
            kernel_mount(export.path, tmp_path / "mnt", via=via) as mnt:
        assert walk_tree(mnt) == reference_tree
        # The EROFS mount holds the file: the export must refuse to go away under it.
        with pytest.raises(ExportBusy) as info:
            export.stop()
        assert str(tmp_path / "mnt") in str(info.value)
        assert export.running
        # ... and serve on, the meta read ahead again after the refused stop.
        assert export.head is not None
        windows = export.head.windows
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert walk_tree(mnt) == reference_tree
        assert export.head.windows > windows
    assert not export.running


def _bad_member(tar: Path) -> tuple[str, int, int]:
    """The largest regular file of the tar: (name, data offset in the tar, size)."""
    with tarfile.open(tar) as archive:
        member = max((m for m in archive.getmembers() if m.isreg()), key=lambda m: m.size)
        return member.name, member.offset_data, member.size


def test_source_errors_reach_readers_as_eio(layer: dict[str, Path], device_bytes: bytes,
                                            tmp_path: Path) -> None:
    name, data_offset, size = _bad_member(layer["tar"])
    assert size > 64 << 10
    meta_size = layer["meta"].stat().st_size
    bad_offset = meta_size + data_offset + size // 2
    source = FailingSource(device_bytes, bad_offset=bad_offset, bad_length=4096)
    (tmp_path / "fuse").mkdir()
    with FuseExport(source, tmp_path / "fuse") as export:
        fd = os.open(export.path, os.O_RDONLY)
        try:
            page = bad_offset - bad_offset % 4096
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, page)
            assert info.value.errno == errno.EIO
            # A read that starts before the bad range stops short of it (read(2) returns what
            # it got before the error): fewer bytes, never other bytes.
            got = os.pread(fd, 3 * 4096, page - 8192)
            assert len(got) < 3 * 4096 and got == device_bytes[page - 8192:page - 8192 + len(got)]
            assert os.pread(fd, 4096, 0) == device_bytes[:4096]
        finally:
            os.close(fd)
        with kernel_mount(export.path, tmp_path / "mnt", via="file") as mnt:
            inside = mnt / name.removeprefix("./")
            with pytest.raises(OSError) as info, open(inside, "rb") as f:
                f.read()
            assert info.value.errno == errno.EIO
            # Everything away from the bad range still reads correctly.
            others = [p for p, e in walk_tree(mnt, contents=False).items()
                      if e["type"] == "file" and p != name.removeprefix("./")
                      and e["size"] < 64 << 10]
            assert others
            for rel in others[:20]:
                (mnt / rel).read_bytes()
    assert source.failures > 0


def test_concurrent_readers_get_correct_data(stack: ByteSource, device_bytes: bytes,
                                             tmp_path: Path) -> None:
    size = len(device_bytes)
    rng = random.Random(8)
    ranges = [(rng.randrange(size), rng.choice([4096, 131072, 1 << 20])) for _ in range(64)]
    with FuseExport(stack, tmp_path) as export:
        # 8 processes, each hashing its own slices (a cold page cache: fresh mount).
        script = ("import hashlib, os, sys\n"
                  "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                  "for spec in sys.argv[2:]:\n"
                  "    offset, length = map(int, spec.split(':'))\n"
                  "    print(hashlib.sha256(os.pread(fd, length, offset)).hexdigest())\n")
        procs = [subprocess.Popen([sys.executable, "-c", script, str(export.path),
                                   *(f"{o}:{n}" for o, n in ranges[i::8])],
                                  stdout=subprocess.PIPE, text=True) for i in range(8)]
        for i, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            want = [hashlib.sha256(device_bytes[o:o + n]).hexdigest() for o, n in ranges[i::8]]
            assert out.split() == want
        # 8 threads of this process (the one serving the requests).
        errors: list[str] = []

        def reader(seed: int) -> None:
            local = random.Random(seed)
            fd = os.open(export.path, os.O_RDONLY)
            try:
                for _ in range(50):
                    offset, length = local.randrange(size), local.choice([512, 65536, 262144])
                    if os.pread(fd, length, offset) != device_bytes[offset:offset + length]:
                        errors.append(f"wrong bytes at {offset}+{length}")
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []


def test_external_unmount_ends_the_export(tmp_path: Path) -> None:
    export = FuseExport(MemorySource(b"x" * 4096), tmp_path)
    export.start()
    try:
        subprocess.run(["fusermount3", "-u", str(tmp_path)] if shutil.which("fusermount3")
                       else ["umount", str(tmp_path)], check=True)
        assert export.wait(10)
    finally:
        export.stop(force=True)


def test_mountpoint_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a directory"):
        FuseExport(MemorySource(b""), tmp_path / "missing").start()


def _wait_for(condition: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_miss_in_the_head_reads_it_ahead(layer: dict[str, Path], device_bytes: bytes,
                                           tmp_path: Path) -> None:
    """A block of the head (the meta image) read without readahead, as EROFS reads metadata,
    brings the rest of the head into the page cache at once: the next blocks never reach the
    source. Reads past the head ask for nothing more, and the export stops with the
    read-ahead's descriptor gone (no EBUSY)."""
    head = layer["meta"].stat().st_size
    assert head > 4 * 4096
    source = CountingSource(device_bytes)
    with FuseExport(source, tmp_path, head_bytes=head) as export:
        assert export.head is not None
        fd = os.open(export.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead for this reader
            assert os.pread(fd, 4096, 8192) == device_bytes[8192:12288]
            _wait_for(lambda: any(offset <= 12288 and offset + length >= head
                                  for length, offset in source.calls), "the head's read-ahead")
            assert export.head.windows == 1
            source.calls.clear()
            for offset in range(8192, head, 4096):  # the window starts at the miss
                assert os.pread(fd, 4096, offset) == device_bytes[offset:offset + 4096]
            assert source.calls == []  # all of it from the page cache
            past = head + (head % 4096 and 4096 - head % 4096) + 40960
            assert os.pread(fd, 4096, past) == device_bytes[past:past + 4096]
            assert source.calls == [(4096, past)]
            assert export.head.windows == 1
        finally:
            os.close(fd)
    assert not export.running
    assert not [t for t in threading.enumerate() if t.name == "head-read-ahead"]


@pytest.fixture(scope="module")
def wide_device(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, Path]:
    """A layer of 3,000 small files in 60 directories, as device bytes (meta || tar), the
    meta's size, and the device file: metadata of many blocks."""
    work = tmp_path_factory.mktemp("wide")
    tar = work / "wide.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:
        for d in range(60):
            info = tarfile.TarInfo(f"dir{d:02d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, BUILD_TIME
            archive.addfile(info)
            for f in range(50):
                data = f"{d}/{f}\n".encode() * (f % 7 + 1)
                info = tarfile.TarInfo(f"dir{d:02d}/file-with-a-longer-name-{f:03d}")
                info.size, info.mode, info.mtime = len(data), 0o644, BUILD_TIME
                archive.addfile(info, io.BytesIO(data))
    builder = MetaBuilder(build_time=BUILD_TIME)
    builder.feed(tar.read_bytes())
    meta = work / "wide.meta.erofs"
    meta.write_bytes(builder.finish())
    device = concat(meta, tar, work / "device.img")
    return device.read_bytes(), meta.stat().st_size, device


@pytest.mark.parametrize("head", [True, False])
def test_a_cold_walk_of_the_kernel_mount_reads_the_head_at_once(
        wide_device: tuple[bytes, int, Path], tmp_path: Path, head: bool) -> None:
    """EROFS reads its metadata a block at a time: a cold walk of the tree makes a FUSE read
    per block without the head's read-ahead and almost none with it (the oracle: the same walk
    of the same mount without it; the tree: the device file mounted directly)."""
    data, meta, device = wide_device
    assert meta >= 32 * 4096
    with kernel_mount(device, tmp_path / "reference", via="file") as mnt:
        reference = walk_tree(mnt)
    source = CountingSource(data)
    (tmp_path / "fuse").mkdir()
    with FuseExport(source, tmp_path / "fuse", head_bytes=meta if head else 0) as export, \
            kernel_mount(export.path, tmp_path / "mnt", via="file") as mnt:
        assert walk_tree(mnt) == reference
        small = [(length, offset) for length, offset in source.calls
                 if offset < meta and length <= 8192]
    if head:
        assert len(small) <= 8, small
    else:
        assert len(small) >= 16, small
