"""`hybrid-erofs cache ls|prune` through click's CliRunner, on a cache filled by ChunkCacheSource."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.cachedir import scan_blobs
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from hybrid_erofs.sources.chunkstore import blob_dir

DATA = random.Random(11).randbytes(5 * 65536 + 10)
OLD, NEW = "sha256:" + "01" * 32, "sha256:" + "02" * 32


def _fill(cache_dir: Path, key: str, *, age_s: float, length: int = len(DATA)) -> None:
    source = ChunkCacheSource(MemorySource(DATA), key=key, cache_dir=cache_dir,
                              chunk_size=65536, readahead=0)
    source.pread(length, 0)
    source.close()
    stamp = time.time() - age_s
    os.utime(blob_dir(cache_dir, key) / "index", (stamp, stamp))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Iterator[Path]:
    _fill(tmp_path, OLD, age_s=10 * 86400, length=65536 + 1)  # 2 of 6 chunks
    _fill(tmp_path, NEW, age_s=60)
    yield tmp_path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["cache", *args])
    return result.exit_code, result.output


def test_ls_lists_blobs_oldest_first(cache_dir: Path) -> None:
    code, out = _run("ls", "--cache-dir", str(cache_dir))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("DIGEST")
    assert lines[1].startswith(OLD) and "2/6" in lines[1] and "64.0 KiB" in lines[1]
    assert lines[2].startswith(NEW) and "6/6" in lines[2]
    assert lines[-1].startswith("2 blobs, ") and str(cache_dir) in lines[-1]


def test_ls_json(cache_dir: Path) -> None:
    code, out = _run("ls", "--cache-dir", str(cache_dir), "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert [blob["digest"] for blob in doc["blobs"]] == [OLD, NEW]
    new = doc["blobs"][1]
    assert (new["chunks"], new["chunks_present"], new["size"]) == (6, 6, len(DATA))
    assert new["disk_bytes"] >= len(DATA) and new["in_use"] is False
    assert doc["disk_bytes"] == sum(blob["disk_bytes"] for blob in doc["blobs"])


def test_ls_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    code, out = _run("ls", "--cache-dir", str(tmp_path / "none"))
    assert code == 0 and out.startswith("0 blobs, 0 B on disk")


def test_prune_older_than(cache_dir: Path) -> None:
    code, out = _run("prune", "--cache-dir", str(cache_dir), "--older-than", "7d")
    assert code == 0, out
    assert f"removed {OLD}" in out and NEW not in out
    assert [blob.digest for blob in scan_blobs(cache_dir)] == [NEW]


def test_prune_dry_run_removes_nothing(cache_dir: Path) -> None:
    code, out = _run("prune", "--cache-dir", str(cache_dir), "--all", "--dry-run")
    assert code == 0, out
    assert f"would remove {OLD}" in out and f"would remove {NEW}" in out
    assert len(scan_blobs(cache_dir)) == 2


def test_prune_max_size_removes_least_recently_used_first(cache_dir: Path) -> None:
    code, out = _run("prune", "--cache-dir", str(cache_dir), "--max-size", "400KiB")
    assert code == 0, out
    assert [blob.digest for blob in scan_blobs(cache_dir)] == [NEW]


def test_prune_all_keeps_blobs_in_use(cache_dir: Path) -> None:
    source = ChunkCacheSource(MemorySource(DATA), key=NEW, cache_dir=cache_dir, chunk_size=65536)
    try:
        code, out = _run("prune", "--cache-dir", str(cache_dir), "--all")
    finally:
        source.close()
    assert code == 0, out
    assert f"removed {OLD}" in out and f"kept {NEW}" in out and "in use" in out
    assert [blob.digest for blob in scan_blobs(cache_dir)] == [NEW]


def test_prune_needs_a_criterion(cache_dir: Path) -> None:
    code, out = _run("prune", "--cache-dir", str(cache_dir))
    assert code == 2 and "at least one of" in out


@pytest.mark.parametrize(("flag", "value"), [("--older-than", "7 years"), ("--older-than", "d"),
                                             ("--max-size", "lots")])
def test_prune_rejects_bad_values(cache_dir: Path, flag: str, value: str) -> None:
    code, out = _run("prune", "--cache-dir", str(cache_dir), flag, value)
    assert code == 2 and "Invalid value" in out


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800),
                                               ("12h", 43200), ("7d", 604800), ("2w", 1209600),
                                               ("1.5h", 5400)])
def test_durations(cache_dir: Path, text: str, seconds: float) -> None:
    from hybrid_erofs.cli.cache_cmd import DurationType

    assert DurationType().convert(text, None, None) == seconds


def test_help_shows_examples() -> None:
    for command in ("ls", "prune"):
        code, out = _run(command, "--help")
        assert code == 0 and "hybrid-erofs cache " + command in out
