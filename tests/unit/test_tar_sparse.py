"""Sparse members: every format expands to the right bytes (holes read as zeros) through our
EROFS reader, chunks are laid out as cheaply as the format allows, and copies into the meta are
bounded. Go's and the tools' archives are checked through the kernel in
tests/integration/test_tar_sparse.py.
"""

from __future__ import annotations

import struct

import pytest

from hybrid_erofs.erofs.reader import ErofsImage
from hybrid_erofs.erofs.sparse import HOLE, MAX_COPY_PER_FILE, plan_sparse
from hybrid_erofs.erofs.writer import build_meta
from hybrid_erofs.errors import TarFormatError
from hybrid_erofs.source import MemorySource
from tests.conftest import _load_tool

tool = _load_tool("make_tar_corpus")
header, member, pax, END, BLOCK = tool.header, tool.member, tool.pax, tool.END, 512

SEGMENTS = ((1, 3), (700, 1), (4096, 5000), (65536 + 13, 8192), (300_000, 512))
SIZE = 400_001


def expanded(segments: tuple[tuple[int, int], ...], size: int) -> tuple[bytes, bytes]:
    """(the file, its stored data): segment i holds bytes of value i + 1."""
    body, stored = bytearray(size), bytearray()
    for index, (offset, length) in enumerate(segments):
        piece = bytes([index + 1]) * length
        body[offset:offset + length] = piece
        stored += piece
    return bytes(body), bytes(stored)


def read_back(data: bytes, path: str) -> bytes:
    meta = build_meta([data], build_time=0)
    image = ErofsImage(MemorySource(meta), flat=MemorySource(meta + data))
    inode = image.lookup(path)
    return image.read(inode, inode.size)


def _old_gnu(name: bytes, segments: tuple[tuple[int, int], ...], size: int,
             stored: bytes) -> bytes:
    block = bytearray(header(name, typeflag=b"S", size=len(stored), magic=b"ustar  \0"))
    entries = list(segments)
    for index, (offset, length) in enumerate(entries[:4]):
        block[386 + 24 * index:386 + 24 * index + 24] = b"%011o\0%011o\0" % (offset, length)
    block[482] = 1 if len(entries) > 4 else 0
    block[483:495] = b"%011o\0" % size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    out = bytes(block)
    rest = entries[4:]
    while rest:
        ext = bytearray(BLOCK)
        for index, (offset, length) in enumerate(rest[:21]):
            ext[24 * index:24 * index + 24] = b"%011o\0%011o\0" % (offset, length)
        rest = rest[21:]
        ext[504] = 1 if rest else 0
        out += bytes(ext)
    return out + stored + bytes(-len(stored) % BLOCK)


def _pax_0x(name: bytes, segments: tuple[tuple[int, int], ...], size: int, stored: bytes,
            minor: bytes) -> bytes:
    numbers = b",".join(b"%d,%d" % s for s in segments)
    records = [(b"GNU.sparse.major", b"0"), (b"GNU.sparse.minor", minor),
               (b"GNU.sparse.name", name), (b"GNU.sparse.size", b"%d" % size),
               (b"GNU.sparse.numblocks", b"%d" % len(segments))]
    if minor == b"1":
        records.append((b"GNU.sparse.map", numbers))
    else:
        for offset, length in segments:
            records += [(b"GNU.sparse.offset", b"%d" % offset),
                        (b"GNU.sparse.numbytes", b"%d" % length)]
    return pax(records) + member(b"GNUSparseFile.0/" + name, stored)


def _pax_10(name: bytes, segments: tuple[tuple[int, int], ...], size: int,
            stored: bytes) -> bytes:
    text = b"%d\n" % len(segments) + b"".join(b"%d\n%d\n" % s for s in segments)
    text += bytes(-len(text) % BLOCK)
    records = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
               (b"GNU.sparse.name", name), (b"GNU.sparse.realsize", b"%d" % size)]
    return pax(records) + member(b"GNUSparseFile.0/" + name, text + stored)


@pytest.mark.parametrize("fmt", ["gnu-S", "pax-0.0", "pax-0.1", "pax-1.0"])
def test_every_format_expands_to_the_right_bytes(fmt: str) -> None:
    body, stored = expanded(SEGMENTS, SIZE)
    entry = {"gnu-S": lambda: _old_gnu(b"f", SEGMENTS, SIZE, stored),
             "pax-0.0": lambda: _pax_0x(b"f", SEGMENTS, SIZE, stored, b"0"),
             "pax-0.1": lambda: _pax_0x(b"f", SEGMENTS, SIZE, stored, b"1"),
             "pax-1.0": lambda: _pax_10(b"f", SEGMENTS, SIZE, stored)}[fmt]()
    data = member(b"before", b"b") + entry + member(b"after", b"after\n") + END
    assert read_back(data, "/f") == body
    assert read_back(data, "/after") == b"after\n"


def test_many_segments_in_extension_headers() -> None:
    segments = tuple((i * 1024 + (i % 3), 1 + i % 5) for i in range(60))
    body, stored = expanded(segments, 61 * 1024)
    assert read_back(_old_gnu(b"many", segments, len(body), stored) + END, "/many") == body


