"""The image index (`DIR/index.json`) that `index REF --all-layers -o DIR` writes, and the names
of the per-layer files beside it.

    DIR/index.json                      this file (format below)
    DIR/sha256-<hex>.zinfo              gzip checkpoints of layer blob sha256:<hex>
    DIR/sha256-<hex>.zinfo.json         its sidecar (blob digest, span digests, meta digest)
    DIR/sha256-<hex>.meta.erofs         EROFS meta, overlay-style whiteouts (`--aufs`)
    DIR/sha256-<hex>.prefetch.json      optional: a prefetch profile (`hybrid-erofs profile`)
    DIR/sha256-<hex>.prefetch.zinfo     with it: the profile zinfo (the zinfo's checkpoint
                                        table, the windows of the profile's spans only)
    DIR/sha256-<hex>.{zinfo,meta.erofs,prefetch.zinfo}.gz  what `--push` uploads of those

index.json is deterministic: no time, no host, keys sorted; one entry per platform manifest, its
layers in manifest order (bottom first). A layer shared by several platforms is indexed once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IndexFormatError
from ..gzindex.sidecar import parse_versioned, require_sha256
from ..outfile import write_atomic

FORMAT = "hybrid-erofs/image-index"
VERSION = 2
INDEX_NAME = "index.json"
# OCI artifact types and the media types of its blobs (see oci/artifact.py).
ARTIFACT_TYPE = "application/vnd.hybrid-erofs.index.v1"
INDEX_MEDIA_TYPE = "application/vnd.hybrid-erofs.index.v1+json"
ZINFO_MEDIA_TYPE = "application/vnd.hybrid-erofs.zinfo.v2"
SIDECAR_MEDIA_TYPE = "application/vnd.hybrid-erofs.zinfo-sidecar.v2+json"
META_MEDIA_TYPE = "application/vnd.hybrid-erofs.meta.erofs.v2"
PREFETCH_MEDIA_TYPE = "application/vnd.hybrid-erofs.prefetch.v1+json"
PREFETCH_ZINFO_MEDIA_TYPE = "application/vnd.hybrid-erofs.prefetch-zinfo.v2"
# The zinfo and the meta travel as gzip blobs (`index --push`, oci/transit.py) of these types;
# nodes keep them uncompressed. The plain types above are still read (older artifacts).
ZINFO_GZIP_MEDIA_TYPE = ZINFO_MEDIA_TYPE + "+gzip"
META_GZIP_MEDIA_TYPE = META_MEDIA_TYPE + "+gzip"
PREFETCH_ZINFO_GZIP_MEDIA_TYPE = PREFETCH_ZINFO_MEDIA_TYPE + "+gzip"
GZIP_TRANSIT = {"zinfo": ZINFO_GZIP_MEDIA_TYPE, "meta": META_GZIP_MEDIA_TYPE,
                "prefetch_zinfo": PREFETCH_ZINFO_GZIP_MEDIA_TYPE}

INDEXED = "indexed"
SKIPPED_SMALL = "skipped-small"  # below --min-layer-size: a node indexes it itself (cheap)
SKIPPED_FORMAT = "skipped-format"  # not a gzip layer (zstd, uncompressed): cannot be indexed


def layer_file_names(blob_digest: str) -> dict[str, str]:
    """The file names of one layer's outputs: {"zinfo": ..., "sidecar": ..., "meta": ...}."""
    algorithm, _, encoded = blob_digest.partition(":")
    stem = f"{algorithm}-{encoded}"
    return {"zinfo": f"{stem}.zinfo", "sidecar": f"{stem}.zinfo.json",
            "meta": f"{stem}.meta.erofs"}


def transit_file_name(name: str) -> str:
    """The gzip copy of an output file that `index --push` uploads (GZIP_TRANSIT)."""
    return f"{name}.gz"


def prefetch_file_name(blob_digest: str) -> str:
    """The file name of a layer's prefetch profile (optional; `hybrid-erofs profile`)."""
    algorithm, _, encoded = blob_digest.partition(":")
    return f"{algorithm}-{encoded}.prefetch.json"


def prefetch_zinfo_file_name(blob_digest: str) -> str:
    """The file name of a layer's profile zinfo (written with its prefetch profile)."""
    algorithm, _, encoded = blob_digest.partition(":")
    return f"{algorithm}-{encoded}.prefetch.zinfo"


