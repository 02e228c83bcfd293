"""mount(8), umount(8) and fstab with `-t hybrid-erofs`, as root, through the helpers that
`hybrid-erofs install-mount-helper` puts in /sbin: layer and image mounts with the CLI's own
options, nosuid/nodev, `umount` stopping the daemon at once (utab `helper=`) or within seconds
without utab (`mount -n`), credentials refused in `-o`, a stale utab entry unmounted anyway."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybrid_erofs.mounting.kernel import mounted_at
from hybrid_erofs.mounting.utab import has_helper_entry
from tests.conftest import ROOT, ci_required
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for

pytestmark = [pytest.mark.integration, pytest.mark.root]
CLI = [sys.executable, "-m", "hybrid_erofs"]
SMALL = ROOT / "fixtures" / "gzip" / "small.tar.gz"


@pytest.fixture(scope="module")
def helpers() -> None:
    """The helpers installed where mount(8) finds them (the documented command, as root;
    every run writes the same files, so parallel runs do not disturb each other)."""
    require_fuse_and_erofs()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        ci_required("mount(8) and umount(8) (util-linux) are needed")
    proc = subprocess.run([*CLI, "install-mount-helper"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["installed /sbin/mount.hybrid-erofs",
                                        "installed /sbin/umount.hybrid-erofs"]


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped fixture indexed: DIR/m.erofs, DIR/layer.zinfo (+ sidecar)."""
    work = tmp_path_factory.mktemp("helper-layer")
    subprocess.run([*CLI, "index", str(SMALL), "-o", str(work / "layer.zinfo")], check=True,
                   capture_output=True)
    return work


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(tmp_path / "run")}


@pytest.fixture
def mnt(tmp_path: Path, env: dict[str, str]) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mounted_at(path) is not None:  # a failed test: clean up, then let it fail
        subprocess.run([*CLI, "umount", "--lazy", str(path)], env=env, capture_output=True)
        subprocess.run(["umount", "-i", "-l", str(path)], capture_output=True)
    assert daemons_for(tmp_path / "run") == []


def expected_files() -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(SMALL.read_bytes()))) as archive:
        return {member.name.removeprefix("./"): hashlib.sha256(
            archive.extractfile(member).read()).hexdigest()  # type: ignore[union-attr]
            for member in archive.getmembers() if member.isreg()}


def file_digests(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*") if path.is_file() and not path.is_symlink()}


def run(argv: list[str], env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                          **kwargs)  # type: ignore[call-overload]


def test_mount_and_umount_with_mount8(helpers: None, layer: Path, mnt: Path, tmp_path: Path,
                                      env: dict[str, str]) -> None:
    # Relative paths, as a user types them: resolved in the mount's working directory.
    proc = run(["mount", "-t", "hybrid-erofs", "-o",
                "meta=m.erofs,zinfo=layer.zinfo,nosuid,nodev,x-systemd.automount", str(SMALL),
                str(mnt)], env, cwd=layer)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    entry = mounted_at(mnt)
    assert entry is not None and entry.fstype == "erofs"
    options = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", str(mnt)], capture_output=True,
                             text=True).stdout.split(",")
    assert {"ro", "nosuid", "nodev"} <= {option.strip() for option in options}
    assert has_helper_entry(mnt)
    assert file_digests(mnt) == expected_files()
    status = json.loads(run([*CLI, "status", "--json"], env).stdout)
    assert [s["mountpoint"] for s in status] == [str(mnt)]

    proc = run(["umount", str(mnt)], env)
    assert (proc.returncode, proc.stderr) == (0, "")
    # umount(8) ran umount.hybrid-erofs: everything is gone when it returns.
    assert mounted_at(mnt) is None and not has_helper_entry(mnt)
    assert daemons_for(tmp_path / "run") == []
    assert json.loads(run([*CLI, "status", "--json"], env).stdout) == []


