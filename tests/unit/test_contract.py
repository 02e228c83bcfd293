"""The ByteSource contract, once for every source (fsspec-style): add a factory to SOURCES.

Exact bytes, ValueError outside the source, empty reads, `size` fixed, close() closes `inner`.
"""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.source import ByteSource, FileSource, MemorySource
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from hybrid_erofs.sources.layerstore import LayerStore
from hybrid_erofs.sources.stored import StoredLayerSource
from tests.doubles import CountingSource

DATA = random.Random(2024).randbytes(3 * 65536 + 777)


@dataclass
class Case:
    """A source under test over DATA, and the inner source it owns (None for a leaf)."""

    source: ByteSource
    inner: CountingSource | None = None


def _memory(data: bytes, tmp_path: Path) -> Case:
    return Case(MemorySource(data))


def _file(data: bytes, tmp_path: Path) -> Case:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return Case(FileSource(path))


def _chunkcache(data: bytes, tmp_path: Path) -> Case:
    inner = CountingSource(data)
    return Case(ChunkCacheSource(inner, key="sha256:" + "c0" * 32, cache_dir=tmp_path / "cache",
                                 chunk_size=65536, readahead=2), inner)


def _gzip(data: bytes, tmp_path: Path) -> tuple[GzipSource, CountingSource]:
    blob = gzip.compress(data)
    inner = CountingSource(blob)
    index = build_index(io.BytesIO(blob), span=32768).index  # type: ignore[arg-type]
    return GzipSource(inner, index, size=len(data), decode_ahead=2), inner


def _gzip_ahead(data: bytes, tmp_path: Path) -> Case:
    return Case(*_gzip(data, tmp_path))


def _stored(data: bytes, tmp_path: Path) -> Case:
    layer, inner = _gzip(data, tmp_path)
    starts = [cp.out_offset for cp in layer.index.checkpoints]
    return Case(StoredLayerSource(layer, LayerStore(tmp_path / "store", size=len(data),
                                                    starts=starts)), inner)


SOURCES: dict[str, Callable[[bytes, Path], Case]] = {
    "memory": _memory,
    "file": _file,
    "chunkcache": _chunkcache,
    "gzip-decode-ahead": _gzip_ahead,
    "stored-layer": _stored,
}


@pytest.fixture(params=sorted(SOURCES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    made = SOURCES[request.param](DATA, tmp_path)
    yield made
    made.source.close()


def test_is_a_byte_source(case: Case) -> None:
    assert isinstance(case.source, ByteSource)
    assert case.source.size == len(DATA)


def test_random_reads_return_exact_bytes(case: Case) -> None:
    rng = random.Random(5)
    for _ in range(200):
        offset = rng.randrange(len(DATA) + 1)
        length = rng.randrange(len(DATA) - offset + 1)
        assert case.source.pread(length, offset) == DATA[offset : offset + length]


def test_whole_and_edges(case: Case) -> None:
    assert case.source.pread(len(DATA), 0) == DATA
    assert case.source.pread(1, len(DATA) - 1) == DATA[-1:]
    assert case.source.pread(1, 0) == DATA[:1]


@pytest.mark.parametrize("offset", [0, 1000, len(DATA)])
def test_zero_length_reads(case: Case, offset: int) -> None:
    assert case.source.pread(0, offset) == b""


@pytest.mark.parametrize(("length", "offset"), [
    (1, len(DATA)), (2, len(DATA) - 1), (0, len(DATA) + 1), (1, -1), (-1, 0), (len(DATA) + 1, 0),
])
def test_out_of_range_is_value_error(case: Case, length: int, offset: int) -> None:
    with pytest.raises(ValueError):
        case.source.pread(length, offset)


def test_close_closes_inner_and_is_idempotent(case: Case) -> None:
    case.source.pread(10, 0)
    case.source.close()
    case.source.close()
    if case.inner is not None:
        assert case.inner.closed
