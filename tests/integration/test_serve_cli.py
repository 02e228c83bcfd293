"""`hybrid-erofs serve` as a real process: FUSE and NBD (unix socket, loopback TCP) exports read by
the kernel and by libnbd's tools, clean exit on SIGTERM, one-line errors on bad input.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybrid_erofs.export.fuse import ExportError, load_mfusepy
from tests.conftest import ci_required
from tests.integration.test_fuse_export import Tree, build_layer_files
from tests.mounting import kernel_mount, losetup_entries, walk_tree

pytestmark = [pytest.mark.integration, pytest.mark.root]

START_TIMEOUT_S = 30.0


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        return [line for line in mounts if str(path) in line]


class Server:
    """A `hybrid-erofs serve` subprocess; stdout and stderr go to files for later inspection."""

    def __init__(self, args: list[str], work: Path, env: dict[str, str] | None = None) -> None:
        self.out, self.err = work / "serve.out", work / "serve.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "hybrid_erofs", "-v", "serve",
                                          *args], stdout=out, stderr=err,
                                         env={**os.environ, **(env or {})})

    def wait_for(self, path: Path, *, kind: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}: {self.err.read_text()}")
            if kind == "socket" and path.is_socket():
                return
            if kind == "file" and path.is_file():
                return
            time.sleep(0.05)
        pytest.fail(f"{path} did not appear within {START_TIMEOUT_S}s: {self.err.read_text()}")

    def wait_for_output(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(pattern, self.out.read_text())
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}: {self.err.read_text()}")
            time.sleep(0.05)
        pytest.fail(f"no {pattern!r} in the output: {self.out.read_text()}{self.err.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def prerequisites() -> None:
    if os.geteuid() != 0:
        ci_required("FUSE + kernel EROFS mounts need root")


@pytest.fixture(scope="module")
def fuse_ok(prerequisites: None) -> None:
    if not os.path.exists("/dev/fuse"):
        ci_required("/dev/fuse is missing (FUSE not available)")
    try:
        load_mfusepy()
    except ExportError as exc:
        ci_required(str(exc))


@pytest.fixture(scope="module")
def nbd_tools(prerequisites: None) -> None:
    for tool in ("nbdinfo", "nbdcopy"):
        if shutil.which(tool) is None:
            ci_required(f"{tool} is not installed (apt-get install libnbd-bin)")


@pytest.fixture(autouse=True)
def leaves_nothing_behind(prerequisites: None, tmp_path: Path) -> Iterator[None]:
    loops = losetup_entries() if shutil.which("losetup") else []
    yield
    assert _mounts_under(tmp_path) == []
    if shutil.which("losetup"):
        assert losetup_entries() == loops


@pytest.fixture(scope="module")
def layer(layers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_layer_files(layers["rootfs"], tmp_path_factory.mktemp("serve-layer"))


@pytest.fixture(scope="module")
def reference_tree(layer: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Tree:
    with kernel_mount(layer["device"], tmp_path_factory.mktemp("ref-mnt"), via="file") as mnt:
        return walk_tree(mnt)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _args(layer: dict[str, Path]) -> list[str]:
    return ["--meta", str(layer["meta"]), "--zinfo", str(layer["zinfo"]), str(layer["gz"])]


def test_fuse_export_mounts_and_stops_on_sigterm(fuse_ok: None, layer: dict[str, Path],
                                                 reference_tree: Tree,
                                                 tmp_path: Path) -> None:
    fuse_dir = tmp_path / "fuse"
    server = Server([*_args(layer), "--fuse", str(fuse_dir)], tmp_path)
    try:
        server.wait_for(fuse_dir / "disk.img", kind="file")
        assert _sha256(fuse_dir / "disk.img") == _sha256(layer["device"])
        assert "mount -t erofs" in server.wait_for_output(r"serving .*\n.*mount -t erofs.*").group(0)
        with kernel_mount(fuse_dir / "disk.img", tmp_path / "mnt", via="file") as mnt:
            assert walk_tree(mnt) == reference_tree
            # SIGTERM while EROFS still sits on the file: refuse, keep serving, say why.
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert server.proc.poll() is None
            assert "still in use" in server.err.read_text()
            assert walk_tree(mnt, contents=True) == reference_tree
        assert server.stop() == 0
    finally:
        server.kill()
    assert _mounts_under(fuse_dir) == []
    assert not fuse_dir.exists()  # created by serve, removed by serve


def test_fuse_export_through_a_loop_device(fuse_ok: None, layer: dict[str, Path],
                                           reference_tree: Tree,
                                           tmp_path: Path) -> None:
    fuse_dir = tmp_path / "fuse"
    fuse_dir.mkdir()
    server = Server([*_args(layer), "--fuse", str(fuse_dir), "--file-name", "layer.img"],
                    tmp_path)
    try:
        server.wait_for(fuse_dir / "layer.img", kind="file")
        with kernel_mount(fuse_dir / "layer.img", tmp_path / "mnt", via="loop") as mnt:
            assert walk_tree(mnt) == reference_tree
        # The autoclear loop device goes away asynchronously; serve waits for it.
        assert server.stop() == 0
    finally:
        server.kill()
    assert fuse_dir.is_dir()  # existed before: left in place


def test_unix_socket_export(nbd_tools: None, layer: dict[str, Path], tmp_path: Path) -> None:
    sock = tmp_path / "layer.sock"
    server = Server([*_args(layer), "--socket", str(sock)], tmp_path)
    try:
        server.wait_for(sock, kind="socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        uri = f"nbd+unix:///?socket={sock}"
        size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                              check=True).stdout
        assert int(size) == layer["device"].stat().st_size
        copy = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", uri, str(copy)], check=True, timeout=120)
        assert _sha256(copy) == _sha256(layer["device"])
        assert server.stop() == 0
    finally:
        server.kill()
    assert not sock.exists()


def test_default_socket_is_under_xdg_runtime_dir(nbd_tools: None, layer: dict[str, Path],
                                                 tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    sock = runtime / "hybrid-erofs" / "rootfs.sock"
    server = Server(_args(layer), tmp_path, env={"XDG_RUNTIME_DIR": str(runtime)})
    try:
        server.wait_for(sock, kind="socket")
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///rootfs?socket={sock}"],
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == layer["device"].stat().st_size
        assert server.stop() == 0
    finally:
        server.kill()
    assert not sock.exists()


def test_loopback_tcp_export(nbd_tools: None, layer: dict[str, Path], tmp_path: Path) -> None:
    server = Server([*_args(layer), "--listen", "127.0.0.1:0"], tmp_path)
    try:
        port = int(server.wait_for_output(r"on 127\.0\.0\.1:(\d+)").group(1))
        copy = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/rootfs", str(copy)], check=True,
                       timeout=120)
        assert _sha256(copy) == _sha256(layer["device"])
        assert server.stop() == 0
    finally:
        server.kill()


def _run_serve(args: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybrid_erofs", "serve", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def test_non_loopback_listen_is_refused(layer: dict[str, Path]) -> None:
    proc = _run_serve([*_args(layer), "--listen", "0.0.0.0:10809"])
    assert proc.returncode == 2
    assert "--listen-any" in proc.stderr


@pytest.fixture(scope="module")
def other_layer(layer: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                ) -> dict[str, Path]:
    """A much smaller gzip layer (one file) with its own zinfo and meta."""
    work = tmp_path_factory.mktemp("other-layer")
    (work / "hello.txt").write_text("hello\n")
    with tarfile.open(work / "small.tar", "w") as archive:
        archive.add(work / "hello.txt", arcname="hello.txt")
    subprocess.run(["gzip", "-k", str(work / "small.tar")], check=True)
    return build_layer_files(work / "small.tar.gz", work)


@pytest.mark.parametrize("case", ["missing-meta", "missing-layer", "zinfo-of-another-layer",
                                  "meta-of-another-layer", "gzip-without-zinfo", "reference",
                                  "meta-not-erofs"])
def test_bad_input_is_one_line_error(fuse_ok: None, layer: dict[str, Path],
                                     other_layer: dict[str, Path], tmp_path: Path,
                                     case: str) -> None:
    meta, zinfo, gz = str(layer["meta"]), str(layer["zinfo"]), str(layer["gz"])
    args = {
        "missing-meta": ["--meta", str(tmp_path / "nope.erofs"), "--zinfo", zinfo, gz],
        "missing-layer": ["--meta", meta, "--zinfo", zinfo, str(tmp_path / "nope.tar.gz")],
        "zinfo-of-another-layer": ["--meta", str(other_layer["meta"]), "--zinfo", zinfo,
                                   str(other_layer["gz"])],
        "meta-of-another-layer": ["--meta", meta, "--zinfo", str(other_layer["zinfo"]),
                                  str(other_layer["gz"])],
        "gzip-without-zinfo": ["--meta", meta, gz],
        "reference": ["--meta", meta, "--zinfo", zinfo, "registry.invalid/app/layer:1.0"],
        "meta-not-erofs": ["--meta", zinfo, "--zinfo", zinfo, gz],
    }[case]
    fuse_dir = tmp_path / "fuse"
    proc = _run_serve([*args, "--fuse", str(fuse_dir)])
    assert proc.returncode == 1, proc.stderr
    # One error line (log warnings from the stack, e.g. about missing sidecars, may precede it).
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING ")]
    assert len(errors) == 1 and errors[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "reference":
        assert "registry.invalid" in errors[0]
    assert _mounts_under(fuse_dir) == []
    assert not fuse_dir.exists()