def file_digest(path: str | os.PathLike[str]) -> tuple[str, int]:
    """sha256 digest ("sha256:<hex>") and size of a file."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size


@dataclass(frozen=True, slots=True)
class FileRef:
    """One output file: its name in DIR (and title in the artifact), digest and size."""

    name: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One layer of one image: the blob, and what `index` made of it."""

    digest: str
    media_type: str
    size: int
    diff_id: str
    status: str  # INDEXED, SKIPPED_SMALL or SKIPPED_FORMAT
    layer_size: int = 0  # uncompressed bytes (0 when not indexed)
    zinfo: FileRef | None = None
    sidecar: FileRef | None = None
    meta: FileRef | None = None
    prefetch: FileRef | None = None  # a prefetch profile, when one was recorded
    prefetch_zinfo: FileRef | None = None  # its profile zinfo (gzindex/lazy.py), if any

    @property
    def files(self) -> dict[str, FileRef]:
        return {kind: ref for kind, ref in (("zinfo", self.zinfo), ("sidecar", self.sidecar),
                                            ("meta", self.meta), ("prefetch", self.prefetch),
                                            ("prefetch_zinfo", self.prefetch_zinfo))
                if ref is not None}

    def to_json(self) -> dict[str, Any]:
        layer: dict[str, Any] = {"digest": self.diff_id}
        data: dict[str, Any] = {"blob": {"digest": self.digest, "mediaType": self.media_type,
                                         "size": self.size},
                                "layer": layer, "status": self.status}
        if self.status == INDEXED:
            layer["size"] = self.layer_size
            data["files"] = {kind: ref.to_json() for kind, ref in self.files.items()}
        return data


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One platform manifest and its layers (bottom first)."""

    manifest: str  # digest of the platform manifest (the artifact's subject)
    manifest_media_type: str
    manifest_size: int
    platform: str  # "os/arch[/variant]"
    config: str  # config digest
    layers: tuple[LayerEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"manifest": {"digest": self.manifest, "mediaType": self.manifest_media_type,
                             "size": self.manifest_size},
                "platform": self.platform, "config": {"digest": self.config},
                "layers": [layer.to_json() for layer in self.layers]}


@dataclass(frozen=True, slots=True)
class ImageIndex:
    """Everything `index --all-layers` made: one ImageEntry per platform."""

    images: tuple[ImageEntry, ...]
    span: int
    tool: str
    whiteouts: str = "overlay"  # meta images carry overlayfs whiteouts (as mkfs.erofs --aufs)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def for_manifest(self, digest: str) -> ImageIndex:
        """The same index restricted to one platform manifest (what an artifact carries)."""
        chosen = tuple(image for image in self.images if image.manifest == digest)
        if not chosen:
            raise IndexFormatError(f"{INDEX_NAME}: no image with manifest {digest}")
        return ImageIndex(chosen, self.span, self.tool, self.whiteouts)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "tool": self.tool, "span": self.span,
                "whiteouts": self.whiteouts,
                "images": [image.to_json() for image in self.images]}


def dump_image_index(index: ImageIndex) -> bytes:
    """Canonical bytes: sorted keys, fixed indentation, trailing newline."""
    return (json.dumps(index.to_json(), indent=1, sort_keys=True) + "\n").encode()


def write_image_index(index: ImageIndex, directory: str | os.PathLike[str]) -> Path:
    path = Path(directory) / INDEX_NAME
    write_atomic(path, dump_image_index(index))
    return path


def _file_ref(raw: Any, where: str) -> FileRef:
    if not isinstance(raw, dict):
        raise IndexFormatError(f"{where}: not an object")
    name, digest, size = raw.get("name"), raw.get("digest"), raw.get("size")
    if (not isinstance(name, str) or not name or "/" in name or name.startswith(".")
            or not isinstance(digest, str) or not _is_sha256(digest)
            or not isinstance(size, int) or size < 0):
        raise IndexFormatError(f"{where}: needs a plain file name, a sha256 digest and a size")
    return FileRef(name, digest, size)


def _is_sha256(value: str) -> bool:
    try:
        require_sha256(value, "")
    except IndexFormatError:
        return False
    return True


def parse_image_index(data: bytes, *, name: str = INDEX_NAME) -> ImageIndex:
    """Parse and validate index.json; IndexFormatError naming the bad field otherwise."""
    raw = parse_versioned(data, name=name, kind="image index", format_name=FORMAT,
                          version=VERSION, again="index the image again")
    images: list[ImageEntry] = []
    try:
        for n, image in enumerate(raw["images"]):
            where = f"{name}: images[{n}]"
            layers: list[LayerEntry] = []
            for m, layer in enumerate(image["layers"]):
                lwhere = f"{where}.layers[{m}]"
                status = layer["status"]
                if status not in (INDEXED, SKIPPED_SMALL, SKIPPED_FORMAT):
                    raise IndexFormatError(f"{lwhere}: unknown status {status!r}")
                files = layer.get("files") or {}
                refs = {kind: _file_ref(files[kind], f"{lwhere}.files.{kind}")
                        for kind in ("zinfo", "sidecar", "meta", "prefetch", "prefetch_zinfo")
                        if kind in files}
                if status == INDEXED and len(refs.keys() - {"prefetch", "prefetch_zinfo"}) != 3:
                    raise IndexFormatError(f"{lwhere}: an indexed layer needs zinfo, sidecar "
                                           f"and meta files")
                blob, facts = layer["blob"], layer["layer"]
                layers.append(LayerEntry(
                    digest=require_sha256(blob["digest"], f"{lwhere}.blob.digest"),
                    media_type=str(blob["mediaType"]), size=int(blob["size"]),
                    diff_id=require_sha256(facts["digest"], f"{lwhere}.layer.digest"), status=status,
                    layer_size=int(facts.get("size", 0)), **refs))
            manifest = image["manifest"]
            images.append(ImageEntry(
                manifest=require_sha256(manifest["digest"], f"{where}.manifest.digest"),
                manifest_media_type=str(manifest["mediaType"]),
                manifest_size=int(manifest["size"]), platform=str(image["platform"]),
                config=require_sha256(image["config"]["digest"], f"{where}.config.digest"),
                layers=tuple(layers)))
        return ImageIndex(tuple(images), int(raw["span"]), str(raw.get("tool", "")),
                          str(raw.get("whiteouts", "overlay")))
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IndexFormatError(f"{name}: malformed image index: {exc!r}") from exc


def load_image_index(directory: str | os.PathLike[str]) -> ImageIndex:
    path = Path(directory) / INDEX_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{path}: no such file (made by `hybrid-erofs index REF "
                               f"--all-layers -o {directory}`)") from exc
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_image_index(data, name=str(path))


def verify_layer_files(directory: str | os.PathLike[str], layer: LayerEntry) -> None:
    """Check that each output file of an indexed layer exists with its recorded digest."""
    for kind, ref in layer.files.items():
        path = Path(directory) / ref.name
        try:
            digest, size = file_digest(path)
        except FileNotFoundError as exc:
            raise IndexFormatError(f"{path}: missing ({kind} of layer {layer.digest})") from exc
        if (digest, size) != (ref.digest, ref.size):
            raise IndexFormatError(f"{path}: does not match {INDEX_NAME} ({kind} of layer "
                                   f"{layer.digest}: {size} bytes hashing to {digest}, "
                                   f"expected {ref.size} bytes, {ref.digest})")


__all__ = [
    "ARTIFACT_TYPE",
    "GZIP_TRANSIT",
    "INDEXED",
    "INDEX_MEDIA_TYPE",
    "INDEX_NAME",
    "META_GZIP_MEDIA_TYPE",
    "META_MEDIA_TYPE",
    "PREFETCH_MEDIA_TYPE",
    "PREFETCH_ZINFO_GZIP_MEDIA_TYPE",
    "PREFETCH_ZINFO_MEDIA_TYPE",
    "SIDECAR_MEDIA_TYPE",
    "SKIPPED_FORMAT",
    "SKIPPED_SMALL",
    "ZINFO_GZIP_MEDIA_TYPE",
    "ZINFO_MEDIA_TYPE",
    "FileRef",
    "ImageEntry",
    "ImageIndex",
    "LayerEntry",
    "dump_image_index",
    "file_digest",
    "layer_file_names",
    "load_image_index",
    "parse_image_index",
    "prefetch_file_name",
    "prefetch_zinfo_file_name",
    "transit_file_name",
    "verify_layer_files",
    "write_image_index",
]
