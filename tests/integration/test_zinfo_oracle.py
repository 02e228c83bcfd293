"""Interop with erofs-utils 1.9: our zinfo equals `mkfs.erofs --tar=i --gzinfo` checkpoint for
checkpoint, and GzipSource reads correctly through the oracle's zinfo."""

from __future__ import annotations

import random
import subprocess
import zlib
from pathlib import Path

import pytest

from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import WINDOW_SIZE, GzipIndex, load_index
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.source import FileSource

from ..conftest import layer_tar, require_oracle

pytestmark = pytest.mark.integration
ORACLE = "mkfs.erofs-oracle"


def oracle_zinfo(layer: Path, work: Path) -> GzipIndex:
    require_oracle(ORACLE)
    zinfo = work / f"{layer.name}.zinfo"
    subprocess.run([ORACLE, "--tar=i", f"--gzinfo={zinfo}", str(work / "meta.erofs"), str(layer)],
                   check=True, capture_output=True)
    # erofs-utils checkpoints every member start, empty members too: several checkpoints at
    # one uncompressed offset, which readers fold into the first (ours never makes them).
    return load_index(zinfo, blob_size=layer.stat().st_size, strict=False)


def tuples(index: GzipIndex) -> list[tuple[int, int, int]]:
    return [(cp.in_offset, cp.out_offset, cp.bits) for cp in index.checkpoints]


@pytest.mark.parametrize(("name", "every_member"), [
    ("rootfs", False), ("rootfs_pigz", False), ("random", False), ("zeros", False),
    ("estargz", True), ("headers", True), ("empty_members", True),
])
def test_same_checkpoints_as_mkfs_erofs(layers: dict[str, Path], tmp_path: Path, name: str,
                                        every_member: bool) -> None:
    layer = layers[name]
    theirs = oracle_zinfo(layer, tmp_path)
    with open(layer, "rb") as handle:
        ours = build_index(handle, every_member=every_member).index  # erofs' 4 MiB default
    assert ours.span == theirs.span
    assert tuples(ours) == tuples(theirs)
    # erofs' first window is uninitialised memory by its code, and after a member boundary
    # its ring buffer keeps stale bytes the new member cannot refer to: compare the part of
    # each window that lies inside the checkpoint's own member.
    starts = member_starts(layer.read_bytes())
    for number, (a, b) in enumerate(zip(ours.checkpoints, theirs.checkpoints, strict=True)):
        if number == 0:
            continue
        member_start = max(m for m in starts if m <= a.out_offset)
        valid = min(WINDOW_SIZE, a.out_offset - member_start)
        assert a.window[WINDOW_SIZE - valid :] == b.window[WINDOW_SIZE - valid :], number


def member_starts(blob: bytes) -> list[int]:
    """Uncompressed offsets where each gzip member begins."""
    starts, out = [], 0
    while blob and blob[:2] == b"\x1f\x8b":
        starts.append(out)
        decoder = zlib.decompressobj(31)
        out += len(decoder.decompress(blob))
        blob = decoder.unused_data
    return starts


def test_mkfs_erofs_fails_where_we_do_not(layers: dict[str, Path], tmp_path: Path) -> None:
    # erofs-utils 1.9.4 stops at a 1-byte first gzip member ("failed to read header block @ 0");
    # the builder and reader here handle it (test_gzip_layers reads it back in full).
    require_oracle(ORACLE)
    layer = layers["multimember"]
    proc = subprocess.run([ORACLE, "--tar=i", f"--gzinfo={tmp_path / 'z'}", str(tmp_path / "m"),
                           str(layer)], capture_output=True, text=True)
    with open(layer, "rb") as handle:
        ours = build_index(handle, every_member=True)
    assert ours.layer_size == layer_tar(layer).stat().st_size
    assert proc.returncode != 0 or len(load_index(tmp_path / "z")) == len(ours.index)


def test_full_file_equality_for_a_single_member_layer(layers: dict[str, Path], tmp_path: Path) -> None:
    # The issue's promise: for single-member layers the file equals mkfs.erofs' (first window aside).
    layer = layers["rootfs"]
    oracle_zinfo(layer, tmp_path)
    theirs = (tmp_path / f"{layer.name}.zinfo").read_bytes()
    subprocess.run(["hybrid-erofs", "index", str(layer), "-o", str(tmp_path / "ours.zinfo"),
                    "--no-meta"], check=True, capture_output=True)
    ours = (tmp_path / "ours.zinfo").read_bytes()
    assert len(ours) == len(theirs)
    first_window = slice(12 + 17, 12 + 17 + 32768)
    assert ours[: first_window.start] == theirs[: first_window.start]
    assert ours[first_window.stop :] == theirs[first_window.stop :]


@pytest.mark.parametrize("name", ["rootfs", "estargz", "headers", "zeros"])
def test_reads_through_the_oracles_zinfo(layers: dict[str, Path], tmp_path: Path, name: str) -> None:
    layer = layers[name]
    plain = layer_tar(layer).read_bytes()
    source = GzipSource(FileSource(layer), oracle_zinfo(layer, tmp_path))
    try:
        assert source.size == len(plain)
        rng = random.Random(4)
        for _ in range(100):
            offset = rng.randrange(len(plain))
            length = min(rng.randrange(1, 100_000), len(plain) - offset)
            assert source.pread(length, offset) == plain[offset : offset + length]
    finally:
        source.close()
