"""What a file is, told from its first bytes (and size): commands given the wrong file say
"m.erofs: is an EROFS image, not a zinfo file" instead of a format error about its contents."""

from __future__ import annotations

import os
import re
from collections.abc import Collection

from .erofs.layout import MAGIC as EROFS_MAGIC
from .erofs.layout import SB_OFFSET
from .errors import InvalidInput
from .gzindex.format import HEADER as ZINFO_HEADER
from .gzindex.format import RECORD_SIZE as ZINFO_RECORD

HEAD_SIZE = 4096  # enough for every signature below (the EROFS superblock is at 1024)

EROFS_IMAGE = "an EROFS image"
ZINFO = "a zinfo file"
SIDECAR = "a zinfo sidecar (JSON)"
IMAGE_INDEX = "an image index (index.json)"
JSON = "a JSON file"
TAR = "a tar archive"
GZIP = "a gzip file"
EMPTY = "an empty file"
NOT_LAYERS = (EROFS_IMAGE, ZINFO, SIDECAR, IMAGE_INDEX, JSON)  # files of ours, or JSON

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)
_ARTICLES = {"xz": "an", "lz4": "an", "lzo": "an"}


def _tar_header(block: bytes) -> bool:
    """A tar header block (any format, v7 included: its checksum is right) or a zero block
    (an archive that is only its end marker)."""
    if len(block) < 512:
        return False
    if block[:512] == bytes(512):
        return True
    try:
        stored = int(block[148:156].strip(b" \0").partition(b"\0")[0] or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 256 + sum(block[156:512])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:512] if b > 127)
    return stored in (unsigned, signed)


def detect_format(head: bytes) -> str:
    """Name the container of a blob from its first bytes: gzip, zstd, xz, bzip2, lz4, lzo,
    tar (uncompressed: ustar magic at 257, a v7 header, or only end blocks), empty, or
    unknown. (An EROFS image starts with a zero block too: identify() tells it apart.)"""
    if not head:
        return "empty"
    if _tar_header(head):
        return "tar"
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return "unknown"


def _is_zinfo(head: bytes, size: int | None) -> bool:
    """SOCI zinfo has no magic: `<le32 count><le64 span>` then count (v2) or count - 1 (v1)
    records of fixed size, so the file size follows from the count."""
    if size is None or len(head) < ZINFO_HEADER.size:
        return False
    count, _span = ZINFO_HEADER.unpack_from(head, 0)
    body = size - ZINFO_HEADER.size
    return count >= 1 and body in (count * ZINFO_RECORD, (count - 1) * ZINFO_RECORD)


def _json_kind(head: bytes) -> str | None:
    """A JSON object, and which of ours: told by its "format" (or an image index's "images")."""
    if not head.lstrip().startswith(b"{"):
        return None
    found = re.search(rb'"format"\s*:\s*"([^"]*)"', head)
    fmt = found.group(1) if found else b""
    if b"sidecar" in fmt:
        return SIDECAR
    if b"image-index" in fmt or re.search(rb'"images"\s*:', head):
        return IMAGE_INDEX
    return JSON


def identify(head: bytes, size: int | None = None) -> str | None:
    """What a file starting with `head` (at least HEAD_SIZE bytes, or the whole file) is, as a
    noun phrase ("an EROFS image", "a zinfo file", "a gzip file"...); None when unknown.
    `size` (the whole file's) is needed to recognise a zinfo."""
    if size == 0 or (size is None and not head):
        return EMPTY
    magic = EROFS_MAGIC.to_bytes(4, "little")
    if head[SB_OFFSET:SB_OFFSET + 4] == magic:
        return EROFS_IMAGE
    if _is_zinfo(head, size):
        return ZINFO
    kind = detect_format(head)
    if kind == "tar":
        return TAR
    if kind not in ("unknown", "empty"):
        return f"{_ARTICLES.get(kind, 'a')} {kind} file"
    return _json_kind(head)


def identify_file(path: str | os.PathLike[str]) -> str | None:
    """identify() of a file on disk; None when it cannot be read (the caller reports that)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEAD_SIZE)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return None
    return identify(head, size)


def check_kind(path: str | os.PathLike[str], expected: str, *,
               accept: Collection[str] = ()) -> None:
    """InvalidInput "PATH: is X, not EXPECTED" when the file is recognisably something else
    than `expected` (or one of `accept`); unknown or unreadable files pass (the reader that
    follows says what is wrong with them)."""
    kind = identify_file(path)
    if kind is not None and kind != expected and kind not in accept:
        raise InvalidInput(f"{path}: is {kind}, not {expected}")


def not_gzip_message(name: str, head: bytes, size: int | None = None) -> str:
    """Why a layer starting with `head` cannot be indexed as gzip, naming what it is."""
    what = identify(head, size)
    if what in NOT_LAYERS:
        return f"{name}: is {what}, not a gzip layer"
    kind = detect_format(head)
    if kind == "empty":
        return f"{name}: empty file, not a gzip layer"
    if kind == "tar":
        return f"{name}: uncompressed tar, not gzip (it needs no zinfo; use --meta only)"
    if kind != "unknown":
        return f"{name}: {kind}-compressed, not gzip; only gzip layers are supported"
    return f"{name}: not a gzip file (no gzip magic 1f 8b at offset 0)"


__all__ = [
    "EMPTY",
    "EROFS_IMAGE",
    "GZIP",
    "HEAD_SIZE",
    "IMAGE_INDEX",
    "JSON",
    "NOT_LAYERS",
    "SIDECAR",
    "TAR",
    "ZINFO",
    "check_kind",
    "detect_format",
    "identify",
    "identify_file",
    "not_gzip_message",
]
