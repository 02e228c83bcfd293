"""Decoded spans are keyed by the index that decoded them: a forged index of a blob (bound to
an image of its own) never puts its bytes under another index's mount of that blob."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

from hybrid_erofs.device import open_gzip_layer
from hybrid_erofs.gzindex.format import Checkpoint, GzipIndex, dump_index, load_index
from hybrid_erofs.gzindex.lazy import LazyWindows, profile_index
from hybrid_erofs.gzindex.sidecar import load_sidecar, sidecar_path, write_sidecar
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.source import FileSource
from hybrid_erofs.sources.cachedir import decoded_files
from hybrid_erofs.sources.stored import StoredLayerSource

SPAN = 64 << 10


def _layer(tmp_path: Path) -> tuple[Path, bytes]:
    """A gzip tar whose deflate data refers back across every checkpoint (each 20 KiB block
    the one before with some bytes changed), and its uncompressed bytes."""
    rng = random.Random(7)
    block = bytearray(rng.randbytes(20 << 10))
    blocks = []
    for _ in range(40):
        for _ in range(2000):
            block[rng.randrange(len(block))] = rng.randrange(256)
        blocks.append(bytes(block))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = b"".join(blocks)
        info = tarfile.TarInfo("file")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path, buf.getvalue()


def _forge(zinfo: Path, forged: Path) -> None:
    """The same index with the last checkpoint's window changed, and a sidecar of its own
    naming it (what a publisher can bind to an image of their own)."""
    index = load_index(zinfo)
    last = index.checkpoints[-1]
    window = bytes(b ^ 0x5A for b in last.window)
    index = GzipIndex(index.span, (*index.checkpoints[:-1],
                                   Checkpoint(last.in_offset, last.out_offset, last.bits, window)))
    data = dump_index(index)
    forged.write_bytes(data)
    sidecar = load_sidecar(sidecar_path(zinfo))
    write_sidecar(dataclasses.replace(
        sidecar, zinfo_digest="sha256:" + hashlib.sha256(data).hexdigest(),
        zinfo_size=len(data)), sidecar_path(forged))


def _read_tail(blob: Path, zinfo: Path, store: Path) -> bytes:
    layer = open_gzip_layer(FileSource(blob), zinfo=zinfo, name=str(blob), store_dir=store)
    try:
        assert isinstance(layer, StoredLayerSource)
        start = layer.inner.index.checkpoints[-1].out_offset
        return start.to_bytes(8, "little") + layer.pread(layer.size - start, start)
    finally:
        layer.close()


def test_spans_decoded_through_a_forged_index_are_not_served_to_the_genuine_one(
        tmp_path: Path) -> None:
    blob, tar = _layer(tmp_path)
    zinfo, forged = tmp_path / "layer.zinfo", tmp_path / "forged.zinfo"
    index_layer(str(blob), zinfo=zinfo, meta=None, span=SPAN)
    assert len(load_index(zinfo)) >= 3
    _forge(zinfo, forged)
    store = tmp_path / "blob-cache"
    wrong = _read_tail(blob, forged, store)  # decoded in full: kept in the store
    start = int.from_bytes(wrong[:8], "little")
    assert wrong[8:] != tar[start:], "the forged window must change the decoded bytes"
    assert _read_tail(blob, zinfo, store)[8:] == tar[start:]
    assert len(decoded_files(store)) == 2  # one store per index
    # and each index finds its own spans again
    again = open_gzip_layer(FileSource(blob), zinfo=zinfo, name=str(blob), store_dir=store)
    try:
        assert isinstance(again, StoredLayerSource)
        assert again.store.has_span(len(again.inner.index) - 1)
        assert os.path.basename(again.store.data_path) in decoded_files(store)
    finally:
        again.close()


def test_spans_decoded_through_a_forged_profile_zinfo_are_not_served_to_the_zinfo(
        tmp_path: Path) -> None:
    """The genuine sidecar and zinfo bound with a forged profile zinfo (gzindex/lazy.py):
    its windows decode the profile's spans before the zinfo comes to refuse it; those spans
    stay out of the store that mounts through the zinfo read."""
    blob, tar = _layer(tmp_path)
    zinfo = tmp_path / "layer.zinfo"
    index_layer(str(blob), zinfo=zinfo, meta=None, span=SPAN)
    full = load_index(zinfo)
    last = len(full) - 1
    forged_cp = dataclasses.replace(full.checkpoints[last],
                                    window=bytes(b ^ 0x5A for b in full.checkpoints[last].window))
    forged = profile_index(GzipIndex(full.span, (*full.checkpoints[:-1], forged_cp)), [last])
    windows = LazyWindows(forged, [last], load=lambda: full, digest="sha256:" + hashlib.sha256(
        dump_index(forged)).hexdigest())
    store = tmp_path / "blob-cache"
    layer = open_gzip_layer(FileSource(blob), zinfo=zinfo, name=str(blob), store_dir=store,
                            windows=windows)
    try:
        assert isinstance(layer, StoredLayerSource)
        start = full.checkpoints[last].out_offset
        assert layer.pread(layer.size - start, start) != tar[start:]
        lazy_store = layer.store.data_path
    finally:
        layer.close()
    assert _read_tail(blob, zinfo, store)[8:] == tar[start:]
    assert os.path.basename(lazy_store) in decoded_files(store)
    assert len(decoded_files(store)) == 2
