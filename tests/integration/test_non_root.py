"""The CLI as an ordinary user (uid 65534, through setpriv in a private mount namespace):
`status` lists root's mounts or says plainly why it cannot, and the commands that need root
say so under their own name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybrid_erofs.mounting.state import MountRecord, StatePaths
from tests.conftest import ROOT, ci_required

pytestmark = [pytest.mark.integration, pytest.mark.root]
NOBODY = 65534


def _private_ancestor(path: Path) -> Path | None:
    """The highest directory on the way to `path` that others may not enter (/root, say)."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def as_nobody(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m hybrid_erofs ARGS` as uid/gid 65534. When the interpreter lives below a
    private directory (pyenv under /root), a private mount namespace lays a world-readable
    tmpfs over that directory with the interpreter's tree bound back into it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("unshare") is None:
        ci_required("running as another user needs root, setpriv and unshare (util-linux)")
    prefix = Path(sys.base_prefix).resolve()
    private = _private_ancestor(prefix)
    for other in (ROOT, Path(sys.prefix).resolve()):
        if _private_ancestor(other) not in (None, private):
            ci_required(f"{other} is below a private directory other than {private}")
    script = ""
    if private is not None:
        keep = private / prefix.relative_to(private).parts[0]
        script = (f'stash=$(mktemp -d) && mount --bind "{keep}" "$stash" && '
                  f'mount -t tmpfs -o mode=0755 tmpfs "{private}" && mkdir -p "{keep}" && '
                  f'mount --bind "$stash" "{keep}" && ')
    command = [sys.executable, "-m", "hybrid_erofs", *args]
    script += (f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups "
               + " ".join(f"'{arg}'" for arg in command))
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env={**env, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
                          text=True, timeout=60, cwd="/")


@pytest.fixture
def runtime() -> Iterator[Path]:
    """A runtime directory others can reach (pytest's own tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="nonroot-"))
    base.chmod(0o755)
    yield base / "run"
    shutil.rmtree(base)


def _record(runtime: Path, mountpoint: str) -> None:
    """A state record as the daemon writes it; its daemon is this test process (alive)."""
    paths = StatePaths.for_mountpoint(mountpoint, root=runtime)
    paths.save(MountRecord(
        mountpoint=mountpoint, source="registry.example.com/app:1.2", meta="/idx/m.erofs",
        zinfo="/idx/layer.zinfo", via="auto", transport="fuse", daemon_pid=os.getpid(),
        daemon_start_time=None, log_file=str(paths.log), created=time.time()))
    paths.save_stats({"updated": time.time(), "bytes_fetched": 1 << 20, "bytes_served": 2 << 20,
                      "reads": 7, "errors": 0, "hit_rate": None})


def test_status_lists_roots_mounts_for_anyone(runtime: Path) -> None:
    _record(runtime, "/mnt/app")
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    proc = as_nobody(["status"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("/mnt/app: "), proc.stdout
    assert "registry.example.com/app:1.2" in proc.stdout


def test_status_without_mounts(runtime: Path) -> None:
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    env.pop("XDG_RUNTIME_DIR", None)
    proc = as_nobody(["status"], env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "no hybrid-erofs mounts\n", "")


def test_status_of_a_private_state_directory_says_whose_it_is(runtime: Path) -> None:
    _record(runtime, "/mnt/app")
    (runtime / "mounts").chmod(0o700)  # as versions before 0.1 made it
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    proc = as_nobody(["status"], env)
    assert proc.returncode == 1
    assert proc.stderr == (f"Error: {runtime}/mounts: readable by root only (mounts are root's): "
                           f"run `sudo hybrid-erofs status`\n")


@pytest.mark.parametrize(("args", "command"), [
    (["umount", "/mnt/app"], "umount"),
    (["mount", "--meta", "m.erofs", "--zinfo", "l.zinfo", "l.tar.gz", "/mnt/app"], "mount"),
    (["mount", "registry.example.com/app:1.2", "/mnt/app"], "mount"),
    (["mount-image", "registry.example.com/app:1.2", "/mnt/app"], "mount-image"),
    (["mount", "--reattach", "/mnt/app"], "mount --reattach"),
], ids=["umount", "mount", "mount-discovery", "mount-image", "reattach"])
def test_commands_that_need_root_name_themselves(runtime: Path, args: list[str],
                                                 command: str) -> None:
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    proc = as_nobody(args, env)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr == (f"Error: {command}: needs root (mounting and unmounting EROFS need "
                           f"CAP_SYS_ADMIN)\n")
