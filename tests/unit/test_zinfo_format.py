"""zinfo v1/v2 parsing, validation messages, and v2 writing."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hybrid_erofs.errors import IndexFormatError
from hybrid_erofs.gzindex.format import (
    RECORD_SIZE,
    WINDOW_SIZE,
    Checkpoint,
    GzipIndex,
    dump_index,
    load_index,
    parse_index,
    write_index,
)

W1 = bytes(range(256)) * (WINDOW_SIZE // 256)


def _index(*tuples: tuple[int, int, int]) -> GzipIndex:
    return GzipIndex(span=1 << 20, checkpoints=tuple(
        Checkpoint(i, o, b, bytes(WINDOW_SIZE) if n == 0 else W1) for n, (i, o, b) in enumerate(tuples)))


def _raw(count: int, records: list[tuple[int, int, int]], span: int = 1 << 20) -> bytes:
    body = b"".join(struct.pack("<QQB", *r) + W1 for r in records)
    return struct.pack("<IQ", count, span) + body


def test_v2_round_trip() -> None:
    index = _index((10, 0, 0), (5000, 1 << 21, 3), (9000, 1 << 22, 0))
    data = dump_index(index)
    assert len(data) == 12 + 3 * RECORD_SIZE
    again = parse_index(data)
    assert again == index
    assert again.version == 2


def test_v1_is_detected_by_length_and_gets_the_implied_first_checkpoint() -> None:
    data = _raw(3, [(5000, 1 << 21, 3), (9000, 1 << 22, 0)])
    index = parse_index(data)
    assert index.version == 1
    assert [(c.in_offset, c.out_offset, c.bits) for c in index.checkpoints] == [
        (10, 0, 0), (5000, 1 << 21, 3), (9000, 1 << 22, 0)]
    assert index.checkpoints[0].window == bytes(WINDOW_SIZE)
    # Written back as v2 (every checkpoint stored).
    assert parse_index(dump_index(index)).version == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated zinfo: 0 bytes"),
        (b"\x01\x00\x00", "truncated zinfo: 3 bytes"),
        (_raw(2, [(10, 0, 0), (20, 30, 1)])[:-5], "truncated zinfo"),
        (_raw(5, [(10, 0, 0), (20, 30, 1)]), "header says 5 checkpoints"),
        (_raw(0, []), "no checkpoints"),
        (_raw(2, [(10, 5, 0), (20, 30, 1)]), "first checkpoint is at uncompressed offset 5"),
        (_raw(2, [(10, 0, 0), (20, 30, 9)]), "checkpoint 1: bits is 9, at most 7"),
        (_raw(3, [(10, 0, 0), (200, 30, 1), (100, 60, 0)]), "compressed offset does not increase (200 -> 100)"),
        (_raw(3, [(10, 0, 0), (200, 90, 1), (300, 60, 0)]), "uncompressed offset does not increase (90 -> 60)"),
    ],
    ids=["empty", "short-header", "truncated-record", "count-mismatch", "zero-count",
         "first-not-zero", "bits", "in-backwards", "out-backwards"],
)
def test_bad_files_give_one_line_errors_naming_the_file(data: bytes, message: str) -> None:
    with pytest.raises(IndexFormatError) as info:
        parse_index(data, name="bad.zinfo")
    text = str(info.value)
    assert text.startswith("bad.zinfo: ")
    assert message in text
    assert "\n" not in text


def test_checkpoint_past_the_blob_is_refused() -> None:
    data = dump_index(_index((10, 0, 0), (5000, 1 << 21, 3)))
    parse_index(data, blob_size=5001, layer_size=(1 << 21) + 1)
    with pytest.raises(IndexFormatError, match="compressed offset 5000 is past the end of the 5000-byte blob"):
        parse_index(data, name="z", blob_size=5000)
    with pytest.raises(IndexFormatError, match=r"uncompressed offset 2097152 is past the end of the "
                                               r"2097152 bytes of layer data"):
        parse_index(data, name="z", layer_size=1 << 21)


@pytest.mark.parametrize("second", [(5000, 0, 0), (10, 1 << 21, 0)], ids=["same-out", "same-in"])
def test_checkpoints_must_strictly_increase(second: tuple[int, int, int]) -> None:
    # Issue 14, item 1: a second checkpoint at uncompressed offset 0 made reads at offset 0
    # decode from the middle of the stream.
    with pytest.raises(IndexFormatError, match="does not increase"):
        parse_index(dump_index(_index((10, 0, 0), second)), name="z")


def test_load_and_write(tmp_path: Path) -> None:
    index = _index((10, 0, 0), (5000, 1 << 21, 3))
    path = tmp_path / "l.zinfo"
    write_index(index, path)
    assert load_index(path) == index
    assert [p.name for p in tmp_path.iterdir()] == ["l.zinfo"]  # no temp files left
    with pytest.raises(IndexFormatError, match="no such file"):
        load_index(tmp_path / "missing.zinfo")
    with pytest.raises(IndexFormatError, match="is a directory"):
        load_index(tmp_path)


def test_find_picks_the_last_checkpoint_at_or_before() -> None:
    index = _index((10, 0, 0), (50, 100, 0), (90, 200, 0))
    assert [index.find(o) for o in (0, 99, 100, 150, 199, 200, 10**9)] == [0, 0, 1, 1, 1, 2, 2]
