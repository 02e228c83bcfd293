"""`hybrid-erofs mount` / `umount` / `status` as real processes, as root: the kernel's EROFS on
a FUSE file (file-backed mount(2) or a loop device), from a local layer and from a real registry
with token auth; daemon death, busy mounts, failures; nothing may be left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.indexing.layer import index_layer
from tests.conftest import ci_required, layer_tar
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import (
    concat,
    daemons_for,
    kernel_mount,
    losetup_entries,
    one_error_line,
    walk_tree,
)
from tests.registry_rig import USER, Rig, free_port, missing_prerequisites

pytestmark = [pytest.mark.integration, pytest.mark.root]

Tree = dict[str, dict[str, Any]]
CLI = [sys.executable, "-m", "hybrid_erofs"]


@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_fuse_and_erofs()


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def env(runtime: Path) -> dict[str, str]:
    return {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        return [line for line in mounts if str(path) in line]




def _state_files(runtime: Path) -> list[str]:
    return sorted(str(p) for p in runtime.rglob("*") if p.is_file()) if runtime.exists() else []


@pytest.fixture(autouse=True)
def leaves_nothing_behind(prerequisites: None, tmp_path: Path, runtime: Path) -> Iterator[None]:
    loops = losetup_entries()
    try:
        yield
    finally:
        leftovers = (_mounts_under(tmp_path), daemons_for(runtime), _state_files(runtime),
                     [line for line in losetup_entries() if line not in loops])
        if any(leftovers):  # clean up for the next test, then fail this one
            subprocess.run([*CLI, "status", "--prune"], env={
                **os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}, capture_output=True)
            for pid in daemons_for(runtime):
                os.kill(pid, signal.SIGKILL)
            for line in reversed(_mounts_under(tmp_path)):
                subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)
        assert leftovers == ([], [], [], [])


@pytest.fixture(scope="module")
def layer(layers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """rootfs.tar.gz indexed by the library (zinfo + sidecar + meta), and meta || tar."""
    work = tmp_path_factory.mktemp("mount-layer")
    gz = layers["rootfs"]
    zinfo, meta = work / "rootfs.zinfo", work / "rootfs.meta.erofs"
    index_layer(str(gz), zinfo=zinfo, meta=meta, span=256 << 10)
    tar = layer_tar(gz)
    return {"gz": gz, "tar": tar, "zinfo": zinfo, "meta": meta,
            "device": concat(meta, tar, work / "device.img")}


@pytest.fixture(scope="module")
def other_layer(layers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("mount-other")
    zinfo, meta = work / "random.zinfo", work / "random.meta.erofs"
    index_layer(str(layers["random"]), zinfo=zinfo, meta=meta)
    return {"gz": layers["random"], "zinfo": zinfo, "meta": meta}


@pytest.fixture(scope="module")
def reference_tree(prerequisites: None, layer: dict[str, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Tree:
    with kernel_mount(layer["device"], tmp_path_factory.mktemp("ref-mnt"), via="file") as mnt:
        return walk_tree(mnt)


def _run(args: list[str], env: dict[str, str], *, stdin: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def _mount(layer: dict[str, Path], mnt: Path, env: dict[str, str], *extra: str,
           source: str | None = None) -> dict[str, Any]:
    mnt.mkdir(exist_ok=True)
    proc = _run(["mount", "--meta", str(layer["meta"]), "--zinfo", str(layer["zinfo"]), *extra,
                 source or str(layer["gz"]), str(mnt)], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("mounted "), proc.stdout
    return _status(env)[0]


def _status(env: dict[str, str], *extra: str) -> list[dict[str, Any]]:
    proc = _run(["status", "--json", *extra], env)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def _umount(mnt: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    proc = _run(["umount", *extra, str(mnt)], env)
    return proc




@pytest.mark.parametrize("via", ["auto", "fuse", "loop"])
def test_mount_shows_the_layer_and_umount_leaves_nothing(
        layer: dict[str, Path], reference_tree: Tree, tmp_path: Path, env: dict[str, str],
        runtime: Path, via: str) -> None:
    mnt = tmp_path / "mnt"
    started = time.monotonic()
    entry = _mount(layer, mnt, env, "--via", via)
    took = time.monotonic() - started
    try:
        assert entry["mountpoint"] == str(mnt) and entry["state"] == "mounted"
        assert entry["via"] == ("loop" if via == "loop" else "fuse")
        if via == "loop":
            assert any(str(runtime) in line for line in losetup_entries())
        assert walk_tree(mnt) == reference_tree
        time.sleep(2.5)  # one stats period
        stats = _status(env)[0]["stats"]
        assert isinstance(stats, dict)
        assert stats["errors"] == 0 and stats["reads"] > 0
        # A local layer counts what GzipSource read from the file (spans overlap a little).
        assert 0 < stats["bytes_fetched"] <= 2 * layer["gz"].stat().st_size
    finally:
        proc = _umount(mnt, env)
    assert proc.returncode == 0, proc.stderr
    assert _status(env) == []
    assert took < 10


def test_eight_reader_processes(layer: dict[str, Path], reference_tree: Tree, tmp_path: Path,
                                env: dict[str, str]) -> None:
    files = sorted((rel for rel, e in reference_tree.items() if e["type"] == "file"),
                   key=lambda rel: -int(reference_tree[rel]["size"]))[:8]
    assert len(files) == 8
    mnt = tmp_path / "mnt"
    _mount(layer, mnt, env)
    try:
        script = ("import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read())"
                  ".hexdigest())")
        readers = [subprocess.Popen([sys.executable, "-c", script, str(mnt / rel)],
                                    stdout=subprocess.PIPE, text=True) for rel in files]
        for rel, reader in zip(files, readers, strict=True):
            out, _ = reader.communicate(timeout=60)
            assert reader.returncode == 0
            assert out.strip() == reference_tree[rel]["sha256"], rel
    finally:
        assert _umount(mnt, env).returncode == 0


def _read_errno(path: Path, timeout_s: float) -> tuple[int | None, float]:
    """Read `path` in a child process; its errno (None = success) and the time it took."""
    script = ("import sys\ntry:\n    open(sys.argv[1],'rb').read()\nexcept OSError as e:\n"
              "    sys.exit(e.errno)\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, str(path)], timeout=timeout_s)
    return (proc.returncode or None), time.monotonic() - started


def _kill_daemon(env: dict[str, str]) -> int:
    pid = int(_status(env)[0]["daemon_pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
        if ") Z " in stat:
            break
        time.sleep(0.05)
    # Pages already read stay in the page cache; drop them so the reads reach the device.
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return pid


@pytest.mark.parametrize("cleanup", ["umount", "prune", "mount-again"])
def test_daemon_death_gives_eio_and_is_cleaned_up(
        layer: dict[str, Path], reference_tree: Tree, tmp_path: Path, env: dict[str, str],
        cleanup: str) -> None:
    big = max((rel for rel, e in reference_tree.items() if e["type"] == "file"),
              key=lambda rel: int(reference_tree[rel]["size"]))
    mnt = tmp_path / "mnt"
    _mount(layer, mnt, env)
    _kill_daemon(env)
    err, took = _read_errno(mnt / big, timeout_s=20)
    assert err in (errno.EIO, errno.ENOTCONN), err
    assert took < 5
    [entry] = _status(env)
    assert entry["state"] == "stale" and entry["daemon_alive"] is False
    if cleanup == "umount":
        proc = _umount(mnt, env)
        assert proc.returncode == 0, proc.stderr
        assert "daemon had died" in proc.stdout
    elif cleanup == "prune":
        assert _status(env, "--prune")[0]["state"] == "stale"
    else:  # what systemd's Restart= does: a new mount cleans up after the dead daemon
        entry = _mount(layer, mnt, env)
        assert entry["state"] == "mounted"
        assert _read_errno(mnt / big, timeout_s=20)[0] is None
        assert _umount(mnt, env).returncode == 0
    assert _status(env) == []


def test_reattach_after_daemon_death(layer: dict[str, Path], reference_tree: Tree,
                                     tmp_path: Path, env: dict[str, str]) -> None:
    mnt = tmp_path / "mnt"
    _mount(layer, mnt, env)
    try:
        old = _kill_daemon(env)
        proc = _run(["mount", "--reattach", str(mnt)], env)
        assert proc.returncode == 0, proc.stderr
        [entry] = _status(env)
        assert entry["state"] == "mounted" and entry["daemon_pid"] != old
        assert walk_tree(mnt) == reference_tree
        healthy = _run(["mount", "--reattach", str(mnt)], env)
        assert "nothing to reattach" in one_error_line(healthy)
    finally:
        assert _umount(mnt, env).returncode == 0


def test_busy_umount_names_the_process_and_lazy_detaches(
        layer: dict[str, Path], tmp_path: Path, env: dict[str, str]) -> None:
    mnt = tmp_path / "mnt"
    _mount(layer, mnt, env)
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
    try:
        line = one_error_line(_umount(mnt, env))
        assert f"{holder.pid} (sleep)" in line and "--lazy" in line
        assert _mounts_under(mnt) and _status(env)[0]["state"] == "mounted"  # nothing torn down
        proc = _umount(mnt, env, "--lazy")
        assert proc.returncode == 0, proc.stderr
        assert not any(" erofs " in line for line in _mounts_under(mnt))
        pid = int(_status(env)[0]["daemon_pid"])
        assert Path(f"/proc/{pid}").exists()  # still serving the lazily detached mount
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while _status(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _status(env) == []  # the daemon left once the last user was gone


def test_foreground_stops_cleanly_on_sigterm(layer: dict[str, Path], reference_tree: Tree,
                                             tmp_path: Path, env: dict[str, str]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*CLI, "mount", "--foreground", "--meta", str(layer["meta"]),
                             "--zinfo", str(layer["zinfo"]), str(layer["gz"]), str(mnt)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _status(env) or _status(env)[0]["state"] != "mounted":
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert sorted(os.listdir(mnt)) == sorted(
            rel for rel in reference_tree if rel and "/" not in rel)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _failure_args(case: str, layer: dict[str, Path], other: dict[str, Path],
                  tmp_path: Path) -> tuple[list[str], Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    meta, zinfo, gz = str(layer["meta"]), str(layer["zinfo"]), str(layer["gz"])
    if case == "not-a-dir":
        mnt = tmp_path / "file"
        mnt.write_text("x")
    elif case == "missing-mountpoint":
        mnt = tmp_path / "nope"
    cases = {
        "bad-meta": ["--meta", zinfo, "--zinfo", zinfo, gz],
        "meta-of-another-layer": ["--meta", meta, "--zinfo", str(other["zinfo"]),
                                  str(other["gz"])],
        "zinfo-of-another-layer": ["--meta", meta, "--zinfo", str(other["zinfo"]), gz],
        "unreachable-registry": ["--meta", meta, "--zinfo", zinfo,
                                 f"127.0.0.1:{free_port()}/lab/img:multi"],
        "missing-mountpoint": ["--meta", meta, "--zinfo", zinfo, gz],
        "not-a-dir": ["--meta", meta, "--zinfo", zinfo, gz],
        "nbd-without-module": ["--via", "nbd", "--meta", meta, "--zinfo", zinfo, gz],
    }
    return ["mount", *cases[case], str(mnt)], mnt


@pytest.mark.parametrize("case", ["bad-meta", "meta-of-another-layer", "zinfo-of-another-layer",
                                  "unreachable-registry", "missing-mountpoint", "not-a-dir",
                                  "nbd-without-module"])
def test_failures_are_one_line_and_leave_nothing(
        layer: dict[str, Path], other_layer: dict[str, Path], tmp_path: Path,
        env: dict[str, str], case: str) -> None:
    if case == "nbd-without-module" and list(Path("/dev").glob("nbd[0-9]*")):
        pytest.skip("this host has kernel NBD")
    args, mnt = _failure_args(case, layer, other_layer, tmp_path)
    line = one_error_line(_run(args, env, timeout=60))
    expected = {
        "bad-meta": "", "meta-of-another-layer": "this meta was built for another layer", "zinfo-of-another-layer": "not the layer",
        "unreachable-registry": "127.0.0.1", "missing-mountpoint": "does not exist",
        "not-a-dir": "not a directory", "nbd-without-module": "no /dev/nbd* (modprobe nbd)",
    }[case]
    assert expected in line
    assert _status(env) == []


def test_already_mounted(layer: dict[str, Path], tmp_path: Path, env: dict[str, str]) -> None:
    mnt = tmp_path / "mnt"
    _mount(layer, mnt, env)
    try:
        again = _run(["mount", "--meta", str(layer["meta"]), "--zinfo", str(layer["zinfo"]),
                      str(layer["gz"]), str(mnt)], env)
        assert "already" in one_error_line(again)
        assert [e["state"] for e in _status(env)] == ["mounted"]
    finally:
        assert _umount(mnt, env).returncode == 0
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(other)], check=True)
    try:
        busy = _run(["mount", "--meta", str(layer["meta"]), "--zinfo", str(layer["zinfo"]),
                     str(layer["gz"]), str(other)], env)
        assert "already a mount point (tmpfs" in one_error_line(busy)
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_umount_of_an_unknown_mountpoint(tmp_path: Path, env: dict[str, str]) -> None:
    assert "not mounted by hybrid-erofs" in one_error_line(_umount(tmp_path, env))


# -- a real registry with token auth ----------------------------------------------------------

@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    missing = missing_prerequisites()
    if missing:
        ci_required(f"real-registry tests need: {', '.join(missing)} "
                    "(apt-get install docker-registry skopeo apache2-utils)")
    rig = Rig(tmp_path_factory.mktemp("mount-rig"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


def test_mount_from_registry_with_token_auth(rig: Rig, tmp_path: Path,
                                             env: dict[str, str], runtime: Path) -> None:
    image = rig.images["amd64"]
    blob = tmp_path / "blob.tar.gz"
    blob.write_bytes(image.layer)  # the local copy of the blob, indexed ahead of time
    indexed = {"meta": tmp_path / "m.erofs", "zinfo": tmp_path / "layer.zinfo"}
    index_layer(str(blob), zinfo=indexed["zinfo"], meta=indexed["meta"], span=256 << 10)
    with tarfile.open(blob) as tar:
        expected = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
                    for m in tar.getmembers() if m.isfile()}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ref = f"{rig.hosts['token']}/lab/img:multi"
    proc = _run(["mount", "--meta", str(indexed["meta"]), "--zinfo", str(indexed["zinfo"]),
                 "--platform", "linux/amd64", "--username", USER[0], "--password-stdin",
                 "--cache-dir", str(tmp_path / "cache"), ref, str(mnt)], env,
                stdin=USER[1] + "\n")
    assert proc.returncode == 0, proc.stderr
    try:
        files = {str(p.relative_to(mnt)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in mnt.rglob("*") if p.is_file()}
        assert files == expected
        [entry] = _status(env)
        assert entry["source"] == ref and entry["state"] == "mounted"
        # No secret in the state record, the stats, the log or the daemon's command line.
        pid = int(entry["daemon_pid"])
        texts = [p.read_bytes() for p in runtime.rglob("*") if p.is_file()]
        texts.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        texts.append(Path(f"/proc/{pid}/environ").read_bytes())
        assert texts and not any(USER[1].encode() in text for text in texts)
        record = json.loads(next(runtime.glob("mounts/*[0-9a-f].json")).read_text())
        assert record["registry"]["password_from"] == "stdin"
        assert record["registry"]["username"] == USER[0]
        time.sleep(2.5)
        stats = _status(env)[0]["stats"]
        assert 0 < stats["bytes_fetched"] <= len(image.layer)
        assert stats["cache_misses"] > 0
    finally:
        assert _umount(mnt, env).returncode == 0
    # A reattach of a --password-stdin mount asks for the password again.


def test_registry_wrong_password_is_one_line(rig: Rig, tmp_path: Path,
                                             env: dict[str, str]) -> None:
    blob = tmp_path / "blob.tar.gz"
    blob.write_bytes(rig.images["amd64"].layer)
    index_layer(str(blob), zinfo=tmp_path / "layer.zinfo", meta=tmp_path / "m.erofs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _run(["mount", "--meta", str(tmp_path / "m.erofs"), "--zinfo",
                 str(tmp_path / "layer.zinfo"), "--platform", "linux/amd64", "--username",
                 USER[0], "--password-stdin", "--cache-dir", str(tmp_path / "cache"),
                 f"{rig.hosts['token']}/lab/img:multi", str(mnt)], env, stdin="wrong\n")
    line = one_error_line(proc)
    assert "wrong" not in line.split(":", 1)[1]
    assert _status(env) == []
