"""Real NBD clients against our server: nbdinfo, nbdcopy, qemu-img and nbdfuse + the kernel's EROFS.

The export is a real device (meta || tar) from open_device(), over a plain tar and a gzip layer
read through its zinfo; served on a unix socket and on loopback TCP.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.device import open_device
from hybrid_erofs.erofs.writer import MetaBuilder
from hybrid_erofs.export.nbd import NbdServer
from hybrid_erofs.indexing.layer import index_layer
from tests.conftest import ci_required
from tests.mounting import kernel_mount, losetup_entries, walk_tree

pytestmark = [pytest.mark.integration]

BUILD_TIME = 1_700_000_000
CLIENT_TIMEOUT_S = 60


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            ci_required(f"{tool} is not installed (apt-get install libnbd-bin qemu-utils fuse3)")


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}"
    return proc


def make_tar() -> bytes:
    """A small layer with several gzip spans' worth of data and the usual entry types."""
    rng = random.Random(5)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes | None = None, **attrs: Any) -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid = BUILD_TIME, 1000, 1000
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        add("etc", type=tarfile.DIRTYPE, mode=0o755)
        add("etc/hostname", b"nbd-test\n", mode=0o644)
        add("etc/empty", b"", mode=0o600)
        add("bin", type=tarfile.DIRTYPE, mode=0o755)
        add("bin/random.bin", rng.randbytes(3 << 20), mode=0o755)
        add("bin/text.txt", b"".join(b"line %d of some text\n" % i for i in range(200_000)))
        add("bin/link", type=tarfile.SYMTYPE, linkname="random.bin")
        add("bin/hard", type=tarfile.LNKTYPE, linkname="bin/text.txt")
        for i in range(50):
            add(f"many/f{i:03}", rng.randbytes(rng.randrange(1, 20_000)), mode=0o644)
    return buf.getvalue()


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tar, tar.gz, its zinfo, the meta, and disk.img = meta || tar (the expected device)."""
    work = tmp_path_factory.mktemp("nbd-layer")
    tar = make_tar()
    builder = MetaBuilder(build_time=BUILD_TIME)
    builder.feed(tar)
    meta = builder.finish()
    paths = {name: work / name for name in ("layer.tar", "layer.tar.gz", "layer.zinfo",
                                            "meta.erofs", "disk.img")}
    paths["layer.tar"].write_bytes(tar)
    paths["meta.erofs"].write_bytes(meta)
    paths["disk.img"].write_bytes(meta + tar)
    subprocess.run(["gzip", "-6", "-n", "-k", str(paths["layer.tar"])], check=True)
    index_layer(str(paths["layer.tar.gz"]), zinfo=paths["layer.zinfo"], meta=None,
                span=1 << 20)
    return paths


@pytest.fixture(params=["tar", "gzip"])
def server(request: pytest.FixtureRequest, layer: dict[str, Path]) -> Iterator[NbdServer]:
    """Our server over open_device(...), on a unix socket and loopback TCP at once."""
    if request.param == "gzip":
        device = open_device(str(layer["layer.tar.gz"]), meta=layer["meta.erofs"],
                             zinfo=layer["layer.zinfo"])
    else:
        device = open_device(str(layer["layer.tar"]), meta=layer["meta.erofs"])
    sockdir = Path(tempfile.mkdtemp(prefix="nbdit", dir="/tmp"))
    srv = NbdServer(device, socket_path=sockdir / "nbd.sock", listen=("127.0.0.1", 0),
                    description="hybrid-erofs test device")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        thread.join(30)
        device.close()
        assert not (sockdir / "nbd.sock").exists()
        shutil.rmtree(sockdir, ignore_errors=True)


def uris(server: NbdServer) -> dict[str, str]:
    assert server.tcp_address is not None
    host, port = server.tcp_address
    return {"unix": f"nbd+unix:///?socket={server.socket_path}", "tcp": f"nbd://{host}:{port}/"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdinfo_reports_the_export(server: NbdServer, layer: dict[str, Path],
                                    transport: str) -> None:
    need("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", uris(server)[transport]).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (export,) = info["exports"]
    assert export["export-size"] == layer["disk.img"].stat().st_size
    assert export["description"] == "hybrid-erofs test device"
    assert export["is_read_only"] is True
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (512, 4096, 32 << 20)
    for flag in ("can_multi_conn", "can_flush", "can_cache", "can_df"):
        assert export[flag] is True, flag
    for flag in ("can_trim", "can_zero", "can_fua", "is_rotational"):
        assert export[flag] is False, flag
    assert "base:allocation" in export["contexts"]
    listing = run("nbdinfo", "--list", "--json", uris(server)[transport]).stdout
    assert json.loads(listing)["exports"][0]["export-name"] == ""
    extents = run("nbdinfo", "--map", uris(server)[transport]).stdout.split()
    assert extents == ["0", str(export["export-size"]), "0", "data"]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("connections", ["1", "4"])
def test_nbdcopy_copies_meta_and_tar(server: NbdServer, layer: dict[str, Path],
                                     tmp_path: Path, transport: str, connections: str) -> None:
    need("nbdcopy")
    out = tmp_path / "copy.img"
    run("nbdcopy", "-C", connections, "-T", connections, "--request-size", str(4 << 20),
        uris(server)[transport], str(out))
    assert sha256_file(out) == sha256_file(layer["disk.img"])
    run("nbdcopy", "--synchronous", uris(server)[transport], str(out))
    assert sha256_file(out) == sha256_file(layer["disk.img"])


def test_qemu_img_compare(server: NbdServer, layer: dict[str, Path]) -> None:
    need("qemu-img")
    for uri in uris(server).values():
        proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(layer["disk.img"]), uri)
        assert "identical" in proc.stdout
    info = json.loads(run("qemu-img", "info", "--output=json", uris(server)["unix"]).stdout)
    assert info["virtual-size"] == layer["disk.img"].stat().st_size


@contextmanager
def nbdfuse(uri_args: list[str], mountpoint: Path) -> Iterator[Path]:
    """Run nbdfuse read-only; yield the export file; always unmount and reap it."""
    mountpoint.mkdir()
    pidfile = mountpoint.parent / "nbdfuse.pid"
    proc = subprocess.Popen(["nbdfuse", "-r", "-P", str(pidfile), str(mountpoint), *uri_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"nbdfuse exited with {proc.returncode}: {proc.communicate()[1]}")
            assert time.monotonic() < deadline, "nbdfuse did not get ready"
            time.sleep(0.05)
        yield mountpoint / "nbd"
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def expected_files(tar_path: Path) -> dict[str, str]:
    """sha256 of every regular file's contents, by path, straight from the tar."""
    out: dict[str, str] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                out[member.name] = hashlib.sha256(f.read()).hexdigest()
            elif member.islnk():
                out[member.name] = out[member.linkname]
    return out


