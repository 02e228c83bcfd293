"""Bound indexes: the image's own manifest names each layer's index by digest, so the image
digest (and any signature on the image) covers the index, as eStargz's TOC digest annotation
does. `index --push` publishes the image anew with these annotations (indexing/publish.py).

On each indexed layer descriptor of the new manifest:

    containerd.io/snapshot/hybrid-erofs/sidecar.digest   sha256:<hex> of the layer's sidecar
    containerd.io/snapshot/hybrid-erofs/sidecar.size     its size in bytes
    containerd.io/snapshot/hybrid-erofs/version          "2" (the sidecar's format version)
    containerd.io/snapshot/hybrid-erofs/prefetch.digest  sha256:<hex> of the layer's prefetch
    containerd.io/snapshot/hybrid-erofs/prefetch.size    profile and its size (only when one
                                                         was recorded: `hybrid-erofs profile`)
    containerd.io/snapshot/hybrid-erofs/zinfo.gzip.digest  sha256:<hex> and size of the gzip
    containerd.io/snapshot/hybrid-erofs/zinfo.gzip.size    blob the zinfo travels as; the same
    containerd.io/snapshot/hybrid-erofs/meta.gzip.digest   for the meta (absent: the plain
    containerd.io/snapshot/hybrid-erofs/meta.gzip.size     blobs, as before these existed)

The `containerd.io/snapshot/` prefix makes containerd hand them to snapshotters as labels of
the layer's snapshot. The sidecar names the zinfo and the meta by digest (gzindex/sidecar.py);
all three are blobs of the same repository, and so is the prefetch profile. A profile
recorded later changes the manifest, so it is bound only to the new image digest. A gzip blob
is fetched by its bound digest and checked before it is inflated; what it inflates to must be
the zinfo (meta) the sidecar names, digest and size, and is kept uncompressed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import IndexFormatError, TrustError
from ..gzindex.sidecar import VERSION, parse_sidecar, require_sha256
from ..indexing.imageindex import (
    GZIP_TRANSIT,
    META_MEDIA_TYPE,
    PREFETCH_MEDIA_TYPE,
    SIDECAR_MEDIA_TYPE,
    ZINFO_MEDIA_TYPE,
    FileRef,
    layer_file_names,
)
from ..oci.artifact import fetch_blob_file, fetch_gzip_blob_file, make_directory
from ..oci.client import Descriptor, RegistryClient

PREFIX = "containerd.io/snapshot/hybrid-erofs/"
SIDECAR_DIGEST = PREFIX + "sidecar.digest"
SIDECAR_SIZE = PREFIX + "sidecar.size"
FORMAT_VERSION = PREFIX + "version"
PREFETCH_DIGEST = PREFIX + "prefetch.digest"
PREFETCH_SIZE = PREFIX + "prefetch.size"
MAX_INDEX_FILE = 4 << 30


def _gzip_keys(kind: str) -> tuple[str, str]:
    """The digest and size annotations of the gzip blob a `kind` file travels as."""
    return PREFIX + f"{kind}.gzip.digest", PREFIX + f"{kind}.gzip.size"


MAX_PROFILE = 16 << 20


def layer_annotations(sidecar: FileRef, prefetch: FileRef | None = None,
                      transit: Mapping[str, FileRef] | None = None) -> dict[str, str]:
    """The annotations that bind a layer descriptor to its index (through its sidecar), to
    its prefetch profile, when it has one, and to the gzip blobs (`transit`: kind -> blob)
    its zinfo and meta travel as."""
    annotations = {SIDECAR_DIGEST: sidecar.digest, SIDECAR_SIZE: str(sidecar.size),
                   FORMAT_VERSION: str(VERSION)}
    if prefetch is not None:
        annotations.update({PREFETCH_DIGEST: prefetch.digest,
                            PREFETCH_SIZE: str(prefetch.size)})
    for kind, blob in (transit or {}).items():
        digest_key, size_key = _gzip_keys(kind)
        annotations.update({digest_key: blob.digest, size_key: str(blob.size)})
    return annotations


def bound_transit(annotations: Mapping[str, str], *, layer: str) -> dict[str, Descriptor]:
    """kind -> the gzip blob that a layer descriptor's annotations (or a snapshot's labels)
    bind for its zinfo and its meta; {} for an index bound before they existed. Malformed
    annotations are a TrustError naming the layer."""
    found = {}
    for kind, media_type in GZIP_TRANSIT.items():
        digest_key, size_key = _gzip_keys(kind)
        if digest_key in annotations:
            found[kind] = _descriptor(annotations, digest_key, size_key, media_type,
                                      MAX_INDEX_FILE, layer=layer,
                                      what=f"bound {kind} gzip annotations")
    return found


def bound_prefetch(annotations: Mapping[str, str], *, layer: str) -> Descriptor | None:
    """The prefetch profile a layer descriptor's annotations (or a snapshot's labels) bind,
    or None. Malformed annotations are a TrustError naming the layer."""
    if PREFETCH_DIGEST not in annotations:
        return None
    return _descriptor(annotations, PREFETCH_DIGEST, PREFETCH_SIZE, PREFETCH_MEDIA_TYPE,
                       MAX_PROFILE, layer=layer, what="bound prefetch annotations")


def _descriptor(annotations: Mapping[str, str], digest_key: str, size_key: str,
                media_type: str, max_size: int, *, layer: str, what: str) -> Descriptor:
    """The blob that a digest and a size annotation name; TrustError when malformed."""
    digest = annotations[digest_key]
    try:
        size = int(annotations.get(size_key, ""))
        require_sha256(digest, f"layer {layer}: {digest_key}")
    except (ValueError, IndexFormatError) as exc:
        raise TrustError(f"layer {layer}: malformed {what}: {exc}") from exc
    if not 0 < size <= max_size:
        raise TrustError(f"layer {layer}: {size_key} {size} is not a plausible size")
    return Descriptor(media_type, digest, size)


def bound_prefetch_name(digest: str) -> str:
    """The file a bound profile is kept as: named by its own digest, so the profiles of two
    images that share a layer never replace each other."""
    algorithm, _, encoded = digest.partition(":")
    return f"prefetch-{algorithm}-{encoded}.json"


def bound_sidecar(annotations: Mapping[str, str], *, layer: str) -> Descriptor | None:
    """The sidecar a layer descriptor's annotations (or a snapshot's labels) name, or None.
    Malformed annotations, or another format version, are a TrustError naming the layer."""
    digest = annotations.get(SIDECAR_DIGEST)
    if digest is None:
        return None
    version = annotations.get(FORMAT_VERSION)
    if version != str(VERSION):
        raise TrustError(f"layer {layer}: its bound index has format version {version!r}; "
                         f"this hybrid-erofs reads version {VERSION} (index and push it again)")
    return _descriptor(annotations, SIDECAR_DIGEST, SIDECAR_SIZE, SIDECAR_MEDIA_TYPE,
                       MAX_INDEX_FILE, layer=layer, what="bound-index annotations")


@dataclass(frozen=True, slots=True)
class BoundFiles:
    """A layer's index files, fetched by the digests its bound sidecar names."""

    meta: Path
    zinfo: Path
    sidecar: Path
    prefetch: Path | None = None


