"""_Pieces, a span's decoded bytes as the decoder's outputs: copies and cuts against bytes."""

from __future__ import annotations

import random

import pytest

from hybrid_erofs.gzindex.source import _Pieces


def _pieces(rng: random.Random) -> tuple[_Pieces, bytes]:
    pieces, whole = _Pieces(), bytearray()
    for _ in range(rng.randrange(1, 12)):
        part = rng.randbytes(rng.choice([0, 1, 2, 100, 4096, 70000]))
        pieces.append(part if rng.random() < 0.5 else memoryview(part))
        whole += part
    return pieces, bytes(whole)


def test_copy_and_cut_give_the_bytes_a_bytearray_would() -> None:
    rng = random.Random(1)
    for _ in range(300):
        pieces, whole = _pieces(rng)
        assert len(pieces) == len(whole)
        for _ in range(20):
            start = rng.randrange(len(whole) + 1)
            length = rng.randrange(len(whole) - start + 1)
            got = pieces.copy(start, length)
            assert type(got) is bytes and got == whole[start : start + length]
        size = rng.randrange(len(whole) + 2)
        assert pieces.cut(size) == whole[size:]
        whole = whole[:size]
        assert len(pieces) == len(whole) and b"".join(pieces.buffers()) == whole
        extra = rng.randbytes(rng.randrange(3))
        pieces.append(extra)  # a span goes on after a cut only in _finish's successor; any order works
        whole += extra
        assert pieces.copy(0, len(whole)) == whole


def test_copy_outside_the_decoded_bytes_is_a_bug_not_short_data() -> None:
    pieces = _Pieces()
    pieces.append(b"abc")
    with pytest.raises(ValueError):
        pieces.copy(2, 2)
    with pytest.raises(ValueError):
        pieces.copy(-1, 1)
    pieces.clear()
    assert len(pieces) == 0 and pieces.copy(0, 0) == b"" and pieces.cut(0) == b""
