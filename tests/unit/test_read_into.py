"""read_into through a mount's device stack (meter, gate, concat, pinned head, stored layer,
GzipSource): the exporter's buffer gets exactly the bytes pread gives, or the read raises;
file ranges pass the gate only while it is open."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.source import FileRanged, MemorySource, read_into
from hybrid_erofs.sources.concat import ConcatSource, PinnedHeadSource, ZeroSource
from hybrid_erofs.sources.gate import GateSource
from hybrid_erofs.sources.layerstore import LayerStore
from hybrid_erofs.sources.metered import MeteredSource
from hybrid_erofs.sources.stored import StoredLayerSource

from ..doubles import CountingSource
from .test_gzip_source import BLOB, DATA, INDEX

STARTS = [cp.out_offset for cp in INDEX.checkpoints]
META = bytes(range(256)) * 16 + b"m" * 512  # stands for the meta image: 4608 bytes


def _stack(tmp_path: Path) -> tuple[MeteredSource, GateSource, StoredLayerSource, bytes]:
    stored = StoredLayerSource(GzipSource(CountingSource(BLOB), INDEX, size=len(DATA),
                                          decode_ahead=2),
                               LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    head = -len(META) % 4096
    disk = ConcatSource([MemorySource(META), PinnedHeadSource(stored, head), ZeroSource(300)])
    gate = GateSource(disk)
    return MeteredSource(gate), gate, stored, META + DATA + bytes(300)


def _into(source: MeteredSource, length: int, offset: int) -> bytes:
    buffer = bytearray(b"\x5a") * length
    read_into(source, memoryview(buffer), offset)
    return bytes(buffer)


def test_read_into_gives_the_bytes_pread_gives_through_the_whole_stack(tmp_path: Path) -> None:
    top, _, stored, device = _stack(tmp_path)
    rng = random.Random(3)
    stored.inner.load_span(3)  # some spans come from the store, the others are decoded
    stored.inner.load_span(7)
    points = [0, len(META) - 1, len(META), len(META) + STARTS[3] - 5, len(device) - 301,
              *(rng.randrange(len(device)) for _ in range(150))]
    served = 0
    for offset in points:
        for length in (1, 4096, rng.randrange(1, 1 << 20)):
            length = min(length, len(device) - offset)
            assert _into(top, length, offset) == device[offset : offset + length], (offset,
                                                                                   length)
            served += length
    assert top.stats.bytes_served == served and top.stats.errors == 0
    assert _into(top, len(device), 0) == device  # every part at once
    top.close()


def test_the_gate_passes_file_ranges_on_while_open_and_refuses_them_once_closed(
        tmp_path: Path) -> None:
    top, gate, stored, device = _stack(tmp_path)
    assert isinstance(gate, FileRanged)
    stored.inner.load_span(2)
    offset = len(META) + STARTS[2]
    where = top.file_range(100, offset)
    assert where is not None and os.pread(where[0], 100, where[1]) == device[offset:offset + 100]
    assert top.file_range(100, len(META) + STARTS[5]) is None  # not stored: read instead
    gate.close_gate("the index does not describe the layer")
    with pytest.raises(SourceIOError, match="reads refused"):
        top.file_range(100, offset)
    with pytest.raises(SourceIOError, match="reads refused"):
        _into(top, 100, offset)
    assert top.stats.errors == 2  # both answered with EIO, both counted
    top.close()


def test_a_stored_span_cut_behind_our_back_is_decoded_again(tmp_path: Path) -> None:
    top, _, stored, device = _stack(tmp_path)
    stored.inner.load_span(1)
    os.ftruncate(stored.store.fd, 0)
    offset = len(META) + STARTS[1]
    assert _into(top, 5000, offset) == device[offset : offset + 5000]
    top.close()


def test_a_failing_decode_raises_and_the_buffer_is_not_handed_on(tmp_path: Path) -> None:
    broken = bytearray(BLOB)
    cp = INDEX.checkpoints[4]
    broken[cp.in_offset + 100 : cp.in_offset + 400] = bytes(300)
    stored = StoredLayerSource(GzipSource(MemorySource(bytes(broken)), INDEX, size=len(DATA)),
                               LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    top = MeteredSource(GateSource(stored))
    with pytest.raises(SourceIOError, match="gzip blob"):
        _into(top, STARTS[5] - STARTS[4], STARTS[4])
    assert top.stats.errors == 1 and top.stats.bytes_served == 0
    assert _into(top, 4096, STARTS[1]) == DATA[STARTS[1] : STARTS[1] + 4096]
    top.close()
