"""Decode-ahead in GzipSource, the LayerStore of decoded spans and StoredLayerSource above it."""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.source import FileRanged, MemorySource
from hybrid_erofs.sources.layerstore import LayerStore
from hybrid_erofs.sources.stored import StoredLayerSource

from ..doubles import CountingSource
from .test_gzip_source import BLOB, DATA, INDEX, check_random_reads

STARTS = [cp.out_offset for cp in INDEX.checkpoints]


def _span(number: int) -> bytes:
    end = STARTS[number + 1] if number + 1 < len(STARTS) else len(DATA)
    return DATA[STARTS[number] : end]


def _wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_decode_ahead_decodes_the_next_spans_of_a_forward_reader() -> None:
    done: list[int] = []
    lock = threading.Lock()
    source = GzipSource(MemorySource(BLOB), INDEX, size=len(DATA), decode_ahead=2,
                        decode_workers=2)

    def record(number: int, data: Sequence[memoryview]) -> None:
        assert b"".join(data) == _span(number)
        with lock:
            done.append(number)

    source.on_span = record
    assert len(STARTS) >= 6
    assert source.pread(4096, 0) == DATA[:4096]
    assert source.pread(4096, 4096) == DATA[4096:8192]  # forward: spans 1 and 2 go ahead
    _wait_for(lambda: {1, 2} <= set(done))
    assert 3 not in done  # only `decode_ahead` spans beyond the reader
    check_random_reads(source, DATA, INDEX, count=60)
    source.close()


def test_decode_ahead_leaves_random_readers_alone() -> None:
    inner = CountingSource(BLOB)
    source = GzipSource(inner, INDEX, size=len(DATA), decode_ahead=3)
    source.pread(100, STARTS[4] + 10)
    source.pread(100, STARTS[1] + 10)  # backwards: no decode-ahead
    source.close()
    fetched = {offset for _, offset in inner.calls}
    assert all(offset < INDEX.checkpoints[5].in_offset for offset in fetched)


def test_decode_ahead_failure_is_met_by_the_reader_who_needs_the_span() -> None:
    broken = bytearray(BLOB)
    cp = INDEX.checkpoints[2]
    broken[cp.in_offset + 100 : cp.in_offset + 400] = bytes(300)
    source = GzipSource(MemorySource(bytes(broken)), INDEX, size=len(DATA), decode_ahead=2)
    source.pread(10, 0)
    source.pread(10, 20)
    with pytest.raises(OSError):
        source.pread(STARTS[3] - STARTS[2], STARTS[2])
    assert source.pread(10, STARTS[1]) == DATA[STARTS[1] : STARTS[1] + 10]
    source.close()


def test_layer_store_serves_spans_after_put_and_persists_them_after_flush(tmp_path: Path) -> None:
    store = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    assert not store.has(1, 0) and store.has(0, 0)
    store.put(1, _span(1))
    assert store.has(len(_span(1)), STARTS[1]) and not store.has(2, STARTS[1] - 1)
    assert os.pread(store.fd, 100, STARTS[1]) == _span(1)[:100]
    other = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    assert not other.has_span(1)  # not durable yet: another process does not trust it
    store.flush()
    again = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    assert again.has_span(1) and again.spans_present() == 1
    other.put(3, _span(3))
    other.flush()  # merges: 1 (from the record) and 3
    assert other.has_span(1) and other.has_span(3)
    for s in (store, other, again):
        s.close()
    assert LayerStore(tmp_path, size=len(DATA), starts=STARTS).spans_present() == 2


def test_layer_store_of_another_geometry_starts_empty(tmp_path: Path) -> None:
    store = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    store.put(0, _span(0))
    store.close()
    other = LayerStore(tmp_path, size=len(DATA), starts=STARTS[:1] + STARTS[2:])
    assert other.spans_present() == 0
    other.close()