def fetch_bound_files(client: RegistryClient, layer_digest: str, sidecar: Descriptor,
                      directory: Path, *, prefetch: Descriptor | None = None,
                      transit: Mapping[str, Descriptor] | None = None) -> BoundFiles:
    """Fetch (or keep, when already there with the right digest) the sidecar, then the zinfo
    and the meta it names, into `directory` under layer_file_names(layer_digest), and the
    bound prefetch profile, if any, under bound_prefetch_name(). The sidecar must be for
    this very layer. A zinfo or meta with a bound gzip blob in `transit` (bound_transit)
    is fetched as that blob and inflated (oci/artifact.fetch_gzip_blob_file)."""
    names = layer_file_names(layer_digest)
    make_directory(directory)
    side_path = fetch_blob_file(client, sidecar, directory / names["sidecar"],
                                max_size=MAX_INDEX_FILE)
    parsed = parse_sidecar(side_path.read_bytes(), name=f"bound sidecar {sidecar.digest}")
    if parsed.blob_digest != layer_digest:
        raise TrustError(f"layer {layer_digest}: its bound sidecar {sidecar.digest} is for "
                         f"blob {parsed.blob_digest}")
    if parsed.meta_digest is None or parsed.meta_size is None:
        raise TrustError(f"layer {layer_digest}: its bound sidecar {sidecar.digest} names no "
                         f"meta")
    plain = {"zinfo": Descriptor(ZINFO_MEDIA_TYPE, parsed.zinfo_digest, parsed.zinfo_size),
             "meta": Descriptor(META_MEDIA_TYPE, parsed.meta_digest, parsed.meta_size)}
    paths = {}
    for kind, descriptor in plain.items():
        compressed = (transit or {}).get(kind)
        paths[kind] = (
            fetch_blob_file(client, descriptor, directory / names[kind],
                            max_size=MAX_INDEX_FILE) if compressed is None else
            fetch_gzip_blob_file(client, compressed, descriptor, directory / names[kind],
                                 max_size=MAX_INDEX_FILE))
    zinfo, meta = paths["zinfo"], paths["meta"]
    profile = (fetch_blob_file(client, prefetch, directory / bound_prefetch_name(
        prefetch.digest), max_size=MAX_PROFILE) if prefetch is not None else None)
    return BoundFiles(meta=meta, zinfo=zinfo, sidecar=side_path, prefetch=profile)


__all__ = ["FORMAT_VERSION", "PREFETCH_DIGEST", "PREFETCH_SIZE", "PREFIX", "SIDECAR_DIGEST",
           "SIDECAR_SIZE", "BoundFiles", "bound_prefetch", "bound_prefetch_name",
           "bound_sidecar", "bound_transit", "fetch_bound_files", "layer_annotations"]
