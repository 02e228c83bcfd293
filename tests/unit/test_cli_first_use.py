"""The rough edges a new user hits first: one unit convention (binary) with plurals, a progress
line with a sane ETA that is cleared however the command ends (SIGTERM too), `verify` progress
with a total, `read` from offset 0 and of 0 bytes, and `index -` on a terminal."""

from __future__ import annotations

import gzip
import os
import pty
import random
import select
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.cli.options import Progress
from hybrid_erofs.units import counted, format_duration, format_rate, format_size
from tests.conftest import ROOT

SMALL = ROOT / "fixtures" / "gzip" / "small.tar.gz"
MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_units_are_binary_and_nouns_counted() -> None:
    assert format_size(512) == "512 B"
    assert format_size(92_900_000) == "88.6 MiB"  # the layer `--all-layers` called "92.9 MB"
    assert format_size(3 << 40) == "3.0 TiB"
    assert format_rate(35.2 * MiB) == "35.2 MiB/s"
    assert [format_duration(s) for s in (0.2, 45, 125, 3720)] == ["0s", "45s", "2m05s", "1h02m"]
    assert [counted(n, "checkpoint") for n in (0, 1, 2)] == [
        "0 checkpoints", "1 checkpoint", "2 checkpoints"]
    assert counted(1, "entry", "entries") == "1 entry"


def test_progress_eta_waits_for_a_rate_and_follows_the_recent_one() -> None:
    clock = Clock()
    bar = Progress("indexing", 100 * MiB, enabled=True, clock=clock)
    # Slow start (startup, first read): no rate and no ETA yet, not "ETA 2054s".
    assert bar.line(1 * MiB) == "indexing: 1.0 MiB of 100.0 MiB (1%)"
    clock.now += 0.5
    assert bar.line(6 * MiB) == "indexing: 6.0 MiB of 100.0 MiB (6%), 10.0 MiB/s"
    clock.now += 0.5
    assert bar.line(11 * MiB) == "indexing: 11.0 MiB of 100.0 MiB (11%), 10.0 MiB/s, ETA 9s"
    clock.now += 0.05
    assert bar.line(12 * MiB) is None  # at most ten lines a second
    # The rate changes: the ETA follows the last few seconds, not the average since start.
    for _ in range(10):
        clock.now += 1.0
        line = bar.line(int(11 * MiB + (clock.now - 101.0) * 2 * MiB))
    assert line == "indexing: 31.1 MiB of 100.0 MiB (31%), 2.0 MiB/s, ETA 34s"


def test_progress_without_total() -> None:
    clock = Clock()
    bar = Progress("verifying", enabled=True, clock=clock)
    bar.line(0)
    clock.now += 2
    assert bar.line(4 * MiB) == "verifying: 4.0 MiB, 2.0 MiB/s"


def test_verify_progress_has_a_total_and_percent(tmp_path: Path) -> None:
    zinfo = tmp_path / "layer.zinfo"
    assert CliRunner().invoke(main, ["index", str(SMALL), "-o", str(zinfo)]).exit_code == 0
    result = CliRunner().invoke(main, ["verify", "--progress", "--meta", str(tmp_path / "m.erofs"),
                                       "--zinfo", str(zinfo), str(SMALL)])
    assert result.exit_code == 0, result.output
    assert "verifying: " in result.stderr and " of " in result.stderr and "%)" in result.stderr
    assert result.stderr.endswith("\r\x1b[2K")  # cleared
    assert "; read 1.0 MiB in " in result.stdout and "MiB/s)" in result.stdout
    assert ", 1 symlink, 0 others;" in result.stdout  # counted, not "1 symlinks"


def test_index_summary_counts_in_singular_and_binary_units(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["index", str(SMALL), "-o", str(tmp_path / "l.zinfo")])
    assert result.exit_code == 0, result.output
    assert "; 1 checkpoint (span 4.0 MiB) in " in result.stdout  # not "1 checkpoints"
    assert "MiB/s" in result.stdout and "MB/s" not in result.stdout


