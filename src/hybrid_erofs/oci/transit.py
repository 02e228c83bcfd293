"""Files that travel as gzip blobs and are kept plain: a deterministic gzip of a file for a
push, and the inflate of a verified gzip blob into the file, bounded by the size the file must
have and checked against its digest (a bomb, a truncated stream or other bytes are one error).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO

from ..errors import IndexFormatError, OutputError
from ..outfile import write_atomic_chunks

GZIP_SUFFIX = "+gzip"  # the media type of a file's gzip blob: the file's own type plus this
LEVEL = 9  # published once, fetched by every node: the smallest output (zlib-ng: 0.5 s/10 MB)
_CHUNK = 1 << 20


def _inflater() -> ModuleType:
    """isal where its wheel exists (about 3x zlib-ng's inflate), else zlib-ng (a dependency)."""
    try:
        from isal import isal_zlib

        return isal_zlib
    except ImportError:  # pragma: no cover - depends on the platform's wheels
        from zlib_ng import zlib_ng

        return zlib_ng


_INFLATE = _inflater()


def gzip_file(source: Path, target: Path) -> None:
    """`target` = gzip of `source` (one member, no name, mtime 0, zlib-ng level 9): the same
    file always gives the same bytes, so pushing it again uploads nothing. Atomic."""
    from zlib_ng import zlib_ng

    def chunks() -> Iterator[bytes]:
        packer = zlib_ng.compressobj(LEVEL, zlib_ng.DEFLATED, 31)
        with open(source, "rb") as handle:
            while block := handle.read(_CHUNK):
                yield packer.compress(block)
        yield packer.flush()

    try:
        write_atomic_chunks(target, chunks())
    except OSError as exc:
        raise OutputError(f"{source}: cannot read: {exc.strerror}") from exc


def inflated(handle: IO[bytes], *, digest: str, size: int, subject: str) -> Iterator[bytes]:
    """The bytes of the gzip stream in `handle` (one member, nothing after it), which must
    be exactly `size` bytes hashing to `digest`: never more than `size` + 1 bytes are
    inflated, and any other outcome is an IndexFormatError naming `subject`, raised before
    the iterator ends."""
    unpacker = _INFLATE.decompressobj(31)
    hasher = hashlib.new(digest.partition(":")[0])
    produced = 0
    pending = b""
    while True:
        if not pending:
            if unpacker.eof:
                break
            pending = handle.read(_CHUNK)
        try:
            if pending:
                out = unpacker.decompress(pending, size + 1 - produced)
                pending = unpacker.unconsumed_tail
            else:  # the input ended: what the inflater holds, at most one match
                out = unpacker.flush()
                if not unpacker.eof:
                    raise IndexFormatError(f"{subject}: truncated gzip stream "
                                           f"({produced + len(out)} bytes inflated, {size} "
                                           f"expected)")
        except _INFLATE.error as exc:
            raise IndexFormatError(f"{subject}: not a valid gzip stream after {produced} "
                                   f"inflated bytes: {exc}") from exc
        produced += len(out)
        if produced > size:
            raise IndexFormatError(f"{subject}: inflates to more than the {size} bytes the "
                                   f"index records")
        hasher.update(out)
        yield out
        if unpacker.eof and (unpacker.unused_data or handle.read(1)):
            raise IndexFormatError(f"{subject}: data after the end of the gzip stream")
    if produced != size:
        raise IndexFormatError(f"{subject}: inflates to {produced} bytes, the index records "
                               f"{size}")
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    if actual != digest:
        raise IndexFormatError(f"{subject}: inflates to {size} bytes hashing to {actual}, the "
                               f"index records {digest}")


def inflate_to(handle: IO[bytes], target: Path, *, digest: str, size: int,
               subject: str) -> None:
    """inflated() into `target`, atomically: no file is left behind when it fails."""
    write_atomic_chunks(target, inflated(handle, digest=digest, size=size, subject=subject))


def is_gzip_of(source: Path, *, digest: str, size: int) -> bool:
    """True when the file `source` inflates to exactly `size` bytes hashing to `digest`."""
    try:
        with open(source, "rb") as handle:
            for _ in inflated(handle, digest=digest, size=size, subject=str(source)):
                pass
    except (OSError, IndexFormatError):
        return False
    return True


__all__ = ["GZIP_SUFFIX", "LEVEL", "gzip_file", "inflate_to", "inflated", "is_gzip_of"]
