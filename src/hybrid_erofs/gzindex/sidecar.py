"""The zinfo sidecar (`layer.zinfo.json`): what the zinfo format cannot say, and what binds the
index files of one layer together. Blob digest and size, layer data size (and digest when
known), the digests of the zinfo and of the meta built in the same pass, and the sha256 of each
span's compressed bytes (spans.py). Format: docs/formats.md.

Written by `index` before the zinfo and meta are renamed into place (outfile.OutputSet); read by
every command that opens the zinfo, to refuse files that do not belong together.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IndexFormatError
from ..outfile import write_atomic
from .spans import SpanDigest

FORMAT = "hybrid-erofs/zinfo-sidecar"
VERSION = 2
WHITEOUTS = ("overlay", "tar")  # meta built with `--aufs` (overlayfs whiteouts) or not
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Sidecar:
    """Facts about the blob a zinfo was built from, and the files built with it.

    Digests are "sha256:<hex>"; `spans` hold bare hex (they are compared with hashlib).
    """

    blob_digest: str
    blob_size: int
    layer_size: int
    span: int
    checkpoints: int
    zinfo_digest: str
    zinfo_size: int
    spans: tuple[SpanDigest, ...]
    tool: str = ""
    every_member: bool = False
    layer_digest: str | None = None  # sha256 of the layer data (the diff_id), when known
    meta_digest: str | None = None  # the meta built in the same pass
    meta_size: int | None = None
    whiteouts: str | None = None  # how that meta shows .wh.* entries (WHITEOUTS)


def sidecar_path(zinfo: str | os.PathLike[str]) -> Path:
    """Where the sidecar of `zinfo` lives: the same name plus `.json`."""
    path = Path(zinfo)
    return path.with_name(path.name + ".json")


def sha256_digest(data: bytes | memoryview) -> str:
    """The "sha256:<hex>" digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sidecar_json(sidecar: Sidecar) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "tool": sidecar.tool,
        "blob": {"digest": sidecar.blob_digest, "size": sidecar.blob_size},
        "layer": {"size": sidecar.layer_size},
        "zinfo": {"digest": sidecar.zinfo_digest, "size": sidecar.zinfo_size,
                  "span": sidecar.span, "checkpoints": sidecar.checkpoints,
                  "every_member": sidecar.every_member},
        "spans": [[s.offset, s.length, f"sha256:{s.sha256}"] for s in sidecar.spans],
    }
    if sidecar.layer_digest is not None:
        data["layer"]["digest"] = sidecar.layer_digest
    if sidecar.meta_digest is not None:
        data["meta"] = {"digest": sidecar.meta_digest, "size": sidecar.meta_size,
                        "whiteouts": sidecar.whiteouts}
    return data


def dump_sidecar(sidecar: Sidecar) -> bytes:
    """Deterministic bytes: sorted keys, fixed indentation, trailing newline."""
    return (json.dumps(sidecar_json(sidecar), indent=1, sort_keys=True) + "\n").encode()


def write_sidecar(sidecar: Sidecar, path: str | os.PathLike[str]) -> None:
    write_atomic(path, dump_sidecar(sidecar))


def require_sha256(value: Any, where: str) -> str:
    """`value` if it is a "sha256:<64 lowercase hex>" digest, else IndexFormatError."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise IndexFormatError(f"{where}: {str(value)[:80]!r} is not a sha256:<hex> digest")
    return value


def _size(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IndexFormatError(f"{where}: {str(value)[:40]!r} is not a size")
    return value


def parse_versioned(data: bytes, *, name: str, kind: str, format_name: str, version: int,
                    again: str) -> dict[str, Any]:
    """The JSON object of a hybrid-erofs file of `format_name` and `version`; any other
    version is refused in one line saying what to do (`again`)."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise IndexFormatError(f"{name}: not a readable JSON {kind}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != format_name:
        raise IndexFormatError(f"{name}: not a {kind} (format {format_name!r})")
    if raw.get("version") != version:
        raise IndexFormatError(
            f"{name}: {kind} version {str(raw.get('version'))[:20]} is not supported "
            f"(this hybrid-erofs reads version {version}; {again})")
    return raw


