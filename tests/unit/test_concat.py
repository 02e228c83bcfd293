"""ConcatSource reads across part boundaries; open_disk() checks a meta against its layer data."""

from __future__ import annotations

import io
import random
import struct
import tarfile
import threading

import pytest

from hybrid_erofs.errors import InvalidInput, SourceIOError
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.concat import ConcatSource, PinnedHeadSource, ZeroSource, open_disk
from tests.doubles import CountingSource, FlakySource


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


PARTS = [_data(1000, 1), b"", _data(1, 2), _data(4096, 3), b"", _data(777, 4)]
WHOLE = b"".join(PARTS)


def _concat() -> tuple[ConcatSource, list[CountingSource]]:
    parts = [CountingSource(p) for p in PARTS]
    return ConcatSource(parts), parts


def test_size_and_every_boundary_straddle() -> None:
    source, _ = _concat()
    assert source.size == len(WHOLE)
    boundaries = {0, 1000, 1001, 5097, len(WHOLE)}
    for edge in boundaries:
        for offset in range(max(0, edge - 3), min(len(WHOLE), edge + 3)):
            for length in (0, 1, 2, 5, 1500, len(WHOLE) - offset):
                length = min(length, len(WHOLE) - offset)
                assert source.pread(length, offset) == WHOLE[offset:offset + length]


def test_random_reads_match_the_joined_bytes() -> None:
    source, _ = _concat()
    rng = random.Random(7)
    for _ in range(500):
        offset = rng.randrange(len(WHOLE))
        length = rng.randrange(len(WHOLE) - offset + 1)
        assert source.pread(length, offset) == WHOLE[offset:offset + length]


def test_reads_only_the_parts_needed() -> None:
    source, parts = _concat()
    assert source.pread(10, 995) == WHOLE[995:1005]
    assert [p.calls for p in parts] == [[(5, 995)], [], [(1, 0)], [(4, 0)], [], []]


def test_range_errors_and_close_closes_all_parts() -> None:
    source, parts = _concat()
    with pytest.raises(ValueError):
        source.pread(2, len(WHOLE) - 1)
    with pytest.raises(ValueError):
        source.pread(1, -1)
    source.close()
    assert all(p.closed for p in parts)


def test_part_errors_propagate() -> None:
    source = ConcatSource([MemorySource(b"a" * 100), FlakySource(b"b" * 100, failures=1)])
    with pytest.raises(OSError):
        source.pread(20, 90)
    assert source.pread(20, 90) == b"a" * 10 + b"b" * 10


def test_concurrent_reads() -> None:
    source, _ = _concat()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                offset = rng.randrange(len(WHOLE))
                length = rng.randrange(min(3000, len(WHOLE) - offset) + 1)
                assert source.pread(length, offset) == WHOLE[offset:offset + length]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_zero_source() -> None:
    assert ZeroSource(10).pread(4, 6) == bytes(4)
    with pytest.raises(ValueError):
        ZeroSource(-1)


# -- open_disk -----------------------------------------------------------------------------------


def fake_meta(*, blocks: int = 4, uniaddr: int | None = None, slot_blocks: int = 3,
              magic: int = 0xE0F5E1E2, incompat: int = 0x8, extra_devices: int = 1,
              size: int | None = None) -> bytes:
    """Just the fields open_disk() reads (erofs-tarindex.md §1.2, §1.4)."""
    image = bytearray(blocks * 512)
    struct.pack_into("<I", image, 1024, magic)
    image[1024 + 0x0C] = 9  # blkszbits
    struct.pack_into("<I", image, 1024 + 0x24, blocks)
    struct.pack_into("<I", image, 1024 + 0x50, incompat)
    struct.pack_into("<HH", image, 1024 + 0x56, extra_devices, 9)
    struct.pack_into("<II", image, 1152 + 64, slot_blocks, blocks if uniaddr is None else uniaddr)
    return bytes(image[:size] if size is not None else image)


