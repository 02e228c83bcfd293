"""Decoded spans are keyed by the index that decoded them: a forged index of a blob (bound to
an image of its own) never puts its bytes under another index's mount of that blob. A store
started on a profile zinfo becomes the zinfo's once the zinfo comes and agrees (rekey), never
when it is refused."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from hybrid_erofs.device import open_gzip_layer
from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.gzindex.format import Checkpoint, GzipIndex, dump_index, load_index
from hybrid_erofs.gzindex.lazy import LazyWindows, profile_index
from hybrid_erofs.gzindex.sidecar import load_sidecar, sidecar_path, write_sidecar
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.source import FileSource
from hybrid_erofs.sources.cachedir import decoded_bytes, decoded_files, scan_blobs
from hybrid_erofs.sources.layerstore import DATA_NAME, LayerStore, data_name, spans_name
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


def _indexed(tmp_path: Path) -> tuple[Path, bytes, Path, Path]:
    """(blob, its tar, its zinfo indexed here, the blob's cache directory for stores)."""
    blob, tar = _layer(tmp_path)
    zinfo = tmp_path / "layer.zinfo"
    index_layer(str(blob), zinfo=zinfo, meta=None, span=SPAN)
    return blob, tar, zinfo, tmp_path / "blob-cache"


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
    blob, tar, zinfo, store = _indexed(tmp_path)
    full = load_index(zinfo)
    last = len(full) - 1
    layer = _open(blob, zinfo, store, _profiled(zinfo, [last], forge=last))
    try:
        start = full.checkpoints[last].out_offset
        assert layer.pread(layer.size - start, start) != tar[start:]
        lazy_store = layer.store.data_path
    finally:
        layer.close()
    assert _read_tail(blob, zinfo, store)[8:] == tar[start:]
    assert os.path.basename(lazy_store) in decoded_files(store)
    assert len(decoded_files(store)) == 2


def _profiled(zinfo: Path, real: list[int], *, forge: int | None = None,
              full: GzipIndex | None = None) -> LazyWindows:
    """LazyWindows over the profile zinfo of `zinfo` with the windows of `real` (checkpoint
    `forge`'s changed: a forged profile zinfo), loading `full` (default: the zinfo)."""
    index = load_index(zinfo)
    checkpoints = list(index.checkpoints)
    if forge is not None:
        checkpoints[forge] = dataclasses.replace(
            checkpoints[forge], window=bytes(b ^ 0x5A for b in checkpoints[forge].window))
    profile = profile_index(GzipIndex(index.span, tuple(checkpoints)), real)
    loaded = full if full is not None else index
    return LazyWindows(profile, real, load=lambda: loaded, name=str(zinfo),
                       digest="sha256:" + hashlib.sha256(dump_index(profile)).hexdigest())


def _open(blob: Path, zinfo: Path, store: Path,
          windows: LazyWindows | None = None) -> StoredLayerSource:
    layer = open_gzip_layer(FileSource(blob), zinfo=zinfo, name=str(blob), store_dir=store,
                            windows=windows)
    assert isinstance(layer, StoredLayerSource)
    return layer


def test_a_store_started_on_an_agreeing_profile_zinfo_becomes_the_zinfo_store(
        tmp_path: Path) -> None:
    """Mounted on its profile zinfo, read in full (the full zinfo comes and agrees), closed;
    opened again through the zinfo: every span is there, none is decoded again."""
    blob, tar, zinfo, store = _indexed(tmp_path)
    windows = _profiled(zinfo, [1])
    layer = _open(blob, zinfo, store, windows)
    try:
        lazy_name = layer.store.data_path.name
        assert layer.pread(layer.size, 0) == tar  # windows beyond span 1: the full zinfo
        assert windows.complete and layer.store.complete
        layer.store.mark_verified()  # what the background fetch does next
    finally:
        layer.close()
    again = _open(blob, zinfo, store)
    try:
        assert again.store.complete and again.store.verified  # what `via local` needs
        assert again.pread(again.size, 0) == tar
        assert again.inner.spans_decoded == 0
        assert again.store.data_path == layer.store.data_path  # one store, on disk once
    finally:
        again.close()
    assert decoded_files(store) == [again.store.data_path.name] != [lazy_name]


def _read_span(layer: StoredLayerSource, number: int, tar: bytes) -> None:
    length, offset = layer.store.span_range(number)
    assert layer.pread(length, offset) == tar[offset:offset + length]


@pytest.mark.parametrize("verified", [False, True])
def test_spans_stored_after_the_rekey_are_recorded_under_the_zinfo_store(
        tmp_path: Path, verified: bool) -> None:
    """The full zinfo comes before the rest is read: the spans stored from then on (and the
    record's flushes) go to the zinfo's store. A span stored before, whose end could not be
    checked (the next window was not in the profile zinfo), is served by this mount but
    recorded for the zinfo's only once the layer is verified: until then a mount through
    the zinfo decodes it itself (with the check)."""
    blob, tar, zinfo, store = _indexed(tmp_path)
    windows = _profiled(zinfo, [1, 2])  # span 1 ends at a window it has, span 2 does not
    layer = _open(blob, zinfo, store, windows)
    last = layer.store.span_count - 1
    try:
        _read_span(layer, 2, tar)
        _read_span(layer, 1, tar)  # not forward: nothing is decoded ahead
        layer.store.flush()
        assert not windows.complete and layer.inner.unchecked_ends() == {2}
        windows.load()
        _read_span(layer, last, tar)
        layer.store.flush()
        assert [p.name for p in store.iterdir() if ".spans-" in p.name] == [
            layer.store.spans_path.name]
        assert layer.store.has_span(2)  # still served here
        if verified:
            layer.store.mark_verified()
    finally:
        layer.close()
    again = _open(blob, zinfo, store)
    try:
        assert again.store.has_span(1) and again.store.has_span(last)
        assert again.store.has_span(2) is verified
        assert again.store.spans_present() == 3 if verified else 2
        _read_span(again, 2, tar)
        assert again.inner.spans_decoded == (0 if verified else 1)
    finally:
        again.close()


def test_a_forged_profile_zinfo_never_becomes_the_zinfo_store(tmp_path: Path) -> None:
    """A profile zinfo with a forged window: its spans are decoded and stored, the full
    zinfo comes and is refused; the store never becomes the zinfo's (it is removed, nothing
    else is stored in it), and the zinfo's mount decodes the right bytes into its own."""
    blob, tar, zinfo, store = _indexed(tmp_path)
    last = len(load_index(zinfo)) - 1
    windows = _profiled(zinfo, [last], forge=last)
    layer = _open(blob, zinfo, store, windows)
    try:
        start = layer.store.span_range(last)[1]
        assert layer.pread(layer.size - start, start) != tar[start:]
        with pytest.raises(SourceIOError, match="refused"):
            windows.load()
        windows.when_complete(lambda: pytest.fail("called for a refused zinfo"))
        lazy = layer.store.data_path
        assert not layer.store.has_span(last) and decoded_files(store) == []
        layer.store.put(0, tar[:layer.store.span_range(0)[0]])  # stores nothing from now on
        assert not layer.store.has_span(0)
    finally:
        layer.close()
    assert not any(name.startswith(DATA_NAME) for name in os.listdir(store))  # nor a record
    genuine = _open(blob, zinfo, store)
    try:
        assert genuine.store.data_path != lazy and not genuine.store.has_span(last)
        assert genuine.pread(genuine.size - start, start) == tar[start:]
    finally:
        genuine.close()
    assert decoded_files(store) == [genuine.store.data_path.name]


def test_a_zinfo_file_other_than_the_sidecar_names_is_not_adopted(tmp_path: Path) -> None:
    """The full zinfo LazyWindows was given agrees, but the file the zinfo's mounts read is
    not the one the sidecar names: the store stays the profile zinfo's."""
    blob, _tar, zinfo, store = _indexed(tmp_path)
    windows = _profiled(zinfo, [1])
    layer = _open(blob, zinfo, store, windows)
    try:
        lazy = layer.store.data_path
        zinfo.write_bytes(zinfo.read_bytes() + b"\0")
        windows.load()
        assert layer.store.data_path == lazy
    finally:
        layer.close()


def test_a_store_is_kept_apart_from_an_existing_zinfo_store(tmp_path: Path) -> None:
    """The zinfo's store exists already (a mount through the zinfo made it meanwhile): never
    replaced; both stores go on serving their own spans."""
    blob, tar, zinfo, store = _indexed(tmp_path)
    plain = _open(blob, zinfo, store)
    length, offset = plain.store.span_range(0)
    assert plain.pread(length, offset) == tar[:length]
    plain.close()
    windows = _profiled(zinfo, [1])
    layer = _open(blob, zinfo, store, windows)
    try:
        lazy = layer.store.data_path
        assert layer.pread(layer.size, 0) == tar
        assert windows.complete and layer.store.data_path == lazy
    finally:
        layer.close()
    assert sorted(decoded_files(store)) == sorted([lazy.name, plain.store.data_path.name])
    again = _open(blob, zinfo, store)
    try:
        assert again.store.spans_present() == 1
    finally:
        again.close()


def test_rekey_waits_for_the_only_open_store_and_moves_its_record(tmp_path: Path) -> None:
    """While another opener has the store open (here a second LayerStore: a file
    description of its own, as another process has), rekey keeps it; alone, it moves the
    data and the record (with the verified flag), leaving no record behind."""
    starts = [0, 4096, 8192]
    one = LayerStore(tmp_path, size=12288, starts=starts, index="p")
    other = LayerStore(tmp_path, size=12288, starts=starts, index="p")
    for number in range(3):
        one.put(number, bytes([number + 1]) * 4096)
    one.mark_verified()
    assert not one.rekey("z")
    assert one.data_path.name == data_name("p")
    other.close()
    assert one.rekey("z")
    assert sorted(os.listdir(tmp_path)) == [data_name("z"), spans_name(12288, starts, "z")]
    assert one.rekey("z")  # already
    one.close()
    moved = LayerStore(tmp_path, size=12288, starts=starts, index="z")
    try:
        assert moved.complete and moved.verified
        assert os.pread(moved.fd, 4096, 8192) == b"\3" * 4096
    finally:
        moved.close()
    fresh = LayerStore(tmp_path, size=12288, starts=starts, index="p")
    try:
        assert fresh.spans_present() == 0
    finally:
        fresh.close()


def test_discard_leaves_a_store_open_elsewhere_to_eviction(tmp_path: Path) -> None:
    starts = [0, 4096]
    one = LayerStore(tmp_path, size=8192, starts=starts, index="p")
    other = LayerStore(tmp_path, size=8192, starts=starts, index="p")
    one.put(0, b"\1" * 4096)
    one.flush()
    assert not one.discard()  # open in another process: its files stay
    assert not one.has(4096, 0) and not one.rekey("z")
    assert sorted(os.listdir(tmp_path)) == [data_name("p"), spans_name(8192, starts, "p")]
    other.close()
    one.close()


def test_the_cache_counts_a_store_with_two_names_once(tmp_path: Path) -> None:
    """Between rekey's link and unlink (or after a crash there) the data file has two
    names: eviction and `cache ls` count its blocks once."""
    directory = tmp_path / "chunks-v1" / "sha256" / ("ab" * 32)
    directory.mkdir(parents=True)
    data = directory / data_name("p")
    data.write_bytes(b"x" * 65536)
    before = decoded_bytes(directory)
    [info] = scan_blobs(tmp_path, count=False)
    os.link(data, directory / data_name("z"))
    assert decoded_bytes(directory) == before > 0
    assert scan_blobs(tmp_path, count=False)[0].disk_bytes == info.disk_bytes


def test_a_store_opened_while_it_is_rekeyed_opens_its_name_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another opener of the profile zinfo's store opens its data file, and before it holds
    its shared lock the store is rekeyed: it must not go on under the old name with the
    moved file (its records would then claim spans of a new, empty file of that name)."""
    import hybrid_erofs.sources.layerstore as layerstore

    starts = [0, 4096]
    one = LayerStore(tmp_path, size=8192, starts=starts, index="p")
    one.put(0, b"\1" * 4096)
    one.flush()
    real_flock = layerstore.fcntl.flock
    moved: list[bool] = []

    def flock(fd: int, operation: int) -> None:
        if operation == layerstore.fcntl.LOCK_SH and not moved and fd != one.fd:
            moved.append(one.rekey("z"))  # between the other's open and its lock
        real_flock(fd, operation)

    monkeypatch.setattr(layerstore.fcntl, "flock", flock)
    other = LayerStore(tmp_path, size=8192, starts=starts, index="p")
    monkeypatch.setattr(layerstore.fcntl, "flock", real_flock)
    try:
        assert moved == [True]
        assert os.fstat(other.fd).st_ino != os.fstat(one.fd).st_ino  # a new file
        assert other.spans_present() == 0 and one.has_span(0)
        other.put(1, b"\2" * 4096)
        other.flush()
    finally:
        other.close()
        one.close()
    zinfo_store = LayerStore(tmp_path, size=8192, starts=starts, index="z")
    try:
        assert zinfo_store.has_span(0) and not zinfo_store.has_span(1)
        assert os.pread(zinfo_store.fd, 4096, 0) == b"\1" * 4096
    finally:
        zinfo_store.close()