def test_fstab_line(helpers: None, layer: Path, mnt: Path, tmp_path: Path,
                    env: dict[str, str]) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test fstab\n{SMALL} {mnt} hybrid-erofs "
                     f"meta={layer / 'm.erofs'},zinfo={layer / 'layer.zinfo'},via=loop,nofail,"
                     f"_netdev 0 0\n")
    proc = run(["mount", "-T", str(fstab), str(mnt)], env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert file_digests(mnt) == expected_files()
    status = json.loads(run([*CLI, "status", "--json"], env).stdout)
    assert [s["via"] for s in status] == ["loop"]
    proc = run(["umount", str(mnt)], env)
    assert proc.returncode == 0, proc.stderr
    assert mounted_at(mnt) is None and daemons_for(tmp_path / "run") == []


def test_without_utab_the_daemon_notices_the_umount(helpers: None, layer: Path, mnt: Path,
                                                    tmp_path: Path, env: dict[str, str]) -> None:
    proc = run(["mount", "-n", "-t", "hybrid-erofs", "-o",
                f"meta={layer / 'm.erofs'},zinfo={layer / 'layer.zinfo'}", str(SMALL), str(mnt)],
               env)
    assert proc.returncode == 0, proc.stderr
    assert not has_helper_entry(mnt)
    assert run(["umount", str(mnt)], env).returncode == 0  # a plain umount2(2)
    deadline = time.monotonic() + 15
    while daemons_for(tmp_path / "run") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemons_for(tmp_path / "run") == []
    assert json.loads(run([*CLI, "status", "--json"], env).stdout) == []


def test_an_image_with_mount8(helpers: None, mnt: Path, tmp_path: Path,
                              env: dict[str, str]) -> None:
    from tests.oci_images import build_test_image

    image = build_test_image(tmp_path / "layout")
    index = tmp_path / "idx"
    proc = run([*CLI, "index", image.ref("amd64"), "--all-layers", "-o", str(index)], env)
    assert proc.returncode == 0, proc.stderr
    proc = run(["mount", "-t", "hybrid-erofs", "-o",
                f"image,index-dir={index},cache-dir={tmp_path / 'cache'}", image.ref("amd64"),
                str(mnt)], env)
    assert proc.returncode == 0, proc.stderr
    entry = mounted_at(mnt)
    assert entry is not None and entry.fstype == "overlay" and has_helper_entry(mnt)
    for path, data in image.platforms["amd64"].contents.items():
        assert (mnt / path).read_bytes() == data
    assert run(["umount", str(mnt)], env).returncode == 0
    assert mounted_at(mnt) is None and daemons_for(tmp_path / "run") == []


@pytest.mark.parametrize(("options", "message"), [
    ("meta=m.erofs,zinfo=layer.zinfo,password-stdin",
     "mount.hybrid-erofs: -o password-stdin: credentials are never taken from mount options "
     "(fstab is world-readable and options land in argv); keep them in an auth file "),
    ("meta=m.erofs,zinfo=layer.zinfo,username=ci",
     "mount.hybrid-erofs: -o username: credentials are never taken from mount options "),
    ("meta=m.erofs,zinfo=layer.zinfo,speed=11",
     "mount.hybrid-erofs: -o speed: not an option of `hybrid-erofs mount` (see docs/mount.md"),
    ("meta=m.erofs,zinfo", "mount.hybrid-erofs: -o zinfo: needs a value (zinfo=...)"),
    ("meta=m.erofs,zinfo=layer.zinfo,foreground",
     "mount.hybrid-erofs: -o foreground: not an option of `hybrid-erofs mount`"),
    ("zinfo=layer.zinfo", "mount.hybrid-erofs: "),  # the mount command's own refusal
], ids=["password", "username", "unknown", "no-value", "foreground", "no-meta"])
def test_refusals_are_one_line_and_mount_nothing(helpers: None, layer: Path, mnt: Path,
                                                 env: dict[str, str], options: str,
                                                 message: str) -> None:
    proc = run(["mount", "-t", "hybrid-erofs", "-o", options, str(SMALL), str(mnt)], env,
               cwd=layer)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and mounted_at(mnt) is None


def test_a_stale_utab_entry_does_not_stop_umount(helpers: None, mnt: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "hybrid-erofs-test", str(mnt)], check=True)
    subprocess.run(["mount", "--fake", "-i", "--no-canonicalize", "-t", "hybrid-erofs", "-o",
                    "helper=hybrid-erofs", "hybrid-erofs-test", str(mnt)], check=True)
    assert has_helper_entry(mnt)
    proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # the helper knew no such mount: umount -i
    assert mounted_at(mnt) is None and not has_helper_entry(mnt)
