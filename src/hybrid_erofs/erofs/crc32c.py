"""Table-driven CRC-32C (Castagnoli, reflected 0x82F63B78) for the EROFS superblock checksum.

EROFS uses the raw update with seed ~0 and NO final xor (erofs-tarindex.md §1.3).
"""

from __future__ import annotations


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc32c(data: bytes | bytearray | memoryview, seed: int = 0xFFFFFFFF) -> int:
    """CRC-32C update of `data` starting from `seed`, without the final xor.

    The standard CRC-32C of `data` is `crc32c(data) ^ 0xFFFFFFFF`; the EROFS superblock checksum
    is `crc32c(block)` with the checksum field zeroed.
    """
    crc, table = seed & 0xFFFFFFFF, _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
