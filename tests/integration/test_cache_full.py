"""The chunk cache on a small filesystem of the test's own (a size-limited tmpfs) through real
mounts: a full disk still mounts and serves a new layer without fetching it over and over, a
size limit holds while several layers share the cache, and no empty entry is left behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybrid_erofs.indexing.layer import index_layer
from tests.fault_registry import FaultRegistry, make_layer
from tests.integration.conftest import require_fuse_and_erofs
from tests.integration.test_mount_faults import SPAN, Layer, mounted

pytestmark = [pytest.mark.integration, pytest.mark.root]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Layer]]:
    """Two layers (about 12 MB of blob each), each in a registry of its own, indexed."""
    require_fuse_and_erofs()
    work = tmp_path_factory.mktemp("cache-full")
    layers = []
    try:
        for seed in (21, 22):
            blob, files = make_layer(seed)
            registry = FaultRegistry(blob)
            zinfo, meta = work / f"{seed}.zinfo", work / f"{seed}.erofs"
            index_layer(registry.ref, zinfo=zinfo, meta=meta, span=SPAN)
            layers.append(Layer(registry, files, zinfo, meta))
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
        for block in (b"\xaa" * (1 << 16), b"\xaa" * 512):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(block)
    st = os.statvfs(path)
    assert st.f_bavail * st.f_frsize < 64 << 10


def test_a_full_cache_disk_still_mounts_and_serves_a_new_layer(
        served: list[Layer], small_fs: Path, tmp_path: Path) -> None:
    layer = served[0]
    cache = small_fs / "cache"
    _fill(small_fs)
    layer.registry.reset_counters()
    with mounted(layer, tmp_path, "--cache-dir", str(cache), "--memory-cache", "8MiB") as mount:
        for name, data in layer.files.items():  # tar order: a whole-layer read
            assert (mount.mnt / name).read_bytes() == data, name
        downloaded = layer.registry.bytes_served
        blob = len(layer.registry.layer)
        print(f"full disk: downloaded {downloaded} bytes for a {blob}-byte blob "
              f"({downloaded / blob:.2f}x)")
        assert downloaded <= 1.2 * blob
    # Nothing could be stored: no entry is left for the blob (no empty directory either).
    assert mount.cache_ls(cache)["blobs"] == []
    assert [p for p in cache.rglob("*")
            if p.name not in ("chunks-v1", "sha256", ".evict.lock")] == []


def test_the_size_limit_holds_while_two_layers_share_the_cache(
        served: list[Layer], small_fs: Path, tmp_path: Path) -> None:
    """A 4 MiB limit for two 12 MB layers read whole at once: least recently used chunks of
    either layer (both in use) go; each layer is still fetched about once."""
    cache = small_fs / "cache"
    limit = 4 << 20
    for layer in served:
        layer.registry.reset_counters()
    options = ("--cache-dir", str(cache), "--cache-max-size", str(limit))
    sizes = []
    with mounted(served[0], tmp_path, *options, name="a") as a, \
            mounted(served[1], tmp_path, *options, name="b") as b:
        for layer, mount in ((served[0], a), (served[1], b)):
            for n, (name, data) in enumerate(layer.files.items()):
                assert (mount.mnt / name).read_bytes() == data
                if n % 10 == 0:
                    sizes.append(mount.cache_ls(cache)["disk_bytes"])
        sizes.append(a.cache_ls(cache)["disk_bytes"])
        for layer in served:
            downloaded, blob = layer.registry.bytes_served, len(layer.registry.layer)
            print(f"limit {limit}: downloaded {downloaded / blob:.2f}x the blob")
            assert downloaded <= 1.2 * blob
    print(f"cache sizes while reading: max {max(sizes)}, last {sizes[-1]}")
    assert max(sizes) <= limit
    # No empty entry: every blob left holds chunks or decoded layer data (its data files).
    assert all(blob["disk_bytes"] > 64 << 10 for blob in a.cache_ls(cache)["blobs"])
