"""Builder and GzipSource on the fixture layers: real files, pigz, multi-member, eStargz-like,
compressible, incompressible, header fields. Oracles: the decompressed tar and indexed_gzip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hybrid_erofs.errors import GzipFormatError
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import WINDOW_SIZE, GzipIndex
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.source import FileSource

from ..conftest import BAD_INPUTS, GOOD_LAYERS, layer_tar

SPAN = 256 << 10


def _build(path: Path, **kw: object) -> GzipIndex:
    with open(path, "rb") as handle:
        return build_index(handle, span=SPAN, **kw).index  # type: ignore[arg-type]


@pytest.mark.parametrize("name", GOOD_LAYERS)
def test_builder_output_and_stream(layers: dict[str, Path], name: str) -> None:
    path = layers[name]
    plain = layer_tar(path).read_bytes()
    out = bytearray()
    with open(path, "rb") as handle:
        result = build_index(handle, span=SPAN, sink=out.extend)
    assert out == plain  # the sink sees exactly the layer data, in order
    assert result.layer_size == len(plain)
    assert result.blob_size == path.stat().st_size
    cps = result.index.checkpoints
    assert cps[0].out_offset == 0
    assert cps[0].window == bytes(WINDOW_SIZE)
    for prev, cp in zip(cps, cps[1:], strict=False):
        assert cp.out_offset - prev.out_offset > SPAN or cp.out_offset == prev.out_offset
        # Every window is the 32 KiB of layer data before its checkpoint.
        start = max(0, cp.out_offset - WINDOW_SIZE)
        assert cp.window[WINDOW_SIZE - (cp.out_offset - start):] == plain[start : cp.out_offset]


@pytest.mark.parametrize("name", GOOD_LAYERS)
def test_engines_agree(layers: dict[str, Path], name: str) -> None:
    with open(layers[name], "rb") as a, open(layers[name], "rb") as b:
        ng = build_index(a, span=SPAN, engine="zlib-ng")
        z = build_index(b, span=SPAN, engine="zlib")
    assert ng.engine == "zlib-ng" and z.engine == "zlib"
    assert ng.index == z.index
    assert ng.blob_sha256 == z.blob_sha256


@pytest.mark.parametrize("every_member", [False, True], ids=["soci-rule", "every-member"])
@pytest.mark.parametrize("name", GOOD_LAYERS)
def test_random_reads_match_the_tar(layers: dict[str, Path], name: str, every_member: bool) -> None:
    path = layers[name]
    plain = layer_tar(path).read_bytes()
    index = _build(path, every_member=every_member)
    source = GzipSource(FileSource(path), index, cache_bytes=2 << 20)
    try:
        assert source.size == len(plain)
        rng = random.Random(hash(name) & 0xFFFF)
        size = len(plain)
        probes = [(0, 0), (0, 1), (size - 1, 1), (size, 0), (0, min(size, 3 * SPAN))]
        for cp in index.checkpoints[1:]:
            probes += [(cp.out_offset, 4096), (max(0, cp.out_offset - 700), 1400)]
        probes += [(rng.randrange(size), rng.choice([1, 512, 4096, 70000, 2 * SPAN]))
                   for _ in range(150)]
        for offset, length in probes:
            length = min(length, size - offset)
            assert source.pread(length, offset) == plain[offset : offset + length], (offset, length)
    finally:
        source.close()


def test_every_member_adds_a_checkpoint_per_member(layers: dict[str, Path]) -> None:
    soci = _build(layers["estargz"])
    erofs = _build(layers["estargz"], every_member=True)
    assert len(erofs) > 10 * len(soci)
    assert {cp.out_offset for cp in soci.checkpoints} <= {cp.out_offset for cp in erofs.checkpoints}


def test_cross_check_with_indexed_gzip(layers: dict[str, Path]) -> None:
    igzip = pytest.importorskip("indexed_gzip")
    path = layers["rootfs"]
    index = _build(path)
    source = GzipSource(FileSource(path), index)
    reference = igzip._IndexedGzipFile(str(path), spacing=SPAN)
    try:
        rng = random.Random(99)
        for _ in range(100):
            offset = rng.randrange(source.size - 1)
            length = min(rng.randrange(1, 200_000), source.size - offset)
            reference.seek(offset)
            assert source.pread(length, offset) == reference.read(length)
    finally:
        reference.close()
        source.close()


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_one_clear_error(layers: dict[str, Path], name: str) -> None:
    path = layers[name]
    if name == "trailing_zeros":  # accepted, as by gzip(1) and Python's gzip
        assert len(_build(path)) >= 1
        return
    with pytest.raises(GzipFormatError) as info, open(path, "rb") as handle:
        build_index(handle, name=str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    expected = {"zstd": "zstd-compressed", "xz": "xz-compressed", "bzip2": "bzip2-compressed",
                "empty": "empty file", "not_gzip": "uncompressed tar", "truncated": "truncated",
                "truncated_header": "truncated", "trailing_garbage": "trailing garbage",
                "corrupt": "corrupt", "not_deflate": "corrupt"}
    assert expected[name] in message
