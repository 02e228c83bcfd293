"""The zinfo sidecar (`layer.zinfo.json`): what the zinfo format cannot say. Blob digest and
size, layer data size, span, and the sha256 of each span's compressed bytes (spans.py).

Written atomically beside the zinfo by `index`; read by every stack that opens the zinfo, to
refuse a layer that is not the one indexed and to verify spans before decoding them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IndexFormatError
from ..outfile import write_atomic
from .spans import SpanDigest

FORMAT = "hybrid-erofs/zinfo-sidecar"
VERSION = 1


@dataclass(frozen=True, slots=True)
class Sidecar:
    """Facts about the blob a zinfo was built from."""

    blob_digest: str  # "sha256:<hex>"
    blob_size: int
    layer_size: int
    span: int
    checkpoints: int
    zinfo_sha256: str
    spans: tuple[SpanDigest, ...]
    tool: str = ""
    meta_sha256: str | None = None  # the meta built in the same pass: binds it to this layer


def sidecar_path(zinfo: str | os.PathLike[str]) -> Path:
    """Where the sidecar of `zinfo` lives: the same name plus `.json`."""
    path = Path(zinfo)
    return path.with_name(path.name + ".json")


def dump_sidecar(sidecar: Sidecar) -> bytes:
    data: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "tool": sidecar.tool,
        "blob": {"digest": sidecar.blob_digest, "size": sidecar.blob_size},
        "layer_size": sidecar.layer_size,
        "span": sidecar.span,
        "checkpoints": sidecar.checkpoints,
        "zinfo_sha256": sidecar.zinfo_sha256,
        "spans": [[s.offset, s.length, s.sha256] for s in sidecar.spans],
    }
    if sidecar.meta_sha256 is not None:
        data["meta_sha256"] = sidecar.meta_sha256
    return (json.dumps(data, indent=1) + "\n").encode()


def write_sidecar(sidecar: Sidecar, path: str | os.PathLike[str]) -> None:
    write_atomic(path, dump_sidecar(sidecar))


def load_sidecar(path: str | os.PathLike[str], *, zinfo_bytes: bytes | None = None) -> Sidecar:
    """Read and validate a sidecar; with `zinfo_bytes`, also check it belongs to that zinfo."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: not a readable JSON sidecar: {exc}") from exc
    try:
        if data["format"] != FORMAT or data["version"] != VERSION:
            raise IndexFormatError(
                f"{path}: not a version {VERSION} zinfo sidecar "
                f"(format {data.get('format')!r}, version {data.get('version')!r})"
            )
        spans = tuple(SpanDigest(int(o), int(n), str(h)) for o, n, h in data["spans"])
        sidecar = Sidecar(
            blob_digest=str(data["blob"]["digest"]), blob_size=int(data["blob"]["size"]),
            layer_size=int(data["layer_size"]), span=int(data["span"]),
            checkpoints=int(data["checkpoints"]), zinfo_sha256=str(data["zinfo_sha256"]),
            spans=spans, tool=str(data.get("tool", "")),
            meta_sha256=None if data.get("meta_sha256") is None else str(data["meta_sha256"]),
        )
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"{path}: malformed zinfo sidecar: {exc!r}") from exc
    _check_extents(path, sidecar)
    if zinfo_bytes is not None:
        actual = hashlib.sha256(zinfo_bytes).hexdigest()
        if actual != sidecar.zinfo_sha256:
            raise IndexFormatError(
                f"{path}: belongs to another zinfo (zinfo sha256 {actual[:12]}..., "
                f"sidecar says {sidecar.zinfo_sha256[:12]}...)"
            )
    return sidecar


def _check_extents(path: Path, sidecar: Sidecar) -> None:
    """The extents must cover the blob from 0 to its end, in order, sharing at most a byte."""
    end = 0
    for number, span in enumerate(sidecar.spans):
        if span.length < 0 or span.offset not in (end, end - 1) or (number == 0 and span.offset):
            raise IndexFormatError(
                f"{path}: span digest {number} at offset {span.offset} does not follow the "
                f"previous span's end {end}"
            )
        if len(span.sha256) != 64:
            raise IndexFormatError(f"{path}: span digest {number} is not a sha256 hex digest")
        end = span.offset + span.length
    if end != sidecar.blob_size:
        raise IndexFormatError(
            f"{path}: span digests cover {end} bytes of the {sidecar.blob_size}-byte blob"
        )
