"""Publish an image's indexes in its registry (the node side is mounting/discovery.py).

push_image_index(): one OCI artifact per platform manifest (subject = that manifest), holding
that platform's index.json and each indexed layer's zinfo, sidecar and meta (oci/artifact.py
pushes it through the Referrers API or the `sha256-<hex>` fallback tag); the zinfo and the meta
as gzip blobs (GZIP_TRANSIT: about 45 % and 18 % of their size).
publish_bound_image(): the image again, each indexed layer descriptor annotated with its
sidecar's digest, its prefetch profile's and its gzip blobs' (trust/bound.py), so the new image
digest covers the index and the profile: its reference by digest is the `pull_ref` nodes
should use.
Optionally both are signed (cosign layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..device import RegistryOptions
from ..errors import InvalidInput
from ..oci.artifact import ArtifactFile, push_artifact
from ..oci.client import Descriptor, Manifest, RegistryClient
from ..oci.credentials import resolve_credentials
from ..oci.layout import is_layout_reference
from ..oci.reference import parse_reference
from ..oci.transit import gzip_file, is_gzip_of
from ..outfile import write_atomic
from ..units import counted
from .imageindex import (
    ARTIFACT_TYPE,
    GZIP_TRANSIT,
    INDEX_MEDIA_TYPE,
    INDEX_NAME,
    INDEXED,
    META_MEDIA_TYPE,
    PREFETCH_MEDIA_TYPE,
    PREFETCH_ZINFO_MEDIA_TYPE,
    SIDECAR_MEDIA_TYPE,
    ZINFO_MEDIA_TYPE,
    FileRef,
    ImageEntry,
    ImageIndex,
    LayerEntry,
    dump_image_index,
    file_digest,
    transit_file_name,
    verify_layer_files,
)

log = logging.getLogger(__name__)


def registry_client(reference: str, registry: RegistryOptions, *, what: str) -> RegistryClient:
    if is_layout_reference(reference):
        raise InvalidInput(f"{reference}: {what} needs a registry reference (an OCI layout has "
                           f"no registry to hold the index)")
    ref = parse_reference(reference)
    credentials = resolve_credentials(ref, username=registry.username,
                                      password=registry.password)
    return RegistryClient(ref, transport=registry.transport, credentials=credentials,
                          insecure=registry.insecure)


def artifact_stem(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}-{encoded}"


def transit_copies(directory: Path, layer: LayerEntry) -> dict[str, FileRef]:
    """The gzip blobs that the zinfo and the meta of an indexed `layer` travel as: kind ->
    DIR/<name>.gz, made here (deterministic: the same file gives the same blob), or kept when
    it already inflates to the file."""
    copies: dict[str, FileRef] = {}
    for kind in GZIP_TRANSIT:
        ref = layer.files.get(kind)
        if ref is None:
            continue
        target = directory / transit_file_name(ref.name)
        if not is_gzip_of(target, digest=ref.digest, size=ref.size):
            gzip_file(directory / ref.name, target)
        digest, size = file_digest(target)
        copies[kind] = FileRef(target.name, digest, size)
    return copies


def artifact_files(directory: Path, image: ImageEntry, index: ImageIndex) -> list[ArtifactFile]:
    """The blobs of one platform's artifact: its own index.json, then per indexed layer (in
    manifest order, each blob once) zinfo, sidecar, meta and a prefetch profile when it has
    one. Verified against index.json. The zinfo and the meta are their gzip blobs
    (transit_copies), titled with the names of the files they inflate to."""
    own = index.for_manifest(image.manifest)
    own_path = directory / f"{artifact_stem(image.manifest)}.{INDEX_NAME}"
    write_atomic(own_path, dump_image_index(own))
    files = [ArtifactFile(INDEX_NAME, INDEX_MEDIA_TYPE, own_path)]
    seen: set[str] = set()
    types = {"zinfo": ZINFO_MEDIA_TYPE, "sidecar": SIDECAR_MEDIA_TYPE, "meta": META_MEDIA_TYPE,
             "prefetch": PREFETCH_MEDIA_TYPE, "prefetch_zinfo": PREFETCH_ZINFO_MEDIA_TYPE}
    for layer in image.layers:
        if layer.status != INDEXED or layer.digest in seen:
            continue
        seen.add(layer.digest)
        verify_layer_files(directory, layer)
        copies = transit_copies(directory, layer)
        for kind, ref in layer.files.items():
            if kind in copies:
                files.append(ArtifactFile(ref.name, GZIP_TRANSIT[kind],
                                          directory / copies[kind].name))
            else:
                files.append(ArtifactFile(ref.name, types[kind], directory / ref.name))
    return files


def push_image_index(reference: str, directory: Path, index: ImageIndex, *,
                     registry: RegistryOptions,
                     progress: Callable[[str], None] | None = None) -> list[dict[str, object]]:
    """Attach each platform's outputs to its manifest; pushing the same outputs twice changes
    nothing. Returns one summary per platform (for the CLI and --json)."""
    say = progress or (lambda _line: None)
    results: list[dict[str, object]] = []
    with registry_client(reference, registry, what="--push") as client:
        for image in index.images:
            files = artifact_files(directory, image, index)
            subject = Descriptor(image.manifest_media_type, image.manifest, image.manifest_size)
            report = push_artifact(client, subject, files, artifact_type=ARTIFACT_TYPE,
                                   progress=say)
            if report.blobs_uploaded or report.manifest_pushed or report.tag_updated:
                summary = (f"{counted(report.blobs_uploaded, 'blob')} uploaded, "
                           f"{report.blobs_present} already there, referrers via "
                           f"{report.referrers}")
            else:
                summary = "already there, nothing pushed"
            results.append({"platform": image.platform,
                            "subject": {"digest": image.manifest},
                            "artifact": {"digest": report.manifest_digest}, "summary": summary,
                            "blobs_uploaded": report.blobs_uploaded,
                            "blobs_present": report.blobs_present,
                            "manifest_pushed": report.manifest_pushed,
                            "referrers": report.referrers, "tag_updated": report.tag_updated})
    return results


@dataclass(frozen=True, slots=True)
class BoundImage:
    """What publish_bound_image did: `pull_ref` is REPO@DIGEST of the image to give nodes
    (the reference as given, pinned, when nothing was published)."""

    pull_ref: str
    published: bool
    manifests: dict[str, str]  # platform manifest digest -> its bound copy's digest
    signatures: tuple[str, ...] = ()  # digests of the signature manifests written


def _bound_manifest(original: Manifest, image: ImageEntry,
                    transit: Mapping[str, Mapping[str, FileRef]] | None = None) -> bytes | None:
    """`original` with each indexed layer descriptor annotated (trust/bound.py; `transit`:
    layer digest -> its transit_copies()); None when no layer of it is indexed (there is
    nothing to bind)."""
    from ..trust.bound import layer_annotations

    document = json.loads(original.body)
    indexed = {layer.digest: layer for layer in image.layers
               if layer.status == INDEXED and layer.sidecar is not None}
    changed = False
    for descriptor in document.get("layers", []):
        layer = indexed.get(descriptor.get("digest"))
        if layer is None or layer.sidecar is None:
            continue
        annotations = dict(descriptor.get("annotations") or {})
        annotations.update(layer_annotations(layer.sidecar, layer.prefetch,
                                             (transit or {}).get(layer.digest),
                                             prefetch_zinfo=layer.prefetch_zinfo))
        descriptor["annotations"] = annotations
        changed = True
    return json.dumps(document, separators=(",", ":")).encode() if changed else None


def publish_bound_image(reference: str, index: ImageIndex, directory: Path, *,
                        registry: RegistryOptions, sign_key: bytes | None = None,
                        progress: Callable[[str], None] | None = None) -> BoundImage:
    """Push each indexed platform manifest again with its layers annotated, and (for a
    multi-platform image) an image index listing them in place of the originals. Layers,
    config and every other field stay as they are, so containerd pulls the same content;
    the index files (in `directory`) must already be in the repository (push_image_index).
    Pushing the same index again writes nothing new. With `sign_key` (PEM), the new image is signed.
    """
    say = progress or (lambda _line: None)
    ref = parse_reference(reference)
    repository = f"{ref.registry}/{ref.repository}"
    with registry_client(reference, registry, what="--push") as client:
        top = client.get_manifest()
        replaced: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for image in index.images:
            original = client.get_manifest(image.manifest, expected_digest=image.manifest)
            transit = {layer.digest: transit_copies(directory, layer)
                       for layer in image.layers if layer.status == INDEXED}
            body = _bound_manifest(original, image, transit)
            if body is None:
                continue
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if not client.head_manifest(digest):
                client.put_manifest(digest, body, media_type=original.media_type)
            replaced[image.manifest] = digest
            sizes[digest] = len(body)
            say(f"{image.platform}: bound image manifest {digest}")
        if not replaced:
            return BoundImage(f"{repository}@{top.digest}", False, {})
        if top.is_index:
            document = json.loads(top.body)
            found = 0
            for entry in document.get("manifests", []):
                new = replaced.get(entry.get("digest"))
                if new is not None:
                    entry["digest"], entry["size"] = new, sizes[new]
                    found += 1
            if found != len(replaced):
                raise InvalidInput(f"{reference}: now names another image than the one indexed "
                                   f"(the tag moved?): index it again")
            body = json.dumps(document, separators=(",", ":")).encode()
            pull_digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if not client.head_manifest(pull_digest):
                client.put_manifest(pull_digest, body, media_type=top.media_type)
        elif top.digest in replaced:
            pull_digest = replaced[top.digest]
        else:  # pragma: no cover - the index was made from this reference
            raise InvalidInput(f"{reference}: the index is not for this image")
        signatures: tuple[str, ...] = ()
        if sign_key is not None:
            from ..trust.signature import sign_manifest

            signatures = (sign_manifest(client, pull_digest, sign_key),)
            say(f"signed {pull_digest}")
    return BoundImage(f"{repository}@{pull_digest}", True, replaced, signatures)


def sign_artifacts(reference: str, artifacts: list[str], *, registry: RegistryOptions,
                   sign_key: bytes) -> list[str]:
    """Sign each artifact manifest digest (cosign layout): nodes that trust the key then use
    these indexes for the original image too. Returns the signature manifests' digests."""
    from ..trust.signature import sign_manifest

    with registry_client(reference, registry, what="--sign-key") as client:
        return [sign_manifest(client, digest, sign_key) for digest in artifacts]


__all__ = ["BoundImage", "artifact_files", "artifact_stem", "publish_bound_image",
           "push_image_index", "registry_client", "sign_artifacts", "transit_copies"]