def test_aligned_segments_point_into_the_tar_and_holes_are_null() -> None:
    layout = plan_sparse(1 << 20, 1024, ((0, 8192), (1 << 19, 8192)))
    assert layout.copies == () and layout.chunkbits == 13
    assert layout.entries[0] == 2 and layout.entries[1] == HOLE
    assert layout.entries[64] == 2 + 16 and layout.meta_bytes == 8 * 128


def test_the_layout_with_the_fewest_meta_bytes_wins() -> None:
    # 8 KiB chunks would need a 1 MiB index; 64 KiB chunks and two copied chunks cost 256 KiB.
    layout = plan_sparse(1 << 30, 1024, ((0, 8192), (1 << 29, 8192)))
    assert layout.chunkbits == 16 and len(layout.copies) == 2
    assert layout.meta_bytes == 8 * (1 << 14) + 2 * (1 << 16)


def test_unaligned_segments_are_copied_and_counted() -> None:
    layout = plan_sparse(SIZE, 1024, SEGMENTS)
    assert layout.copies and layout.meta_bytes == 8 * len(layout.entries) + sum(
        -(-c.length // 512) * 512 for c in layout.copies)
    assert all(entry == HOLE or entry != 0 for entry in layout.entries)


def test_a_60_gb_file_does_not_get_a_100_million_entry_index() -> None:
    segments = tuple((k * 10**10 - 100, 100) for k in range(1, 7))
    layout = plan_sparse(6 * 10**10, 2048, segments)
    assert layout.chunkbits == 18 and len(layout.entries) == 228_882
    assert layout.meta_bytes < 3_400_000


def test_copies_past_the_bound_are_refused_naming_the_file() -> None:
    # 4 KiB segments one byte off block alignment, 8 KiB apart: every chunk is copied.
    segments = tuple((i * 8192 + 1, 4096) for i in range(1200))
    size = 1200 * 8192
    records = [(b"GNU.sparse.major", b"0"), (b"GNU.sparse.minor", b"1"),
               (b"GNU.sparse.name", b"speckled"), (b"GNU.sparse.size", b"%d" % size),
               (b"GNU.sparse.numblocks", b"%d" % len(segments)),
               (b"GNU.sparse.map", b",".join(b"%d,%d" % s for s in segments))]
    data = pax(records) + header(b"x", size=4096 * len(segments))
    with pytest.raises(TarFormatError) as info:
        build_meta([data + bytes(4096 * len(segments)) + END])
    message = str(info.value)
    assert "speckled" in message and "copied into the meta" in message
    assert str(MAX_COPY_PER_FILE) in message and "\n" not in message


@pytest.mark.parametrize(("records", "words"), ids=["past-size", "overlap", "short-data",
                                                    "bad-map"], argvalues=[
    ([(b"GNU.sparse.map", b"10,5"), (b"GNU.sparse.numblocks", b"1"),
      (b"GNU.sparse.size", b"12")], ["invalid sparse map entry"]),
    ([(b"GNU.sparse.map", b"0,3,2,2"), (b"GNU.sparse.numblocks", b"2"),
      (b"GNU.sparse.size", b"12")], ["invalid sparse map entry"]),
    ([(b"GNU.sparse.map", b"0,9"), (b"GNU.sparse.numblocks", b"1"),
      (b"GNU.sparse.size", b"12")], ["names 9 bytes", "stores 5"]),
    ([(b"GNU.sparse.map", b"0,x"), (b"GNU.sparse.numblocks", b"1")], ["GNU.sparse.map"]),
])
def test_bad_sparse_maps_are_refused_like_go(records: list[tuple[bytes, bytes]],
                                             words: list[str]) -> None:
    data = pax([*records, (b"path", b"sp")]) + member(b"x", b"12345") + END
    with pytest.raises(TarFormatError) as info:
        build_meta([data])
    for word in words:
        assert word in str(info.value)
    assert "sp" in str(info.value)


def test_sparse_chunk_index_entries() -> None:
    body, stored = expanded(((0, 512), (4096, 512)), 8192)
    data = _pax_0x(b"f", ((0, 512), (4096, 512)), 8192, stored, b"1") + END
    meta = build_meta([data], build_time=0)
    image = ErofsImage(MemorySource(meta), flat=MemorySource(meta + data))
    inode = image.lookup("/f")
    extents = list(image.extents(inode))
    assert [(e.offset, e.device) for e in extents if e.device is not None][:1] == [(0, 1)]
    assert any(e.device is None for e in extents)
    assert image.read(inode, 8192) == body
    assert struct.calcsize("<HHI") == 8


def test_verify_reads_what_sparse_files_store_without_problems() -> None:
    from hybrid_erofs.erofs.verify import verify_image

    body, stored = expanded(SEGMENTS, SIZE)
    data = (_pax_10(b"f", SEGMENTS, SIZE, stored) + _old_gnu(b"g", SEGMENTS, SIZE, stored)
            + member(b"plain", b"p\n") + END)
    meta = build_meta([data], build_time=0)
    image = ErofsImage(MemorySource(meta), flat=MemorySource(meta + data))
    report = verify_image(image, read_data=True)
    assert report.ok and report.problems == () and report.files == 3
    assert report.bytes_read < 2 * SIZE
