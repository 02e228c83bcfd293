"""Where a node gets an image's index, and whether it may be used (docs/security.md): from a
local directory that `index --all-layers -o DIR` wrote (the user's own files), or from the
image's registry, in this order:

1. bound: the image's manifest names each layer's index by digest (annotations written by
   `index --push`, trust/bound.py): the files are fetched by those digests and used;
2. signed: an index artifact attached to the manifest (referrers) that a key the node trusts
   signed (trust/signature.py);
3. unbound: any other attached artifact, only with the opt-in (TrustPolicy.accept_unbound):
   mounted nosuid,nodev and verified against the layer in the background.
Otherwise: one line naming the flags. The layers are always the manifest's (an artifact that
lists others is skipped); layers too small to have been indexed in CI are indexed here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..device import RegistryOptions
from ..errors import HybridErofsError, IndexFormatError, InvalidInput, RegistryError, TrustError
from ..indexing.image import (
    LayerJob,
    _index_job,
    _layer_reference,
    default_build_time,
    existing_outputs,
)
from ..indexing.imageindex import (
    ARTIFACT_TYPE,
    GZIP_TRANSIT,
    INDEX_NAME,
    INDEXED,
    SKIPPED_FORMAT,
    SKIPPED_SMALL,
    FileRef,
    ImageEntry,
    LayerEntry,
    layer_file_names,
    load_image_index,
    parse_image_index,
    verify_layer_files,
)
from ..indexing.publish import artifact_stem, registry_client
from ..oci.artifact import (
    Referrer,
    artifact_layers,
    fetch_blob_file,
    fetch_gzip_blob_file,
    find_artifacts,
    make_directory,
)
from ..oci.client import GZIP_LAYER_TYPES, Descriptor, Manifest, RegistryClient
from ..oci.image import ImageInfo, inspect_manifest
from ..oci.layout import is_layout_reference
from ..oci.reference import parse_reference
from ..oci.transit import GZIP_SUFFIX
from ..sources.cachedir import default_cache_dir
from ..sources.gate import BOUND, LOCAL, SIGNED, UNBOUND
from ..trust.bound import (
    ZinfoLater,
    bound_prefetch,
    bound_prefetch_name,
    bound_prefetch_zinfo,
    bound_sidecar,
    bound_transit,
    fetch_bound_files,
)
from ..trust.policy import TrustPolicy, unbound_refusal
from ..trust.signature import verify_signature
from .image import ImageLayer, ImagePlan, select_image

log = logging.getLogger(__name__)

Selector = Callable[[ImageEntry], list[LayerEntry]]


@dataclass(frozen=True, slots=True)
class DiscoveredImage:
    """An image's index as found for a node: the platform's entry (its layers are the
    manifest's), where each chosen layer's files are, and how each was obtained."""

    image: ImageEntry
    artifact: str  # the artifact the index came from, or the manifest digest when bound
    layer_dirs: dict[str, Path]  # blob digest -> directory holding its layer_file_names()
    trust: dict[str, str] = field(default_factory=dict)  # blob digest -> LOCAL/BOUND/...
    span: int = 4 << 20

    def layer_paths(self, layer: LayerEntry) -> tuple[Path, Path]:
        """(meta, zinfo) of `layer`."""
        names = layer_file_names(layer.digest)
        directory = self.layer_dirs[layer.digest]
        return directory / names["meta"], directory / names["zinfo"]

    def prefetch_path(self, layer: LayerEntry) -> Path | None:
        """`layer`'s prefetch profile, when its index has one the image binds (fetched and
        verified with the layer's other files; unbound indexes' profiles are dropped)."""
        if layer.prefetch is None:
            return None
        return self.layer_dirs[layer.digest] / layer.prefetch.name


def indexes_dir(registry: RegistryOptions) -> Path:
    return (registry.cache_dir or default_cache_dir()) / "indexes"


def _platform(info: ImageInfo) -> str:
    c = info.config
    return "/".join(p for p in (c.os, c.architecture, c.variant) if p)


def _manifest_entry(manifest: Manifest, info: ImageInfo) -> ImageEntry:
    """The image as its manifest and config say (statuses left to the index)."""
    layers = tuple(LayerEntry(digest=d.digest, media_type=d.media_type, size=d.size,
                              diff_id=diff_id, status=INDEXED)
                   for d, diff_id in zip(info.layers, info.config.diff_ids, strict=True))
    return ImageEntry(manifest=manifest.digest, manifest_media_type=manifest.media_type,
                      manifest_size=len(manifest.body), platform=_platform(info),
                      config=info.config_descriptor.digest, layers=layers)


def _layer_annotations(manifest: Manifest) -> dict[str, Mapping[str, str]]:
    found: dict[str, Mapping[str, str]] = {}
    raw_layers = manifest.data.get("layers")
    for raw in raw_layers if isinstance(raw_layers, list) else []:
        if isinstance(raw, dict) and isinstance(raw.get("annotations"), dict):
            found[str(raw.get("digest"))] = {str(k): str(v) for k, v in raw["annotations"].items()}
    return found


def discover_image_index(reference: str, *, registry: RegistryOptions,
                         policy: TrustPolicy | None = None, layers: Selector | None = None,
                         progress: Callable[[str], None] | None = None) -> DiscoveredImage:
    """Find the index of `reference`'s platform manifest and the files of the chosen layers
    (`layers`, default all): bound, signed, or unbound under `policy` (default: refuse
    unbound indexes with a TrustError naming the flags). Layers that were too small to be
    indexed in CI are indexed here, from the registry, into the cache (LOCAL)."""
    policy = policy or TrustPolicy()
    say = progress or (lambda _line: None)
    with registry_client(reference, registry, what="finding the index") as client:
        manifest = client.resolve(registry.platform)
        info = inspect_manifest(client, manifest, reference)
        entry = _manifest_entry(manifest, info)
        annotations = _layer_annotations(manifest)
        bound = {digest: sidecar for digest, labels in annotations.items()
                 if (sidecar := bound_sidecar(labels, layer=digest)) is not None}
        if bound:
            profiles = {digest: profile for digest, labels in annotations.items()
                        if digest in bound
                        and (profile := bound_prefetch(labels, layer=digest)) is not None}
            transit = {digest: bound_transit(annotations[digest], layer=digest)
                       for digest in bound}
            chosen = layers(entry) if layers is not None else list(entry.layers)
            found = _bound_layers(client, reference, entry, chosen, bound, profiles, transit,
                                  registry=registry, say=say)
            say(f"{reference}: index bound to image {manifest.digest} ({entry.platform})")
            return found
        return _attached_index(client, reference, manifest, entry, policy=policy,
                               layers=layers, registry=registry, say=say)


def _bound_layers(client: RegistryClient, reference: str, entry: ImageEntry,
                  chosen: list[LayerEntry], bound: dict[str, Descriptor],
                  profiles: dict[str, Descriptor], transit: dict[str, dict[str, Descriptor]], *,
                  registry: RegistryOptions, say: Callable[[str], None]) -> DiscoveredImage:
    """The chosen layers' files by the digests the manifest's annotations name (the zinfo
    and the meta as the gzip blobs they bind, if any: `transit`); a layer's prefetch profile
    only when the manifest binds it too (LayerEntry.prefetch)."""
    dirs: dict[str, Path] = {}
    trust: dict[str, str] = {}
    statuses: dict[str, str] = {}
    prefetch: dict[str, FileRef] = {}
    for layer in chosen:
        if layer.digest in bound:
            profile = profiles.get(layer.digest)
            files = fetch_bound_files(client, layer.digest, bound[layer.digest],
                                      indexes_dir(registry) / "bound", prefetch=profile,
                                      transit=transit.get(layer.digest))
            dirs[layer.digest], trust[layer.digest] = files.meta.parent, BOUND
            statuses[layer.digest] = INDEXED
            if profile is not None:
                prefetch[layer.digest] = FileRef(bound_prefetch_name(profile.digest),
                                                 profile.digest, profile.size)
        else:
            statuses[layer.digest] = _unindexed(reference, entry.manifest, layer,
                                                registry=registry, dirs=dirs, trust=trust,
                                                say=say)
    image = replace(entry, layers=tuple(replace(layer, status=statuses.get(layer.digest,
                                                                          layer.status),
                                                prefetch=prefetch.get(layer.digest))
                                        for layer in entry.layers))
    return DiscoveredImage(image, entry.manifest, dirs, trust)


def _unindexed(reference: str, manifest_digest: str, layer: LayerEntry, *,
               registry: RegistryOptions, dirs: dict[str, Path], trust: dict[str, str],
               say: Callable[[str], None], span: int = 4 << 20,
               platform: str | None = None) -> str:
    """A layer the image's index does not cover (too small to be indexed in CI): a gzip
    layer is indexed here, from the registry (LOCAL: nothing from the index is used)."""
    if layer.media_type not in GZIP_LAYER_TYPES:
        raise InvalidInput(f"{reference}: layer {layer.digest} ({layer.media_type}) is not "
                           f"a gzip layer: it cannot be mounted lazily")
    dirs[layer.digest] = index_on_node(reference, manifest_digest, layer, registry=registry,
                                       span=span, platform=platform)
    trust[layer.digest] = LOCAL
    say(f"{layer.digest[:19]}... ({layer.size} bytes) indexed on this node")
    return SKIPPED_SMALL


@dataclass(frozen=True, slots=True)
class _Candidate:
    referrer: Referrer
    directory: Path
    image: ImageEntry
    span: int
    signer: str | None


def _attached_index(client: RegistryClient, reference: str, manifest: Manifest,
                    entry: ImageEntry, *, policy: TrustPolicy, layers: Selector | None,
                    registry: RegistryOptions, say: Callable[[str], None]) -> DiscoveredImage:
    found = find_artifacts(client, manifest.digest, artifact_type=ARTIFACT_TYPE)
    if not found:
        raise RegistryError(
            f"{reference}: no hybrid-erofs index is attached to image {manifest.digest}; "
            f"make one in CI with `hybrid-erofs index {reference} --all-layers -o DIR "
            f"--push` (or mount with --meta/--zinfo)")
    keys = policy.keys()
    errors: list[str] = []
    candidates: list[_Candidate] = []
    for referrer in reversed(found):  # the last attached first
        directory = indexes_dir(registry) / artifact_stem(referrer.digest)
        try:
            candidate = _candidate(client, referrer, directory, manifest, entry)
        except HybridErofsError as exc:
            errors.append(str(exc))
            log.warning("%s: skipping artifact %s: %s", reference, referrer.digest, exc)
            continue
        key = verify_signature(client, referrer.digest, keys) if keys else None
        candidates.append(replace(candidate, signer=key.name if key else None))
    if not candidates:
        raise RegistryError(f"{reference}: no usable hybrid-erofs index attached to "
                            f"{manifest.digest}: {'; '.join(errors)}")
    signed = [c for c in candidates if c.signer is not None]
    if signed:
        chosen, trust = signed[0], SIGNED
        say(f"{reference}: index {chosen.referrer.digest[:19]}... signed by {chosen.signer}")
    elif policy.accept_unbound:
        chosen, trust = candidates[0], UNBOUND
        say(f"{reference}: index {chosen.referrer.digest[:19]}... is not bound to the image: "
            f"mounted nosuid,nodev until verified against the layer")
        if any(layer.prefetch is not None for layer in chosen.image.layers):
            # bound, or not used: a profile only reorders fetches, but nothing vouches for it
            log.info("%s: the prefetch profiles of unbound index %s are not used", reference,
                     chosen.referrer.digest)
            chosen = replace(chosen, image=replace(chosen.image, layers=tuple(
                replace(layer, prefetch=None, prefetch_zinfo=None)
                for layer in chosen.image.layers)))
    else:
        ref = parse_reference(reference)
        raise TrustError(unbound_refusal(reference, manifest.digest,
                                         f"{ref.registry}/{ref.repository}",
                                         candidates[0].referrer.digest))
    picked = layers(chosen.image) if layers is not None else list(chosen.image.layers)
    dirs: dict[str, Path] = {}
    trusts: dict[str, str] = {}
    for layer in picked:
        if layer.status == INDEXED:
            verify_layer_files(chosen.directory, layer)
            dirs[layer.digest], trusts[layer.digest] = chosen.directory, trust
        elif layer.status == SKIPPED_SMALL:
            _unindexed(reference, manifest.digest, layer, registry=registry, dirs=dirs,
                       trust=trusts, say=say, span=chosen.span)
        else:
            raise InvalidInput(f"{reference}: layer {layer.digest} ({layer.media_type}) is "
                               f"not a gzip layer: it cannot be mounted lazily")
    return DiscoveredImage(chosen.image, chosen.referrer.digest, dirs, trusts, chosen.span)


def _candidate(client: RegistryClient, referrer: Referrer, directory: Path,
               manifest: Manifest, entry: ImageEntry) -> _Candidate:
    """An attached artifact, fetched and parsed; its layers must be the manifest's (the
    diff_ids are taken from the image config, not from the artifact)."""
    blobs = artifact_layers(client, referrer)
    if INDEX_NAME not in blobs:
        raise IndexFormatError(f"artifact {referrer.digest} has no {INDEX_NAME}")
    make_directory(directory)
    path = fetch_blob_file(client, blobs[INDEX_NAME], directory / INDEX_NAME)
    index = parse_image_index(path.read_bytes(), name=str(path))
    image = index.for_manifest(manifest.digest).images[0]
    if [layer.digest for layer in image.layers] != [layer.digest for layer in entry.layers]:
        raise IndexFormatError(f"artifact {referrer.digest}: lists other layers than "
                               f"manifest {manifest.digest}")
    _fetch_index_files(client, referrer, blobs, image, directory)
    layers = tuple(replace(mine, status=theirs.status, layer_size=theirs.layer_size,
                           zinfo=theirs.zinfo, sidecar=theirs.sidecar, meta=theirs.meta,
                           prefetch=theirs.prefetch, prefetch_zinfo=theirs.prefetch_zinfo)
                   for mine, theirs in zip(entry.layers, image.layers, strict=True))
    for layer in layers:
        if layer.status == SKIPPED_FORMAT and layer.media_type in GZIP_LAYER_TYPES:
            raise IndexFormatError(f"artifact {referrer.digest}: calls gzip layer "
                                   f"{layer.digest} not gzip")
    return _Candidate(referrer, directory, replace(entry, layers=layers), index.span, None)


def _fetch_index_files(client: RegistryClient, referrer: Referrer,
                       blobs: Mapping[str, Descriptor], image: ImageEntry,
                       directory: Path) -> None:
    """The artifact's other files into `directory`, under their titles: a gzip blob
    (GZIP_TRANSIT) is inflated into the file its index.json lists under that name, within
    its recorded size and checked against its digest; the rest are kept as they are."""
    listed = {ref.name: ref for layer in image.layers for ref in layer.files.values()}
    gzip_types = set(GZIP_TRANSIT.values())
    for title, blob in blobs.items():
        if title == INDEX_NAME:
            continue
        if blob.media_type not in gzip_types:
            fetch_blob_file(client, blob, directory / title)
            continue
        ref = listed.get(title)
        if ref is None:
            raise IndexFormatError(f"artifact {referrer.digest}: gzip blob {title!r} is not a "
                                   f"file its {INDEX_NAME} lists")
        plain = Descriptor(blob.media_type.removesuffix(GZIP_SUFFIX), ref.digest, ref.size)
        fetch_gzip_blob_file(client, blob, plain, directory / title)


def choose_layer(image: ImageEntry, registry: RegistryOptions, *, reference: str) -> LayerEntry:
    """The layer `--layer N` / `--blob DIGEST` names, or the only one."""
    layers = list(image.layers)
    if registry.blob is not None:
        chosen = [layer for layer in layers if layer.digest == registry.blob]
        if not chosen:
            raise InvalidInput(f"{reference}: blob {registry.blob} is not one of the "
                               f"{len(layers)} layers of {image.manifest}")
        return chosen[0]
    if registry.layer is not None:
        if not -len(layers) <= registry.layer < len(layers):
            raise InvalidInput(f"{reference}: layer {registry.layer} is out of range: the image "
                               f"has {len(layers)} layers")
        return layers[registry.layer]
    if len(layers) != 1:
        raise InvalidInput(f"{reference}: the image has {len(layers)} layers; choose one with "
                           f"--layer N or --blob DIGEST, or mount them all with mount-image")
    return layers[0]


def _pinned(reference: str, manifest: str) -> str:
    ref = parse_reference(reference)
    return f"{ref.registry}/{ref.repository}@{manifest}"


def discover_layer(reference: str, *, registry: RegistryOptions,
                   policy: TrustPolicy | None = None,
                   progress: Callable[[str], None] | None = None
                   ) -> tuple[str, Path, Path, RegistryOptions, str, Path | None]:
    """(source pinned to the indexed manifest, meta, zinfo, options naming the layer's blob,
    how the index was obtained, the layer's prefetch profile or None) for `mount REF`
    without --meta."""
    found = discover_image_index(
        reference, registry=registry, policy=policy, progress=progress,
        layers=lambda image: [choose_layer(image, registry, reference=reference)])
    (digest,) = found.layer_dirs
    layer = next(layer for layer in found.image.layers if layer.digest == digest)
    meta, zinfo = found.layer_paths(layer)
    return (_pinned(reference, found.image.manifest), meta, zinfo,
            replace(registry, blob=digest, layer=None, platform=None), found.trust[digest],
            found.prefetch_path(layer))


def discover_image_plan(reference: str, *, registry: RegistryOptions,
                        policy: TrustPolicy | None = None,
                        progress: Callable[[str], None] | None = None) -> ImagePlan:
    """Every layer of `reference` for mount-image, from its bound or attached index."""
    found = discover_image_index(reference, registry=registry, policy=policy,
                                 progress=progress)
    # Pinned to the manifest the index was made for: a tag that moves later cannot make the
    # daemon (or a --reattach) look for the layers in another image.
    pinned = _pinned(reference, found.image.manifest)
    layers = []
    for layer in found.image.layers:
        meta, zinfo = found.layer_paths(layer)
        layers.append(ImageLayer(source=pinned, meta=meta, zinfo=zinfo, blob=layer.digest,
                                 trust=found.trust[layer.digest],
                                 prefetch=found.prefetch_path(layer)))
    if not layers:
        raise InvalidInput(f"{reference}: image {found.image.manifest} has no layers")
    return ImagePlan(found.image.platform, found.image.manifest, tuple(layers))


@dataclass(frozen=True, slots=True)
class LayerIndexSource:
    """The index files of one layer, found for a node, and how they were obtained (BOUND,
    SIGNED, UNBOUND or LOCAL, sources/gate.py). `source` is REPO@MANIFEST (pinned);
    `origin` the artifact or manifest digest the files came from."""

    source: str
    blob: str
    meta: Path
    zinfo: Path
    sidecar: Path
    trust: str
    origin: str
    prefetch: Path | None = None  # a prefetch profile the image binds (bound only)
    later: ZinfoLater | None = None  # `zinfo` is not here yet: fetched by the mount daemon

    @property
    def restricted(self) -> bool:
        """Mount it nosuid,nodev (and verify it in the background)."""
        return self.trust == UNBOUND


def resolve_layer_index(image_ref: str, manifest_digest: str, layer_digest: str,
                        labels: Mapping[str, str] | None = None, *,
                        registry: RegistryOptions,
                        policy: TrustPolicy | None = None) -> LayerIndexSource:
    """The index of one layer of an image, for a node that knows the image by reference and
    manifest digest (containerd's snapshotter labels `cri.image-ref`, `cri.manifest-digest`
    and `cri.layer-digest`), with the layer descriptor's annotations as `labels`.

    Bound: labels carrying `containerd.io/snapshot/hybrid-erofs/sidecar.digest` (the image's
    manifest names the index, containerd verified the manifest): the files are fetched from
    the image's repository by digest -> trust BOUND (and the prefetch profile the labels
    bind, if any: `prefetch`; with the profile zinfo they bind too, the zinfo is left for
    the mount daemon to fetch after the profile's spans: `later`). Otherwise discovery in the registry
    under `policy`: a signed artifact -> SIGNED, an unbound one only with
    `policy.accept_unbound` -> UNBOUND (mount it nosuid,nodev: `restricted`), a small layer
    indexed here -> LOCAL.

    Raises TrustError (an unbound index the policy refuses; the message names the flags),
    RegistryError (no index at all, or the registry failed), InvalidInput (not a gzip layer,
    or the layer is not in the manifest); the files are cached under the cache directory.
    """
    ref = parse_reference(image_ref)
    pinned = f"{ref.registry}/{ref.repository}@{manifest_digest}"
    options = replace(registry, platform=None, layer=None, blob=None)
    sidecar = bound_sidecar(labels or {}, layer=layer_digest)
    if sidecar is not None:
        profile = bound_prefetch(labels or {}, layer=layer_digest)
        transit = bound_transit(labels or {}, layer=layer_digest)
        profile_zinfo = bound_prefetch_zinfo(labels or {}, layer=layer_digest)
        with registry_client(pinned, options, what="fetching the bound index") as client:
            files = fetch_bound_files(client, layer_digest, sidecar,
                                      indexes_dir(options) / "bound", prefetch=profile,
                                      transit=transit, prefetch_zinfo=profile_zinfo)
        return LayerIndexSource(pinned, layer_digest, files.meta, files.zinfo, files.sidecar,
                                BOUND, manifest_digest, prefetch=files.prefetch,
                                later=files.later)
    found = discover_image_index(
        pinned, registry=options, policy=policy,
        layers=lambda image: [layer for layer in image.layers if layer.digest == layer_digest])
    if layer_digest not in found.layer_dirs:
        raise InvalidInput(f"{pinned}: layer {layer_digest} is not one of the manifest's")
    names = layer_file_names(layer_digest)
    directory = found.layer_dirs[layer_digest]
    return LayerIndexSource(pinned, layer_digest, directory / names["meta"],
                            directory / names["zinfo"], directory / names["sidecar"],
                            found.trust[layer_digest], found.artifact)


def plan_from_index(index_dir: str | os.PathLike[str], reference: str, *,
                    registry: RegistryOptions,
                    progress: Callable[[str], None] | None = None) -> ImagePlan:
    """The layers of `reference` as `index REF --all-layers -o INDEX_DIR` indexed them, for
    `mount-image --index-dir` (--platform picks among several platforms): the user's own
    files (LOCAL trust), which must still match index.json (InvalidInput or IndexFormatError
    naming the layer digest otherwise); layers skipped for their size are indexed here, as a
    mount from the registry does. Each layer's source is `reference`, its blob digest
    selecting it."""
    say = progress or (lambda _line: None)
    directory = Path(index_dir)
    where = str(directory / INDEX_NAME)
    index = load_image_index(directory)
    image = select_image(index.images, registry.platform, where=where)
    if not image.layers:
        raise InvalidInput(f"{where}: image {image.manifest} ({image.platform}) has no layers")
    layers: list[ImageLayer] = []
    for layer in image.layers:
        dirs: dict[str, Path] = {}
        if layer.status == INDEXED:
            verify_layer_files(directory, layer)
            dirs[layer.digest] = directory
        elif layer.status == SKIPPED_SMALL:
            _unindexed(reference, image.manifest, layer, registry=registry, dirs=dirs,
                       trust={}, say=say, span=index.span, platform=image.platform)
        else:
            raise InvalidInput(f"{reference}: layer {layer.digest} ({layer.media_type}) is "
                               f"not a gzip layer: it cannot be mounted lazily")
        names = layer_file_names(layer.digest)
        prefetch = (directory / layer.prefetch.name  # checked with the layer's other files
                    if layer.status == INDEXED and layer.prefetch is not None else None)
        layers.append(ImageLayer(source=reference, meta=dirs[layer.digest] / names["meta"],
                                 zinfo=dirs[layer.digest] / names["zinfo"], blob=layer.digest,
                                 prefetch=prefetch))
    return ImagePlan(image.platform, image.manifest, tuple(layers))


def index_on_node(reference: str, manifest_digest: str, layer: LayerEntry, *,
                  registry: RegistryOptions, span: int, platform: str | None = None) -> Path:
    """Index a (small) layer here, exactly as `index --all-layers` would have; cached.
    `platform` picks the image in an `oci:` layout whose tag names an index."""
    directory = indexes_dir(registry) / "layers"
    if existing_outputs(directory, layer.digest, span=span) is None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HybridErofsError(f"{directory}: cannot create: {exc.strerror}") from exc
        job = LayerJob(layer.digest, layer.size, layer.diff_id,
                       _layer_reference(reference, manifest_digest),
                       platform if is_layout_reference(reference) else None)
        _index_job(job, directory, span, replace(registry, platform=None),
                   default_build_time())
    return directory


__all__ = [
    "DiscoveredImage",
    "LayerIndexSource",
    "choose_layer",
    "discover_image_index",
    "discover_image_plan",
    "discover_layer",
    "index_on_node",
    "indexes_dir",
    "plan_from_index",
    "resolve_layer_index",
]
