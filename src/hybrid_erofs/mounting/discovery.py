"""Where a node gets an image's index: from its registry (the artifact attached to the image's
platform manifest, fetched into the cache, digests verified) or from a local directory that
`index --all-layers -o DIR` wrote. Either way each layer's files are checked against index.json,
and layers skipped for their size are indexed here (they are small). Without an artifact: a
clear error naming the command that makes one, never a full pull.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..device import RegistryOptions
from ..errors import HybridErofsError, IndexFormatError, InvalidInput, RegistryError
from ..indexing.image import (
    LayerJob,
    _index_job,
    _layer_reference,
    default_build_time,
    existing_outputs,
)
from ..indexing.imageindex import (
    ARTIFACT_TYPE,
    INDEX_NAME,
    INDEXED,
    SKIPPED_SMALL,
    ImageEntry,
    LayerEntry,
    layer_file_names,
    load_image_index,
    parse_image_index,
    verify_layer_files,
)
from ..indexing.publish import artifact_stem, registry_client
from ..oci.artifact import fetch_artifact, find_artifacts
from ..oci.layout import is_layout_reference
from ..oci.reference import parse_reference
from ..sources.cachedir import default_cache_dir
from .image import ImageLayer, ImagePlan, select_image

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DiscoveredImage:
    """An image's index fetched from its registry: the platform's entry and where each
    layer's files are (the artifact's directory in the cache, or a node-side index)."""

    image: ImageEntry
    artifact: str  # digest of the artifact manifest
    layer_dirs: dict[str, Path]  # blob digest -> directory holding its layer_file_names()

    def layer_paths(self, layer: LayerEntry) -> tuple[Path, Path]:
        """(meta, zinfo) of `layer`."""
        names = layer_file_names(layer.digest)
        directory = self.layer_dirs[layer.digest]
        return directory / names["meta"], directory / names["zinfo"]

def indexes_dir(registry: RegistryOptions) -> Path:
    return (registry.cache_dir or default_cache_dir()) / "indexes"

def discover_image_index(reference: str, *, registry: RegistryOptions,
                         layers: Callable[[ImageEntry], list[LayerEntry]] | None = None,
                         progress: Callable[[str], None] | None = None) -> DiscoveredImage:
    """Find, fetch and verify the index attached to `reference`'s platform manifest.

    `layers` chooses the layers that will be mounted (default: all); those skipped for
    their size are indexed here, from the registry, into the cache.
    """
    say = progress or (lambda _line: None)
    with registry_client(reference, registry, what="finding the index") as client:
        manifest = client.resolve(registry.platform)
        found = find_artifacts(client, manifest.digest, artifact_type=ARTIFACT_TYPE)
        if not found:
            raise RegistryError(
                f"{reference}: no hybrid-erofs index is attached to image {manifest.digest}; "
                f"make one in CI with `hybrid-erofs index {reference} --all-layers -o DIR "
                f"--push` (or mount with --meta/--zinfo)")
        errors: list[str] = []
        for descriptor in reversed(found):  # the last attached first
            dest = indexes_dir(registry) / artifact_stem(descriptor.digest)
            try:
                files = fetch_artifact(client, descriptor, dest)
                if INDEX_NAME not in files:
                    raise IndexFormatError(f"artifact {descriptor.digest} has no {INDEX_NAME}")
                index = parse_image_index(files[INDEX_NAME].read_bytes(),
                                          name=str(files[INDEX_NAME]))
                image = index.for_manifest(manifest.digest).images[0]
            except HybridErofsError as exc:
                errors.append(str(exc))
                log.warning("%s: skipping artifact %s: %s", reference, descriptor.digest, exc)
                continue
            say(f"{reference}: index {descriptor.digest[:19]}... for {image.platform}")
            break
        else:
            raise RegistryError(f"{reference}: no usable hybrid-erofs index attached to "
                                f"{manifest.digest}: {'; '.join(errors)}")
    chosen = layers(image) if layers is not None else list(image.layers)
    layer_dirs: dict[str, Path] = {}
    for layer in chosen:
        if layer.status == INDEXED:
            verify_layer_files(dest, layer)
            layer_dirs[layer.digest] = dest
        else:
            layer_dirs[layer.digest] = _small_layer_dir(reference, image, layer,
                                                        registry=registry, span=index.span,
                                                        say=say)
    return DiscoveredImage(image, descriptor.digest, layer_dirs)

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

def discover_layer(reference: str, *, registry: RegistryOptions,
                   progress: Callable[[str], None] | None = None
                   ) -> tuple[str, Path, Path, RegistryOptions]:
    """(source pinned to the indexed manifest, meta, zinfo, options naming the layer's blob)
    for `mount REF` without --meta."""
    found = discover_image_index(
        reference, registry=registry, progress=progress,
        layers=lambda image: [choose_layer(image, registry, reference=reference)])
    (digest,) = found.layer_dirs
    layer = next(layer for layer in found.image.layers if layer.digest == digest)
    meta, zinfo = found.layer_paths(layer)
    ref = parse_reference(reference)
    pinned = f"{ref.registry}/{ref.repository}@{found.image.manifest}"
    return pinned, meta, zinfo, replace(registry, blob=digest, layer=None, platform=None)

def discover_image_plan(reference: str, *, registry: RegistryOptions,
                        progress: Callable[[str], None] | None = None) -> ImagePlan:
    """Every layer of `reference` for mount-image, from the index attached to it."""
    found = discover_image_index(reference, registry=registry, progress=progress)
    # Pinned to the manifest the index was made for: a tag that moves later cannot make the
    # daemon (or a --reattach) look for the layers in another image.
    ref = parse_reference(reference)
    pinned = f"{ref.registry}/{ref.repository}@{found.image.manifest}"
    layers = []
    for layer in found.image.layers:
        meta, zinfo = found.layer_paths(layer)
        layers.append(ImageLayer(source=pinned, meta=meta, zinfo=zinfo, blob=layer.digest))
    if not layers:
        raise InvalidInput(f"{reference}: image {found.image.manifest} has no layers")
    return ImagePlan(found.image.platform, found.image.manifest, tuple(layers))

def plan_from_index(index_dir: str | os.PathLike[str], reference: str, *,
                    registry: RegistryOptions,
                    progress: Callable[[str], None] | None = None) -> ImagePlan:
    """The layers of `reference` as `index REF --all-layers -o INDEX_DIR` indexed them, for
    `mount-image --index-dir` (--platform picks among several platforms).

    The files of indexed layers must match index.json (InvalidInput or IndexFormatError naming
    the layer digest otherwise); layers skipped for their size are indexed here, as a mount
    from the registry does. Each layer's source is `reference`, its blob digest selecting it.
    """
    say = progress or (lambda _line: None)
    directory = Path(index_dir)
    where = str(directory / INDEX_NAME)
    index = load_image_index(directory)
    image = select_image(index.images, registry.platform, where=where)
    if not image.layers:
        raise InvalidInput(f"{where}: image {image.manifest} ({image.platform}) has no layers")
    layers: list[ImageLayer] = []
    for layer in image.layers:
        if layer.status == INDEXED:
            verify_layer_files(directory, layer)
            layer_dir = directory
        else:
            layer_dir = _small_layer_dir(reference, image, layer, registry=registry,
                                         span=index.span, say=say)
        names = layer_file_names(layer.digest)
        layers.append(ImageLayer(source=reference, meta=layer_dir / names["meta"],
                                 zinfo=layer_dir / names["zinfo"], blob=layer.digest))
    return ImagePlan(image.platform, image.manifest, tuple(layers))

def _small_layer_dir(reference: str, image: ImageEntry, layer: LayerEntry, *,
                     registry: RegistryOptions, span: int, say: Callable[[str], None]) -> Path:
    """Where a layer that was not indexed gets its files: indexed on this node when it was
    skipped for its size; InvalidInput when it cannot be indexed at all."""
    if layer.status != SKIPPED_SMALL:
        raise InvalidInput(f"{reference}: layer {layer.digest} ({layer.media_type}) is not "
                           f"a gzip layer: it cannot be mounted lazily")
    directory = index_on_node(reference, image.manifest, layer, registry=registry, span=span,
                              platform=image.platform)
    say(f"{layer.digest[:19]}... ({layer.size} bytes) indexed on this node")
    return directory

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
    "choose_layer",
    "discover_image_index",
    "discover_image_plan",
    "discover_layer",
    "index_on_node",
    "indexes_dir",
    "plan_from_index",
]
