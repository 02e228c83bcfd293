"""Issue 14 item 3: `index -o` over an existing index, killed (SIGKILL, injected by strace at the
Nth rename(2)) at every point where it makes a file visible. Afterwards every command either
reads the right bytes for the layer it is given or refuses in one line; the next run removes
the killed run's temporary files and leaves one consistent set."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ci_required

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "hybrid_erofs"]
RENAMES = 3  # sidecar, zinfo, meta


def _layer(path: Path, seed: str, size: int) -> tuple[Path, bytes]:
    data = bytearray()
    while len(data) < size:
        data += hashlib.sha256(f"{seed}{len(data)}".encode()).digest()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in (("etc/motd", f"{seed}\n".encode()), ("usr/bin/tool", bytes(data))):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 1700000000, 0o755
            tar.addfile(info, io.BytesIO(content))
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return path, bytes(data)


def _index(layer: Path, out: Path, *, kill_at: int | None = None) -> int:
    argv = [*CLI, "index", str(layer), "-o", str(out / "layer.zinfo"), "--span", "64KiB"]
    if kill_at is not None:
        argv = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename",
                "-e", f"inject=rename:signal=SIGKILL:when={kill_at}", *argv]
    return subprocess.run(argv, capture_output=True).returncode


def _cat(layer: Path, out: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, "cat", "--meta", str(out / "m.erofs"), "--zinfo",
                           str(out / "layer.zinfo"), str(layer), "/usr/bin/tool"],
                          capture_output=True)


@pytest.mark.parametrize("kill_at", range(1, RENAMES + 1))
def test_a_killed_index_never_leaves_files_that_pass_but_do_not_belong(
        tmp_path: Path, kill_at: int) -> None:
    if shutil.which("strace") is None:
        ci_required("strace is not installed (apt-get install strace)")
    old, old_tool = _layer(tmp_path / "old.tar.gz", "old", 300_000)
    new, new_tool = _layer(tmp_path / "new.tar.gz", "new", 310_000)
    out = tmp_path / "out"
    out.mkdir()
    assert _index(old, out) == 0
    assert _index(new, out, kill_at=kill_at) == -9  # killed at this rename
    temporaries = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert temporaries, "the killed run left its temporary files"
    for layer, tool in ((old, old_tool), (new, new_tool)):
        result = _cat(layer, out)
        if result.returncode == 0:
            assert result.stdout == tool, f"{layer.name}: wrong bytes with exit 0"
        else:
            message = result.stderr.decode()
            assert message.startswith("Error: ") and message.count("\n") == 1, message
    # The next run removes the dead run's temporary files and leaves one consistent set.
    assert _index(new, out) == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    result = _cat(new, out)
    assert result.returncode == 0 and result.stdout == new_tool
