"""The empty-block prefix that resumes inflating mid-byte, against all three codecs."""

from __future__ import annotations

import random
import zlib

import pytest

from hybrid_erofs.gzindex.prime import primed_start

CODECS = [zlib]
try:
    from isal import isal_zlib

    CODECS.append(isal_zlib)
except ImportError:  # pragma: no cover
    pass
try:
    from zlib_ng import zlib_ng

    CODECS.append(zlib_ng)
except ImportError:  # pragma: no cover
    pass


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.__name__)
def test_prefix_emits_nothing_and_keeps_the_phase(bits: int, codec: object) -> None:
    prefix = primed_start(bits, 0xFF)
    # The high `bits` bits of the last byte come from the partial byte.
    assert prefix[-1] >> (8 - bits) == (1 << bits) - 1
    decoder = codec.decompressobj(-15, zdict=b"w" * 32768)  # type: ignore[attr-defined]
    assert decoder.decompress(prefix[:-1]) == b""


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.__name__)
def test_every_checkpoint_of_a_mixed_stream_decodes_its_whole_span(codec: object) -> None:
    # Text (dynamic blocks) interleaved with noise (stored blocks): a checkpoint followed by
    # a stored block is exactly where bit-shifting the input goes wrong.
    import gzip
    import io

    from hybrid_erofs.gzindex.build import build_index

    rng = random.Random(7)
    parts = []
    for _ in range(40):
        parts.append(b"".join(rng.choice([b"alpha ", b"beta ", b"gamma\n"]) for _ in range(3000)))
        parts.append(rng.randbytes(rng.randrange(1000, 90000)))
    data = b"".join(parts)
    blob = gzip.compress(data, 6)
    index = build_index(io.BytesIO(blob), span=64 << 10).index
    assert sum(1 for cp in index.checkpoints if cp.bits) >= 5
    cps = index.checkpoints
    for number, cp in enumerate(cps):
        end = cps[number + 1].out_offset if number + 1 < len(cps) else len(data)
        start = primed_start(cp.bits, blob[cp.in_offset - 1]) if cp.bits else b""
        decoder = codec.decompressobj(-15, zdict=cp.window)  # type: ignore[attr-defined]
        out = decoder.decompress(start + blob[cp.in_offset:])
        assert out[: end - cp.out_offset] == data[cp.out_offset:end], number


def test_bad_bits_are_refused() -> None:
    with pytest.raises(ValueError):
        primed_start(8, 0)
