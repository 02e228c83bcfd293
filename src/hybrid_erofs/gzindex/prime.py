"""inflatePrime for Python's raw inflaters: resume at a checkpoint that starts mid-byte.

Prepend empty deflate blocks (RFC 1951 §3.2.3, §3.2.6, §3.2.7) whose total length is
8k + (8 - bits) bits, then the checkpoint's partial byte, then the original bytes. The blocks
emit nothing, so the history stays the zdict window, and the original bytes keep their byte
alignment, which stored blocks and member ends depend on. (Shifting the input by `bits`
instead breaks as soon as a stored block follows.)
"""

from __future__ import annotations

from functools import cache


class _BitWriter:
    """Deflate bit order: values are packed from the least significant bit of each byte."""

    def __init__(self) -> None:
        self.acc = 0
        self.nbits = 0

    def write(self, value: int, nbits: int) -> None:
        self.acc |= (value & ((1 << nbits) - 1)) << self.nbits
        self.nbits += nbits


def _empty_fixed(w: _BitWriter) -> None:
    # BFINAL=0, BTYPE=01 (fixed Huffman), then end-of-block: literal 256 = 7 zero bits. 10 bits.
    w.write(0, 1)
    w.write(1, 2)
    w.write(0, 7)


def _empty_dynamic(w: _BitWriter) -> None:
    # BFINAL=0, BTYPE=10, HLIT=257 (field 0), HDIST=2 (field 1), HCLEN=19 (field 15).
    # Code-length code: only symbols 1 and 18, length 1 each (complete: codes 0 and 1).
    # Literal/length code: symbols 0 and 256 of length 1; distance code: 0 and 1 of length 1.
    # Every code is complete, so no decoder has to accept an incomplete tree. 95 bits in all.
    w.write(0, 1)
    w.write(2, 2)
    w.write(0, 5)
    w.write(1, 5)
    w.write(15, 4)
    order = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
    for symbol in order:
        w.write(1 if symbol in (1, 18) else 0, 3)
    # Canonical codes of the code-length code: symbol 1 -> '0', symbol 18 -> '1'
    # (one-bit codes read the same in either bit order).
    w.write(0, 1)  # literal 0: length 1
    w.write(1, 1)  # 18: repeat zero 11 + 127 = 138 times (literals 1..138)
    w.write(127, 7)
    w.write(1, 1)  # 18: repeat zero 11 + 106 = 117 times (literals 139..255)
    w.write(106, 7)
    w.write(0, 1)  # literal 256: length 1
    w.write(0, 1)  # distance 0: length 1
    w.write(0, 1)  # distance 1: length 1
    w.write(1, 1)  # end of block: literal 256 is code '1'


@cache
def _prefix_writer(bits: int) -> tuple[int, int]:
    """(accumulator, bit count) of the empty blocks for a checkpoint with `bits` unused bits."""
    w = _BitWriter()
    rest = 8 - bits  # bits of byte in-1 already consumed: the prefix must end on that phase
    if rest % 2 == 0:
        for _ in range(rest // 2):  # 10 bits each: r/2 of them are 5r = r (mod 8) bits
            _empty_fixed(w)
    else:
        _empty_dynamic(w)  # 95 = 7 (mod 8)
        for _ in range(((rest - 7) % 8) // 2):
            _empty_fixed(w)
    assert (w.nbits + bits) % 8 == 0
    return w.acc, w.nbits


def primed_start(bits: int, partial_byte: int) -> bytes:
    """Bytes to feed a raw inflater before the blob bytes from the checkpoint's `in_offset`.

    `partial_byte` is the blob byte at `in_offset - 1`; its high `bits` bits are the first
    bits of the stream to resume. For `bits == 0` nothing is needed.
    """
    if bits == 0:
        return b""
    if not 0 < bits < 8:
        raise ValueError(f"'bits' must be in 0..7 (got {bits})")
    acc, nbits = _prefix_writer(bits)
    acc |= (partial_byte >> (8 - bits)) << nbits
    return acc.to_bytes((nbits + bits) // 8, "little")
