"""The README's first steps run word for word (index and list the shipped fixture, mount it as
root, umount), and a host without libfuse3 gets one line naming the Debian package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, ci_required
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for, one_error_line

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "hybrid_erofs"]


def first_steps() -> list[str]:
    """The ```sh blocks of README's "First steps", in order."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"(?ms)^## First steps\n(.*?)(?=^## )", text)
    assert match is not None
    return re.findall(r"(?ms)^```sh\n(.*?)^```", match.group(1))


def run_block(block: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One README block in bash from the repository root; /tmp/demo and /mnt/demo moved into
    this test's directory, `hybrid-erofs` being this checkout's CLI."""
    script = block.replace("/tmp/demo", str(tmp_path / "demo")).replace(
        "/mnt/demo", str(tmp_path / "mnt"))
    prelude = f'hybrid-erofs() {{ "{sys.executable}" -m hybrid_erofs "$@"; }}\n'
    return subprocess.run(["bash", "-euo", "pipefail", "-c", prelude + script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_readme_first_steps_work_as_written(tmp_path: Path) -> None:
    index_and_list, mount_and_umount = first_steps()
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(tmp_path / "run")}
    listed = run_block(index_and_list, tmp_path, env)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"(?m)^-rwxr-xr-x .* ucfr$", listed.stdout), listed.stdout
    if os.geteuid() != 0:
        ci_required("the README's mount step needs root")
    require_fuse_and_erofs()
    mounted = run_block(mount_and_umount, tmp_path, env)
    assert mounted.returncode == 0, mounted.stderr
    assert re.search(r"(?m)^-rwxr-xr-x .* ucfr$", mounted.stdout), mounted.stdout
    assert re.search(r"(?m)^unmounted .*/mnt$", mounted.stdout), mounted.stdout
    assert daemons_for(tmp_path / "run") == []


def test_mount_without_libfuse3_names_the_debian_package(tmp_path: Path) -> None:
    require_fuse_and_erofs()
    demo = tmp_path / "demo"
    demo.mkdir()
    layer = ROOT / "fixtures" / "gzip" / "small.tar.gz"
    subprocess.run([*CLI, "index", str(layer), "-o", str(demo / "layer.zinfo")], check=True,
                   capture_output=True)
    (tmp_path / "mnt").mkdir()
    runtime = tmp_path / "run"
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime),
           "FUSE_LIBRARY_PATH": str(tmp_path / "no-libfuse3.so.3")}
    proc = subprocess.run([*CLI, "mount", "--via", "fuse", "--meta", str(demo / "m.erofs"),
                           "--zinfo", str(demo / "layer.zinfo"), str(layer),
                           str(tmp_path / "mnt")], env=env, capture_output=True, text=True,
                          timeout=60)
    line = one_error_line(proc)
    assert line.startswith("Error: fuse: libfuse3 is not installed (Debian: apt-get install "
                           "fuse3): "), line
    assert daemons_for(runtime) == []
    assert not os.path.ismount(tmp_path / "mnt")
