"""Publish an image's indexes next to it in the registry (the node side is mounting/discovery.py).

push_image_index(): one OCI artifact per platform manifest (subject = that manifest), holding
that platform's index.json and each indexed layer's zinfo, sidecar and meta (oci/artifact.py
pushes it through the Referrers API or the `sha256-<hex>` fallback tag).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..device import RegistryOptions
from ..errors import InvalidInput
from ..oci.artifact import ArtifactFile, push_artifact
from ..oci.client import Descriptor, RegistryClient
from ..oci.credentials import resolve_credentials
from ..oci.layout import is_layout_reference
from ..oci.reference import parse_reference
from ..outfile import write_atomic
from ..units import counted
from .imageindex import (
    ARTIFACT_TYPE,
    INDEX_MEDIA_TYPE,
    INDEX_NAME,
    INDEXED,
    META_MEDIA_TYPE,
    SIDECAR_MEDIA_TYPE,
    ZINFO_MEDIA_TYPE,
    ImageEntry,
    ImageIndex,
    dump_image_index,
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


def artifact_files(directory: Path, image: ImageEntry, index: ImageIndex) -> list[ArtifactFile]:
    """The blobs of one platform's artifact: its own index.json, then per indexed layer (in
    manifest order, each blob once) zinfo, sidecar and meta. Verified against index.json."""
    own = index.for_manifest(image.manifest)
    own_path = directory / f"{artifact_stem(image.manifest)}.{INDEX_NAME}"
    write_atomic(own_path, dump_image_index(own))
    files = [ArtifactFile(INDEX_NAME, INDEX_MEDIA_TYPE, own_path)]
    seen: set[str] = set()
    types = {"zinfo": ZINFO_MEDIA_TYPE, "sidecar": SIDECAR_MEDIA_TYPE, "meta": META_MEDIA_TYPE}
    for layer in image.layers:
        if layer.status != INDEXED or layer.digest in seen:
            continue
        seen.add(layer.digest)
        verify_layer_files(directory, layer)
        for kind, ref in layer.files.items():
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
            results.append({"platform": image.platform, "subject": image.manifest,
                            "artifact": report.manifest_digest, "summary": summary,
                            "blobs_uploaded": report.blobs_uploaded,
                            "blobs_present": report.blobs_present,
                            "manifest_pushed": report.manifest_pushed,
                            "referrers": report.referrers, "tag_updated": report.tag_updated})
    return results


__all__ = ["artifact_files", "artifact_stem", "push_image_index", "registry_client"]
