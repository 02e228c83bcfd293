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
    containerd.io/snapshot/hybrid-erofs/prefetch.zinfo.digest  sha256:<hex> and size of the
    containerd.io/snapshot/hybrid-erofs/prefetch.zinfo.size    profile zinfo (with a profile
    containerd.io/snapshot/hybrid-erofs/prefetch.zinfo.gzip.digest  recorded since it existed:
    containerd.io/snapshot/hybrid-erofs/prefetch.zinfo.gzip.size    gzindex/lazy.py) and of
                                                         the gzip blob it travels as

The `containerd.io/snapshot/` prefix makes containerd hand them to snapshotters as labels of
the layer's snapshot. The sidecar names the zinfo and the meta by digest (gzindex/sidecar.py);
all three are blobs of the same repository, and so is the prefetch profile. A profile
recorded later changes the manifest, so it is bound only to the new image digest; so is its
profile zinfo, which a node uses only when both are bound. A gzip blob
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
    PREFETCH_ZINFO_MEDIA_TYPE,
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
PREFETCH_ZINFO_DIGEST = PREFIX + "prefetch.zinfo.digest"
PREFETCH_ZINFO_SIZE = PREFIX + "prefetch.zinfo.size"
MAX_INDEX_FILE = 4 << 30
_STEMS = {"prefetch_zinfo": "prefetch.zinfo"}  # kind -> its annotations' stem, when not kind


def _gzip_keys(kind: str) -> tuple[str, str]:
    """The digest and size annotations of the gzip blob a `kind` file travels as."""
    stem = _STEMS.get(kind, kind)
    return PREFIX + f"{stem}.gzip.digest", PREFIX + f"{stem}.gzip.size"


MAX_PROFILE = 16 << 20


def layer_annotations(sidecar: FileRef, prefetch: FileRef | None = None,
                      transit: Mapping[str, FileRef] | None = None, *,
                      prefetch_zinfo: FileRef | None = None) -> dict[str, str]:
    """The annotations that bind a layer descriptor to its index (through its sidecar), to
    its prefetch profile and profile zinfo, when it has them, and to the gzip blobs
    (`transit`: kind -> blob) its zinfo, meta and profile zinfo travel as."""
    annotations = {SIDECAR_DIGEST: sidecar.digest, SIDECAR_SIZE: str(sidecar.size),
                   FORMAT_VERSION: str(VERSION)}
    if prefetch is not None:
        annotations.update({PREFETCH_DIGEST: prefetch.digest,
                            PREFETCH_SIZE: str(prefetch.size)})
        if prefetch_zinfo is not None:
            annotations.update({PREFETCH_ZINFO_DIGEST: prefetch_zinfo.digest,
                                PREFETCH_ZINFO_SIZE: str(prefetch_zinfo.size)})
    for kind, blob in (transit or {}).items():
        if kind == "prefetch_zinfo" and (prefetch is None or prefetch_zinfo is None):
            continue
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


def bound_prefetch_zinfo(annotations: Mapping[str, str], *,
                         layer: str) -> Descriptor | None:
    """The profile zinfo a layer descriptor's annotations (or a snapshot's labels) bind
    with its prefetch profile, or None (also when no profile is bound: bound, or not used).
    Malformed annotations are a TrustError naming the layer."""
    if PREFETCH_ZINFO_DIGEST not in annotations or PREFETCH_DIGEST not in annotations:
        return None
    return _descriptor(annotations, PREFETCH_ZINFO_DIGEST, PREFETCH_ZINFO_SIZE,
                       PREFETCH_ZINFO_MEDIA_TYPE, MAX_INDEX_FILE, layer=layer,
                       what="bound profile zinfo annotations")


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


def bound_prefetch_zinfo_name(digest: str) -> str:
    """The file a bound profile zinfo is kept as (named by its own digest, as a profile)."""
    algorithm, _, encoded = digest.partition(":")
    return f"prefetch-zinfo-{algorithm}-{encoded}.zinfo"


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
    zinfo: Path  # not there yet when `later` is set
    sidecar: Path
    prefetch: Path | None = None
    later: ZinfoLater | None = None


