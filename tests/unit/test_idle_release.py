"""An idle layer gives its memory back (mounting/lifecycle.IdleRelease, the stages'
`release_memory`): decoded spans and verified spans are dropped, what a read holds stays,
and reads after it return the same bytes, decoded and checked again."""

from __future__ import annotations

import contextlib
import gzip
import io
import logging

import pytest

from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.mounting.lifecycle import IdleRelease
from hybrid_erofs.source import ByteSource, Releasing, read_into
from hybrid_erofs.sources.metered import MeteredSource
from hybrid_erofs.sources.verify import VerifiedSource

from ..doubles import CountingSource
from .test_gzip_source import mixed

DATA = mixed(7, 3 << 20)
BLOB = gzip.compress(DATA, compresslevel=6, mtime=0)
SPAN = 256 << 10


def _gauge(source: object, name: str) -> int:
    return int(next(s.value for s in source.metric_samples()  # type: ignore[attr-defined]
                    if s.name == name))


def _stack() -> tuple[MeteredSource, GzipSource, VerifiedSource, CountingSource]:
    """Metered -> GzipSource -> VerifiedSource -> the blob, as a mount stacks them."""
    built = build_index(io.BytesIO(BLOB), span=SPAN)
    blob = CountingSource(BLOB)
    verified = VerifiedSource(blob, built.span_digests, name="blob")
    layer = GzipSource(verified, built.index, size=len(DATA))
    return MeteredSource(layer), layer, verified, blob


def _read_all(source: ByteSource) -> None:
    for offset in range(0, len(DATA), 1 << 20):
        length = min(1 << 20, len(DATA) - offset)
        buffer = bytearray(length)
        read_into(source, memoryview(buffer), offset)
        assert buffer == DATA[offset : offset + length]


def test_the_stages_that_keep_memory_are_releasing() -> None:
    top, layer, verified, _ = _stack()
    with contextlib.closing(top):
        assert isinstance(layer, Releasing) and isinstance(verified, Releasing)
        assert not isinstance(top, Releasing)


def test_decoded_spans_go_but_the_one_being_read_stays() -> None:
    top, layer, _, _ = _stack()
    with contextlib.closing(top):
        _read_all(top)
        held = _gauge(layer, "decoded_cache_bytes")
        assert held > 0 and len(layer._spans) > 2
        busy = next(iter(layer._spans.values()))  # as if a read were inside it right now
        with busy.lock:
            dropped = layer.release_memory()
        assert list(layer._spans.values()) == [busy]
        assert dropped == held - busy.accounted
        assert _gauge(layer, "decoded_cache_bytes") == busy.accounted
        decoded = layer.spans_decoded
        _read_all(top)  # the same bytes, decoded again from the checkpoints
        assert layer.spans_decoded > decoded
        assert layer.release_memory() > 0
        assert _gauge(layer, "decoded_cache_bytes") == 0 and not layer._spans
        assert layer.release_memory() == 0


def test_verified_spans_go_and_are_fetched_and_checked_again() -> None:
    top, layer, verified, blob = _stack()
    with contextlib.closing(top):
        _read_all(top)
        held = _gauge(verified, "verified_cache_bytes")
        assert held > 0
        assert verified.release_memory() == held
        assert _gauge(verified, "verified_cache_bytes") == 0
        layer.release_memory()
        fetches, checked = len(blob.calls), verified.verified_spans
        _read_all(top)
        assert len(blob.calls) > fetches and verified.verified_spans > checked


def test_a_layer_idle_for_the_period_is_released_and_a_read_starts_the_wait_again(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    idle = IdleRelease(idle_s=60, clock=lambda: now[0])
    top, layer, verified, _ = _stack()
    with contextlib.closing(top):
        layers: list[tuple[str, ByteSource]] = [("sha256:abc", top)]
        _read_all(top)
        assert idle.tick(layers) == 0  # first look: reads seen now
        now[0] += 59
        assert idle.tick(layers) == 0
        assert _gauge(layer, "decoded_cache_bytes") > 0
        now[0] += 2
        with caplog.at_level(logging.INFO, logger="hybrid_erofs.mounting.lifecycle"):
            released = idle.tick(layers)
            assert released > 0
            assert _gauge(layer, "decoded_cache_bytes") == 0
            assert _gauge(verified, "verified_cache_bytes") == 0
            _read_all(top)  # a read: the idle wait starts again
            assert idle.tick(layers) == 0
            now[0] += 30
            assert idle.tick(layers) == 0
            assert _gauge(layer, "decoded_cache_bytes") > 0
            now[0] += 31
            assert idle.tick(layers) > 0
            now[0] += 2
            layer.load_span(0)  # a background fetch filled the cache while idle
            assert idle.tick(layers) > 0
        lines = [r.getMessage() for r in caplog.records if "no reads for" in r.getMessage()]
        assert len(lines) == 2  # once per idle spell, not at every tick
        assert lines[0].startswith("sha256:abc: no reads for 1m") and "released" in lines[0]


def test_two_layers_of_one_blob_are_watched_each_on_its_own() -> None:
    """An image may hold the same blob twice (same name): a read of one does not keep the
    other from being released."""
    now = [0.0]
    idle = IdleRelease(idle_s=60, clock=lambda: now[0])
    first, first_layer, _, _ = _stack()
    second, second_layer, _, _ = _stack()
    with contextlib.closing(first), contextlib.closing(second):
        layers: list[tuple[str, ByteSource]] = [("sha256:abc", first), ("sha256:abc", second)]
        _read_all(first)
        _read_all(second)
        idle.tick(layers)
        for _ in range(4):
            now[0] += 20
            first.pread(1, 0)  # the first layer stays busy
            idle.tick(layers)
        assert _gauge(first_layer, "decoded_cache_bytes") > 0
        assert _gauge(second_layer, "decoded_cache_bytes") == 0