def test_layer_store_writes_a_span_given_in_pieces_even_when_pwritev_writes_less(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GzipSource hands a span over as the decoder's outputs: they land in order, all of
    them, however little each pwritev writes."""
    real = os.pwritev
    calls: list[int] = []

    def short_pwritev(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        calls.append(len(buffers))
        first = memoryview(buffers[0])
        return real(fd, [first[: max(1, len(first) // 3)]], offset)

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    store = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    span = _span(1)
    cuts = [0, 1, 1, 700, len(span) // 2, len(span) - 1, len(span)]
    store.put(1, [memoryview(span)[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])
    assert os.pread(store.fd, len(span), STARTS[1]) == span
    assert len(calls) > 6 and store.has_span(1)
    with pytest.raises(ValueError, match="span 2 has"):
        store.put(2, [_span(2), b"x"])
    store.close()


def test_layer_store_refuses_a_span_of_the_wrong_length(tmp_path: Path) -> None:
    store = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    with pytest.raises(ValueError, match="span 0 has"):
        store.put(0, b"short")
    store.close()


def test_layer_store_verified_flag_needs_every_span(tmp_path: Path) -> None:
    store = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    for number in range(len(STARTS)):
        store.put(number, _span(number))
    assert store.complete
    store.mark_verified()
    store.close()
    again = LayerStore(tmp_path, size=len(DATA), starts=STARTS)
    assert again.complete and again.verified
    assert os.pread(again.fd, len(DATA), 0) == DATA
    again.close()


def test_stored_layer_source_keeps_decoded_spans_and_serves_them_from_disk(
        tmp_path: Path) -> None:
    inner = CountingSource(BLOB)
    source = StoredLayerSource(GzipSource(inner, INDEX, size=len(DATA)),
                               LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    assert isinstance(source, FileRanged)
    assert source.file_range(10, 0) is None
    check_random_reads(source, DATA, INDEX, count=30)  # type: ignore[arg-type]
    for number in range(len(STARTS)):
        source.inner.load_span(number)
    assert source.store.complete
    where = source.file_range(1000, 5000)
    assert where is not None and os.pread(where[0], 1000, where[1]) == DATA[5000:6000]
    source.close()
    cold = CountingSource(BLOB)
    again = StoredLayerSource(GzipSource(cold, INDEX, size=len(DATA)),
                              LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    assert again.pread(len(DATA), 0) == DATA
    assert cold.calls == []  # every byte from the store, nothing fetched or decoded
    again.close()


def test_stored_layer_source_without_store_reads_stores_nothing_and_serves_what_is_stored(
        tmp_path: Path) -> None:
    """store_reads off (a mount without background fetch): decoded spans stay in memory
    only, the store's file gets no block; spans stored before are still served from it."""
    lazy = StoredLayerSource(GzipSource(CountingSource(BLOB), INDEX, size=len(DATA)),
                             LayerStore(tmp_path, size=len(DATA), starts=STARTS),
                             store_reads=False)
    assert lazy.pread(len(DATA), 0) == DATA
    assert lazy.store.spans_present() == 0 and os.fstat(lazy.store.fd).st_blocks == 0
    lazy.close()
    warm = StoredLayerSource(GzipSource(CountingSource(BLOB), INDEX, size=len(DATA)),
                             LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    warm.inner.load_span(1)  # stored (store_reads on by default)
    warm.close()
    inner = CountingSource(BLOB)
    again = StoredLayerSource(GzipSource(inner, INDEX, size=len(DATA)),
                              LayerStore(tmp_path, size=len(DATA), starts=STARTS),
                              store_reads=False)
    length, offset = again.store.span_range(1)
    assert again.file_range(length, offset) is not None
    assert again.pread(length, offset) == DATA[offset : offset + length] and inner.calls == []
    assert again.pread(len(DATA), 0) == DATA  # every span decoded, none stored
    assert again.store.spans_present() == 1
    again.close()


def test_stored_layer_source_refuses_a_store_of_another_layer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        StoredLayerSource(GzipSource(MemorySource(BLOB), INDEX, size=len(DATA)),
                          LayerStore(tmp_path, size=len(DATA) + 1, starts=STARTS))


def test_load_span_checks_its_argument() -> None:
    source = GzipSource(MemorySource(gzip.compress(b"x" * 100)), INDEX, size=len(DATA))
    with pytest.raises(ValueError, match="outside"):
        source.load_span(len(STARTS))


def test_file_ranges_pass_through_the_meter(tmp_path: Path) -> None:
    from hybrid_erofs.sources.metered import MeteredSource

    stored = StoredLayerSource(GzipSource(MemorySource(BLOB), INDEX, size=len(DATA)),
                               LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    top = MeteredSource(stored)
    assert top.file_range(100, STARTS[2]) is None  # not stored yet
    stored.inner.load_span(2)
    where = top.file_range(100, STARTS[2])
    assert where is not None and os.pread(where[0], 100, where[1]) == _span(2)[:100]
    assert (top.stats.reads, top.stats.bytes_served) == (1, 100)
    assert stored.spans_read() == [2]  # what a profile records
    assert stored.metric_samples() == []  # no background fetch attached
    top.close()


def test_mount_options_cannot_carry_a_comma() -> None:
    from hybrid_erofs.mounting.kernel import KernelMountError, mount_erofs

    with pytest.raises(KernelMountError, match="a device path with a comma"):
        mount_erofs("/nonexistent/meta", "/nonexistent/mnt", extra_device="/a,b/layer")


def test_a_stored_span_leaves_memory_and_reads_around_it_mix_store_and_decode(
        tmp_path: Path) -> None:
    """A span the store took is served from it, not kept in GzipSource's memory as well (it
    was never read from there again); reads across stored and decoded spans get each part
    from where it is."""
    inner = CountingSource(BLOB)
    gzip_source = GzipSource(inner, INDEX, size=len(DATA))
    source = StoredLayerSource(gzip_source, LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    gzip_source.load_span(2)
    assert source.store.serves(2) and 2 not in gzip_source._spans
    assert gzip_source._cached == sum(s.accounted for s in gzip_source._spans.values())
    fetched = len(inner.calls)
    across = STARTS[3] - STARTS[2] + 2000
    assert source.pread(across, STARTS[2] - 1000) == DATA[STARTS[2] - 1000 : STARTS[3] + 1000]
    assert inner.calls[fetched:] and all(offset < INDEX.checkpoints[2].in_offset
                                         or offset >= INDEX.checkpoints[3].in_offset - 1
                                         for _, offset in inner.calls[fetched:])
    source.close()
    lazy = StoredLayerSource(GzipSource(MemorySource(BLOB), INDEX, size=len(DATA)),
                             LayerStore(tmp_path / "lazy", size=len(DATA), starts=STARTS),
                             store_reads=False)
    lazy.inner.load_span(2)
    assert not lazy.store.serves(2) and lazy.inner._spans[2].complete  # kept in memory
    lazy.close()


def test_reads_served_from_the_store_fetch_nothing_and_keep_the_readers_run(
        tmp_path: Path) -> None:
    """Reads answered from stored spans start no ahead-work (they fetch nothing: a container
    served from its profile's spans makes no request), but they continue the reader's forward
    run: its first read of a span not stored decodes the next ones ahead at once, instead of
    waiting for another read to find the run again."""
    inner = CountingSource(BLOB)
    gzip_source = GzipSource(inner, INDEX, size=len(DATA), decode_ahead=2)
    done: list[int] = []
    source = StoredLayerSource(gzip_source, LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    for number in (1, 2, 3):
        gzip_source.load_span(number)
    keep = source._keep

    def record(number: int, data: Sequence[memoryview]) -> bool:
        done.append(number)
        return keep(number, data)

    gzip_source.on_span = record
    calls = len(inner.calls)
    step = 64 << 10
    offset = STARTS[1]
    while offset < STARTS[4]:  # stored spans, then the first read of span 4
        length = min(step, STARTS[4] - offset)
        assert source.pread(length, offset) == DATA[offset : offset + length]
        offset += length
    time.sleep(0.2)
    assert done == [] and len(inner.calls) == calls  # nothing fetched, nothing decoded
    assert source.pread(step, STARTS[4]) == DATA[STARTS[4] : STARTS[4] + step]
    _wait_for(lambda: {5, 6} <= set(done))
    assert not {1, 2, 3} & set(done)
    source.close()


def test_load_span_of_a_span_stored_meanwhile_fetches_and_decodes_nothing(
        tmp_path: Path) -> None:
    """The background fetcher picked span 2 while a reader's decode stored it: loading it
    then reads nothing more of the blob (the stored span is not in memory to find)."""
    inner = CountingSource(BLOB)
    gzip_source = GzipSource(inner, INDEX, size=len(DATA))
    source = StoredLayerSource(gzip_source, LayerStore(tmp_path, size=len(DATA), starts=STARTS))
    length = STARTS[3] - STARTS[2]
    assert source.pread(length, STARTS[2]) == DATA[STARTS[2] : STARTS[3]]
    assert source.store.serves(2)
    calls, decoded = len(inner.calls), gzip_source.spans_decoded
    gzip_source.load_span(2)
    assert len(inner.calls) == calls and gzip_source.spans_decoded == decoded
    source.close()