def _slow_gzip(tmp_path: Path) -> bytes:
    """A gzip layer of some 24 MiB of incompressible files."""
    rng = random.Random(7)
    tar_path = tmp_path / "big.tar"
    with tarfile.open(tar_path, "w") as archive:
        for n in range(6):
            data = tmp_path / f"f{n}"
            data.write_bytes(rng.randbytes(4 * MiB))
            archive.add(data, arcname=f"f{n}")
    return gzip.compress(tar_path.read_bytes(), 1)


def test_sigterm_clears_the_progress_line_and_leaves_no_output(tmp_path: Path) -> None:
    blob = _slow_gzip(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid_erofs", "index", "-", "-o", str(out / "l.zinfo"),
         "--progress"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(blob[:4 * MiB])  # then nothing more: indexing waits for the rest
    proc.stdin.flush()
    seen = b""
    deadline = time.monotonic() + 30
    while b"indexing: " not in seen and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 0.5)[0]:
            seen += os.read(proc.stderr.fileno(), 4096)
    assert b"indexing: " in seen
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    proc.stdin.close()
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert (seen + rest).endswith(b"\r\x1b[2K")
    assert b"Traceback" not in seen + rest
    assert sorted(p.name for p in out.iterdir()) == []


def test_index_of_stdin_on_a_terminal_says_so(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", "index", "-", "-o",
                               str(tmp_path / "l.zinfo")], stdin=terminal, capture_output=True,
                              text=True, timeout=30)
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == 2
    assert "Error: LAYER - reads the layer from standard input, which is a terminal: pipe one " \
           "in (curl -sL URL | hybrid-erofs index - ...)" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("read")
    result = CliRunner().invoke(main, ["index", str(SMALL), "-o", str(work / "l.zinfo")])
    assert result.exit_code == 0, result.output
    return work / "l.zinfo"


def test_read_from_offset_zero(indexed: Path) -> None:
    result = CliRunner().invoke(main, ["read", str(SMALL), "--zinfo", str(indexed),
                                       "--offset", "0", "--length", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == gzip.decompress(SMALL.read_bytes())[:4]


def test_read_of_zero_bytes(indexed: Path) -> None:
    result = CliRunner().invoke(main, ["read", str(SMALL), "--zinfo", str(indexed),
                                       "--offset", "1KiB", "--length", "0"])
    assert (result.exit_code, result.stdout_bytes) == (0, b"")


def test_status_counts_in_singular(tmp_path: Path) -> None:
    """A mount that read once, failed once, fetched once: no "1 errors", "1 requests"."""
    from hybrid_erofs.mounting.state import MountRecord, StatePaths

    runtime = tmp_path / "run"
    paths = StatePaths.for_mountpoint("/mnt/app", root=runtime)
    paths.save(MountRecord(
        mountpoint="/mnt/app", source="registry.example.com/app:1.2", meta="/i/m.erofs",
        zinfo="/i/layer.zinfo", via="auto", transport="fuse", daemon_pid=os.getpid(),
        daemon_start_time=None, log_file=str(paths.log), created=time.time()))
    paths.save_stats({"updated": time.time(), "reads": 1, "bytes_served": 4096, "errors": 1,
                      "bytes_fetched": 1024, "registry_requests": 1, "registry_retries": 1,
                      "registry_failures": 0, "failure_memory_hits": 0, "cache_hits": 1,
                      "cache_misses": 1, "hit_rate": 0.5, "spans_decoded": 1,
                      "spans_verified": 1})
    result = CliRunner().invoke(main, ["status"], env={"HYBRID_EROFS_RUNTIME_DIR": str(runtime)})
    assert result.exit_code == 0, result.output
    assert "1 error (EIO)" in result.output
    assert "in 1 request, 1 retry, " in result.output
    assert "(1 hit, 1 miss)" in result.output and "1 span decoded" in result.output