@dataclass(frozen=True, slots=True)
class ZinfoLater:
    """A layer mounted before its zinfo is fetched: the bound profile zinfo it starts on,
    and the blob its zinfo is fetched as later (`fetch_zinfo`): the bound gzip blob, or the
    plain zinfo; `plain` is the zinfo itself as the sidecar names it. `profile_digest`: the
    profile zinfo's bound digest, checked again whenever a daemon starts on the file (a
    restart from a mount record); None in records of releases before it was kept."""

    profile_zinfo: Path
    blob: Descriptor
    plain: Descriptor
    profile_digest: str | None = None

    def argv(self) -> list[str]:
        """For the mount daemon's command line (no secret in it)."""
        digest = ([] if self.profile_digest is None else
                  ["--_profile-zinfo-digest", self.profile_digest])
        return ["--_profile-zinfo", str(self.profile_zinfo), *digest, "--_zinfo-blob",
                ",".join(f"{d.media_type},{d.digest},{d.size}" for d in (self.blob, self.plain))]

    @classmethod
    def from_argv(cls, profile_zinfo: Path | None, blobs: str | None,
                  profile_digest: str | None = None) -> ZinfoLater | None:
        if profile_zinfo is None or blobs is None:
            return None
        parts = blobs.split(",")
        if len(parts) != 6:
            raise TrustError(f"malformed --_zinfo-blob {blobs!r}")
        blob, plain = (Descriptor(parts[n], parts[n + 1], int(parts[n + 2])) for n in (0, 3))
        return cls(profile_zinfo, blob, plain, profile_digest)

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "profile_zinfo": str(self.profile_zinfo),
            "blob": [self.blob.media_type, self.blob.digest, self.blob.size],
            "plain": [self.plain.media_type, self.plain.digest, self.plain.size]}
        if self.profile_digest is not None:
            data["profile_digest"] = self.profile_digest
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object] | None) -> ZinfoLater | None:
        """From to_json() (the snapshotter's store row, a mount's state record); None for
        one without it."""
        if not data:
            return None
        found = []
        for key in ("blob", "plain"):
            raw = data.get(key)
            if not isinstance(raw, list) or len(raw) != 3 or not isinstance(raw[2], int):
                raise TrustError(f"malformed zinfo-later record: {key} {raw!r}")
            found.append(Descriptor(str(raw[0]), str(raw[1]), raw[2]))
        path, digest = data.get("profile_zinfo"), data.get("profile_digest")
        if not isinstance(path, str) or not isinstance(digest, str | None):
            raise TrustError(f"malformed zinfo-later record: profile_zinfo {path!r}, "
                             f"profile_digest {digest!r}")
        return cls(Path(path), found[0], found[1], digest)


def fetch_zinfo(client: RegistryClient, later: ZinfoLater, target: Path) -> Path:
    """The zinfo a layer was mounted without, fetched into `target` (checked against the
    digest its sidecar names before it is put there)."""
    if later.blob.media_type in GZIP_TRANSIT.values():
        return fetch_gzip_blob_file(client, later.blob, later.plain, target,
                                    max_size=MAX_INDEX_FILE)
    return fetch_blob_file(client, later.plain, target, max_size=MAX_INDEX_FILE)


def fetch_bound_files(client: RegistryClient, layer_digest: str, sidecar: Descriptor,
                      directory: Path, *, prefetch: Descriptor | None = None,
                      transit: Mapping[str, Descriptor] | None = None,
                      prefetch_zinfo: Descriptor | None = None) -> BoundFiles:
    """Fetch (or keep, when already there with the right digest) the sidecar, then the zinfo
    and the meta it names, into `directory` under layer_file_names(layer_digest), and the
    bound prefetch profile, if any, under bound_prefetch_name(). The sidecar must be for
    this very layer. A zinfo or meta with a bound gzip blob in `transit` (bound_transit)
    is fetched as that blob and inflated (oci/artifact.fetch_gzip_blob_file).

    With a bound profile and `prefetch_zinfo` (bound_prefetch_zinfo), and no zinfo here yet,
    the profile zinfo is fetched instead of the zinfo (under bound_prefetch_zinfo_name()),
    and `later` says how to fetch the zinfo once the profile's spans are in."""
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
    later: ZinfoLater | None = None
    if prefetch is not None and prefetch_zinfo is not None and not (
            directory / names["zinfo"]).is_file():
        compressed = (transit or {}).get("prefetch_zinfo")
        target = directory / bound_prefetch_zinfo_name(prefetch_zinfo.digest)
        profile_zinfo = (
            fetch_blob_file(client, prefetch_zinfo, target, max_size=MAX_INDEX_FILE)
            if compressed is None else
            fetch_gzip_blob_file(client, compressed, prefetch_zinfo, target,
                                 max_size=MAX_INDEX_FILE))
        later = ZinfoLater(profile_zinfo, (transit or {}).get("zinfo", plain["zinfo"]),
                           plain["zinfo"], prefetch_zinfo.digest)
        del plain["zinfo"]
    paths = {"zinfo": directory / names["zinfo"]}
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
    return BoundFiles(meta=meta, zinfo=zinfo, sidecar=side_path, prefetch=profile, later=later)


__all__ = ["FORMAT_VERSION", "PREFETCH_DIGEST", "PREFETCH_SIZE", "PREFETCH_ZINFO_DIGEST",
           "PREFETCH_ZINFO_SIZE", "PREFIX", "SIDECAR_DIGEST", "SIDECAR_SIZE", "BoundFiles",
           "ZinfoLater", "bound_prefetch", "bound_prefetch_name", "bound_prefetch_zinfo",
           "bound_prefetch_zinfo_name", "bound_sidecar", "bound_transit", "fetch_bound_files",
           "fetch_zinfo", "layer_annotations"]