def test_open_disk_concatenates_meta_and_layer() -> None:
    meta, layer = fake_meta(), _data(3 * 512, 9)
    disk = open_disk(MemorySource(meta), MemorySource(layer))
    assert disk.size == len(meta) + len(layer)
    assert disk.pread(disk.size, 0) == meta + layer
    assert disk.pread(100, len(meta) - 50) == (meta + layer)[len(meta) - 50:len(meta) + 50]


def test_open_disk_pads_to_whole_sectors() -> None:
    meta, layer = fake_meta(slot_blocks=2), _data(1000, 9)
    disk = open_disk(MemorySource(meta), MemorySource(layer))
    assert disk.size == len(meta) + 1024
    assert disk.pread(disk.size, 0) == meta + layer + bytes(24)


def test_open_disk_accepts_a_longer_layer() -> None:
    # Record padding after the end-of-archive marker is not counted by the slot.
    disk = open_disk(MemorySource(fake_meta(slot_blocks=3)), MemorySource(bytes(20 * 512)))
    assert disk.size == 24 * 512


@pytest.mark.parametrize(("meta", "layer_size", "message"), [
    (fake_meta(size=2000), 3 * 512, "not a multiple of 512"),
    (bytes(1024), 3 * 512, "too small for an EROFS superblock"),
    (fake_meta(magic=0x12345678), 3 * 512, "bad EROFS magic 0x12345678"),
    (fake_meta(incompat=0), 3 * 512, "no device table"),
    (fake_meta(extra_devices=2), 3 * 512, "2 extra devices"),
    (fake_meta(uniaddr=5), 3 * 512,
     "device table says the layer starts at block 5 but the meta is 4 blocks"),
    (fake_meta(slot_blocks=3), 2 * 512, "has 3 blocks .1536 bytes. but it is only 1024 bytes"),
], ids=["size", "tiny", "magic", "no-devtable", "two-devices", "uniaddr", "short-layer"])
def test_open_disk_rejects(meta: bytes, layer_size: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        open_disk(MemorySource(meta), MemorySource(bytes(layer_size)), name="m.erofs")


def test_open_disk_accepts_a_layer_missing_its_last_padding() -> None:
    # A tar truncated inside its last block still fits ceil(size / 512) blocks.
    disk = open_disk(MemorySource(fake_meta(slot_blocks=3)), MemorySource(bytes(1100)))
    assert disk.size == 4 * 512 + 1536


def test_open_disk_with_a_real_meta() -> None:
    writer = pytest.importorskip("hybrid_erofs.erofs.writer")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        payload = b"hello, world\n" * 100
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    layer = buf.getvalue()
    builder = writer.MetaBuilder(build_time=1_700_000_000)
    builder.feed(layer)
    meta = builder.finish()
    disk = open_disk(MemorySource(meta), MemorySource(layer))
    assert disk.pread(disk.size, 0) == meta + layer
    with pytest.raises(InvalidInput, match="device table says"):
        open_disk(MemorySource(meta + bytes(512)), MemorySource(layer))


def test_the_layer_bytes_sharing_the_metas_last_page_stay_once_read() -> None:
    """A 2 KiB meta: its page holds the first 2 KiB of layer data too; once read, that page
    reads without the layer source (a dead registry cannot break a metadata lookup)."""
    meta = fake_meta(blocks=4, slot_blocks=8)
    layer_bytes = _data(8 * 512, 7)
    layer = CountingSource(layer_bytes)
    disk = open_disk(MemorySource(meta), layer)
    page = meta + layer_bytes[: 4096 - len(meta)]
    assert disk.pread(4096, 0) == page
    assert layer.calls == [(4096 - len(meta), 0)]

    class Dead(CountingSource):
        def pread(self, length: int, offset: int) -> bytes:
            raise SourceIOError("dead")

    head = disk.parts[1]
    assert isinstance(head, PinnedHeadSource)
    head.inner = Dead(layer_bytes)
    assert disk.pread(4096, 0) == page  # the page again: no layer read
    assert disk.pread(100, 1000) == page[1000:1100]
    with pytest.raises(SourceIOError):
        disk.pread(1024, 4096)  # past the pinned bytes: the (dead) layer
