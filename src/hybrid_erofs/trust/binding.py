"""Binding checks, run by every command that reads index files (ls, cat, verify, read, mount,
serve): the meta, the zinfo, its sidecar and the blob must belong together.

The meta records the digest of the blob it was built from (device slot #1's tag, see
erofs/image.py set_device_tag); the sidecar records the blob, the zinfo and the meta by digest.
A mismatch is one line naming both digests. Trust model: docs/security.md.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..erofs.image import set_device_tag
from ..erofs.layout import MAGIC, SB, SB_OFFSET, SB_SIZE, SLOT_SIZE, parse_superblock
from ..errors import BindingError, ErofsFormatError, IndexFormatError
from ..gzindex.sidecar import Sidecar
from ..indexing.imageindex import file_digest
from ..source import ByteSource

log = logging.getLogger(__name__)

_HEX64 = re.compile(rb"[0-9a-f]{64}")


def blob_tag(digest: str) -> bytes:
    """The device tag that names blob `digest` ("sha256:<hex>"): its 64 hex digits."""
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256" or not _HEX64.fullmatch(encoded.encode()):
        raise ValueError(f"{digest!r} is not a sha256:<hex> digest")
    return encoded.encode()


def stamp_meta(meta: bytes, blob_digest: str) -> bytes:
    """`meta` recording that it was built from blob `blob_digest`."""
    return set_device_tag(meta, blob_tag(blob_digest))


def meta_blob_digest(meta: ByteSource, *, name: str = "meta") -> str | None:
    """The blob digest a meta records, or None (a meta made by mkfs.erofs or another tool)."""
    what = f"{name}: superblock at offset {SB_OFFSET}"
    if meta.size < SB_OFFSET + SB_SIZE:
        raise ErofsFormatError(f"{what}: {SB_SIZE} bytes at offset {SB_OFFSET} are outside the "
                               f"meta image (size {meta.size})")
    raw = meta.pread(SB_SIZE, SB_OFFSET)
    fields = SB.unpack(raw)
    if fields[0] != MAGIC:
        raise ErofsFormatError(f"{what}: bad magic 0x{fields[0]:08x} (not an EROFS image)")
    incompat, extra_devices, devt_slotoff = fields[14], fields[16], fields[17]
    if not incompat & 0x8 or not extra_devices:
        return None
    offset = devt_slotoff * SLOT_SIZE
    if offset + SLOT_SIZE > meta.size:
        raise ErofsFormatError(f"{name}: device table at offset {offset} is outside the image")
    superblock = parse_superblock(raw, meta.pread(SLOT_SIZE, offset))
    tag = superblock.devices[0].tag
    return f"sha256:{tag.decode()}" if _HEX64.fullmatch(tag) else None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """"sha256:<hex>" of a file; IndexFormatError naming it when it cannot be read."""
    try:
        return file_digest(path)[0]
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{path}: no such file") from exc
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot read: {exc.strerror}") from exc


@dataclass(slots=True)
class BlobIdentity:
    """The blob a layer is read from: its size, and its digest when known for free (a
    registry descriptor, an OCI layout) or computed on demand from `local_path`."""

    name: str
    size: int
    digest: str | None = None
    local_path: Path | None = None
    _hashed: str | None = field(default=None, repr=False)

    def resolve_digest(self) -> str | None:
        """The digest, hashing the local file once when it is not known."""
        if self.digest is not None:
            return self.digest
        if self._hashed is None and self.local_path is not None:
            self._hashed = file_sha256(self.local_path)
        return self._hashed


def _meta_recorded(meta: ByteSource | Path) -> str | None:
    if isinstance(meta, Path):
        from ..source import FileSource

        source = FileSource(meta)
        try:
            return meta_blob_digest(source, name=str(meta))
        finally:
            source.close()
    return meta_blob_digest(meta)


def check_binding(*, blob: BlobIdentity | None, meta: Path | None = None,
                  zinfo: Path | None = None, sidecar: Sidecar | None = None) -> None:
    """Refuse files that do not belong together; BindingError names both digests.

    With a sidecar: the blob has its size and (when known) digest, the meta is the one built
    with the zinfo (its digest) and records the same blob. Without one (a zinfo from SOCI or
    erofs-utils, or a plain tar): a meta that records its blob must record this blob, which a
    local file is hashed for. A meta that records nothing (mkfs.erofs) is used as given.
    """
    recorded = _meta_recorded(meta) if meta is not None else None
    if sidecar is not None:
        where = str(zinfo) if zinfo is not None else "the sidecar"
        if blob is not None and (blob.size != sidecar.blob_size or (
                blob.digest is not None and blob.digest != sidecar.blob_digest)):
            shown = f"{blob.digest}, " if blob.digest else ""
            raise BindingError(
                f"{blob.name}: not the layer {where} was built for: that was "
                f"{sidecar.blob_digest} ({sidecar.blob_size} bytes), this is {shown}"
                f"{blob.size} bytes")
        if meta is None:
            return
        if recorded is not None and recorded != sidecar.blob_digest:
            raise BindingError(
                f"{meta}: this meta was built for another layer (blob {recorded}); {where} "
                f"is for blob {sidecar.blob_digest}")
        if sidecar.meta_digest is not None:
            actual = file_sha256(meta)
            if actual != sidecar.meta_digest:
                raise BindingError(
                    f"{meta}: not the meta built with {where} (the meta is {actual}, its "
                    f"sidecar records {sidecar.meta_digest}): index the layer again or pass "
                    f"the matching --meta")
        return
    if meta is None or blob is None:
        return
    if recorded is None:
        log.warning("%s: records no layer blob (not made by hybrid-erofs index): used as "
                    "given, not checked against %s", meta, blob.name)
        return
    actual_blob = blob.resolve_digest()
    if actual_blob is not None and actual_blob != recorded:
        raise BindingError(f"{meta}: this meta was built for another layer (blob {recorded}); "
                           f"{blob.name} is blob {actual_blob}")


def check_file_digest(path: Path, expected: str, *, what: str) -> None:
    """Refuse a file whose sha256 is not `expected` (a digest from a bound source)."""
    actual = file_sha256(path)
    if actual != expected:
        raise BindingError(f"{path}: {what} is {actual}, but {expected} was expected")


__all__ = [
    "BlobIdentity",
    "blob_tag",
    "check_binding",
    "check_file_digest",
    "file_sha256",
    "meta_blob_digest",
    "stamp_meta",
]
