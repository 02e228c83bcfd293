"""The chunk cache on a small filesystem of the test's own (a size-limited tmpfs) through real
mounts: a full disk still mounts and serves a new layer without fetching it over and over, a
size limit holds while several layers share the cache, and no empty entry is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.indexing.layer import index_layer
from tests.fault_registry import FaultRegistry
from tests.integration.conftest import require_fuse_and_erofs
from tests.integration.test_mount_faults import SPAN, _make_layer
from tests.mounting import daemons_for

pytestmark = [pytest.mark.integration, pytest.mark.root]

CLI = [sys.executable, "-m", "hybrid_erofs"]


@dataclass
class Served:
    registry: FaultRegistry
    files: dict[str, bytes]
    zinfo: Path
    meta: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Served]]:
    """Two layers (about 12 MB of blob each), each in a registry of its own, indexed."""
    require_fuse_and_erofs()
    work = tmp_path_factory.mktemp("cache-full")
    layers = []
    try:
        for seed in (21, 22):
            blob, files = _make_layer(seed)
            registry = FaultRegistry(blob)
            zinfo, meta = work / f"{seed}.zinfo", work / f"{seed}.erofs"
            index_layer(registry.ref, zinfo=zinfo, meta=meta, span=SPAN)
            layers.append(Served(registry, files, zinfo, meta))
        yield layers
    finally:
        for layer in layers:
            layer.registry.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs of the test's own."""
    path = tmp_path / "cachefs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(path: Path) -> None:
    """Write a file until the filesystem is full (ENOSPC)."""
    with open(path / "filler", "wb", buffering=0) as filler:
        block = b"\xaa" * (1 << 16)
        with contextlib.suppress(OSError):
            while True:
                filler.write(block)
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\xaa" * 512)
    st = os.statvfs(path)
    assert st.f_bavail * st.f_frsize < 64 << 10


@contextlib.contextmanager
def _mounted(layer: Served, mnt: Path, env: dict[str, str], *options: str) -> Iterator[None]:
    mnt.mkdir()
    proc = subprocess.run(
        [*CLI, "mount", "--meta", str(layer.meta), "--zinfo", str(layer.zinfo), "--via",
         "fuse", *options, layer.registry.ref, str(mnt)],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        yield
    finally:
        proc = subprocess.run([*CLI, "umount", str(mnt)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def _read_all(layer: Served, mnt: Path) -> None:
    for name, data in layer.files.items():  # tar order: a whole-layer read
        assert (mnt / name).read_bytes() == data, name


def _cache_ls(cache: Path, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([*CLI, "cache", "ls", "--json", "--cache-dir", str(cache)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listing: dict[str, Any] = json.loads(proc.stdout)
    return listing


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    runtime = tmp_path / "run"
    yield {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    assert daemons_for(runtime) == []


def test_a_full_cache_disk_still_mounts_and_serves_a_new_layer(
        served: list[Served], small_fs: Path, tmp_path: Path, env: dict[str, str]) -> None:
    layer = served[0]
    cache = small_fs / "cache"
    _fill(small_fs)
    layer.registry.reset_counters()
    with _mounted(layer, tmp_path / "mnt", env, "--cache-dir", str(cache),
                  "--memory-cache", "8MiB"):
        _read_all(layer, tmp_path / "mnt")
        downloaded = layer.registry.bytes_served
        blob = len(layer.registry.layer)
        print(f"full disk: downloaded {downloaded} bytes for a {blob}-byte blob "
              f"({downloaded / blob:.2f}x)")
        assert downloaded <= 1.2 * blob
    # Nothing could be stored: no entry is left for the blob (no empty directory either).
    assert _cache_ls(cache, env)["blobs"] == []
    assert [p for p in cache.rglob("*")
            if p.name not in ("chunks-v1", "sha256", ".evict.lock")] == []


def test_the_size_limit_holds_while_two_layers_share_the_cache(
        served: list[Served], small_fs: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """A 4 MiB limit for two 12 MB layers read whole at once: least recently used chunks of
    either layer (both in use) go; each layer is still fetched about once."""
    cache = small_fs / "cache"
    limit = 4 << 20
    for layer in served:
        layer.registry.reset_counters()
    options = ("--cache-dir", str(cache), "--cache-max-size", str(limit))
    sizes = []
    with _mounted(served[0], tmp_path / "a", env, *options), \
            _mounted(served[1], tmp_path / "b", env, *options):
        for layer, mnt in ((served[0], tmp_path / "a"), (served[1], tmp_path / "b")):
            for n, (name, data) in enumerate(layer.files.items()):
                assert (mnt / name).read_bytes() == data
                if n % 10 == 0:
                    sizes.append(_cache_ls(cache, env)["disk_bytes"])
        sizes.append(_cache_ls(cache, env)["disk_bytes"])
        for layer in served:
            downloaded, blob = layer.registry.bytes_served, len(layer.registry.layer)
            print(f"limit {limit}: downloaded {downloaded / blob:.2f}x the blob")
            assert downloaded <= 1.2 * blob
    print(f"cache sizes while reading: max {max(sizes)}, last {sizes[-1]}")
    assert max(sizes) <= limit
    # No empty entry: every blob left holds chunks or decoded layer data (its data files).
    assert all(blob["disk_bytes"] > 64 << 10 for blob in _cache_ls(cache, env)["blobs"])