def parse_sidecar(data: bytes, *, name: str = "sidecar") -> Sidecar:
    """Parse and validate sidecar bytes; IndexFormatError naming `name` and the field."""
    raw = parse_versioned(data, name=name, kind="zinfo sidecar", format_name=FORMAT,
                          version=VERSION, again="index the layer again")
    try:
        blob, layer, zinfo = raw["blob"], raw["layer"], raw["zinfo"]
        spans = []
        for number, (offset, length, digest) in enumerate(raw["spans"]):
            hexdigest = require_sha256(digest, f"{name}: spans[{number}]").removeprefix("sha256:")
            spans.append(SpanDigest(_size(offset, f"{name}: spans[{number}]"),
                                    _size(length, f"{name}: spans[{number}]"), hexdigest))
        meta = raw.get("meta")
        whiteouts = meta.get("whiteouts") if isinstance(meta, dict) else None
        if meta is not None and whiteouts not in WHITEOUTS:
            raise IndexFormatError(f"{name}: meta.whiteouts {str(whiteouts)[:20]!r} is not one "
                                   f"of {', '.join(WHITEOUTS)}")
        every_member = zinfo.get("every_member", False)
        if not isinstance(every_member, bool):
            raise IndexFormatError(f"{name}: zinfo.every_member is not true or false")
        sidecar = Sidecar(
            blob_digest=require_sha256(blob["digest"], f"{name}: blob.digest"),
            blob_size=_size(blob["size"], f"{name}: blob.size"),
            layer_size=_size(layer["size"], f"{name}: layer.size"),
            span=_size(zinfo["span"], f"{name}: zinfo.span"),
            checkpoints=_size(zinfo["checkpoints"], f"{name}: zinfo.checkpoints"),
            zinfo_digest=require_sha256(zinfo["digest"], f"{name}: zinfo.digest"),
            zinfo_size=_size(zinfo["size"], f"{name}: zinfo.size"),
            spans=tuple(spans), tool=str(raw.get("tool", "")), every_member=every_member,
            layer_digest=(None if layer.get("digest") is None
                          else require_sha256(layer["digest"], f"{name}: layer.digest")),
            meta_digest=None if meta is None else require_sha256(meta["digest"], f"{name}: meta.digest"),
            meta_size=None if meta is None else _size(meta["size"], f"{name}: meta.size"),
            whiteouts=whiteouts,
        )
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IndexFormatError(f"{name}: malformed zinfo sidecar: {exc!r}") from exc
    _check_extents(name, sidecar)
    return sidecar


def load_sidecar(path: str | os.PathLike[str], *, zinfo_bytes: bytes | None = None) -> Sidecar:
    """Read and validate a sidecar; with `zinfo_bytes`, also check it belongs to that zinfo."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{path}: no such file") from exc
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    sidecar = parse_sidecar(data, name=str(path))
    if zinfo_bytes is not None:
        check_zinfo(sidecar, zinfo_bytes, name=str(path))
    return sidecar


def check_zinfo(sidecar: Sidecar, zinfo_bytes: bytes, *, name: str) -> None:
    """Refuse a zinfo other than the one the sidecar was written with."""
    actual = sha256_digest(zinfo_bytes)
    if actual != sidecar.zinfo_digest:
        raise IndexFormatError(
            f"{name}: belongs to another zinfo (the zinfo is {actual}, the sidecar records "
            f"{sidecar.zinfo_digest})")


def _check_extents(name: str, sidecar: Sidecar) -> None:
    """The extents must cover the blob from 0 to its end, in order, sharing at most a byte."""
    end = 0
    for number, span in enumerate(sidecar.spans):
        if span.offset not in (end, end - 1) or (number == 0 and span.offset):
            raise IndexFormatError(
                f"{name}: span digest {number} at offset {span.offset} does not follow the "
                f"previous span's end {end}"
            )
        end = span.offset + span.length
    if end != sidecar.blob_size:
        raise IndexFormatError(
            f"{name}: span digests cover {end} bytes of the {sidecar.blob_size}-byte blob"
        )
    if len(sidecar.spans) != sidecar.checkpoints:
        raise IndexFormatError(f"{name}: {len(sidecar.spans)} span digests for "
                               f"{sidecar.checkpoints} checkpoints")