@pytest.mark.root
@pytest.mark.parametrize("via", ["file", "loop"])
def test_nbdfuse_export_mounts_as_erofs(server: NbdServer, layer: dict[str, Path],
                                        tmp_path: Path, via: str) -> None:
    need("nbdfuse", "fusermount3")
    if os.geteuid() != 0:
        ci_required("kernel EROFS mounts and FUSE need root")
    if not Path("/dev/fuse").exists():
        ci_required("/dev/fuse is missing")
    loops_before = losetup_entries() if shutil.which("losetup") else []
    # The expected tree: the kernel's own view of the local disk.img (file-backed mount).
    with kernel_mount(layer["disk.img"], tmp_path / "local", via="file") as mnt:
        local = walk_tree(mnt)
    assert server.socket_path is not None
    with nbdfuse(["--unix", str(server.socket_path)], tmp_path / "fuse") as export:
        assert export.stat().st_size == layer["disk.img"].stat().st_size
        with kernel_mount(export, tmp_path / "mnt", via=via) as mnt:
            remote = walk_tree(mnt)
    assert remote == local
    files = expected_files(layer["layer.tar"])
    assert {path: remote[path]["sha256"] for path in files} == files
    assert remote["bin/link"]["target"] == "random.bin"
    assert remote["bin/hard"]["link_group"] == remote["bin/text.txt"]["link_group"]
    # Nothing left behind: no mounts under tmp_path, no loop devices.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts
    if shutil.which("losetup"):
        assert losetup_entries() == loops_before


@pytest.mark.root
def test_nbdfuse_over_tcp(server: NbdServer, layer: dict[str, Path], tmp_path: Path) -> None:
    need("nbdfuse", "fusermount3")
    if os.geteuid() != 0:
        ci_required("FUSE mounts need root")
    assert server.tcp_address is not None
    host, port = server.tcp_address
    with nbdfuse(["--tcp", host, str(port)], tmp_path / "fuse") as export:
        assert sha256_file(export) == sha256_file(layer["disk.img"])
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
