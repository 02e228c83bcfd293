"""LayoutClient: the RegistryClient API over a local OCI image layout (`oci:DIR[:TAG]`).

image-spec image-layout.md: `oci-layout`, `index.json` (tags in `org.opencontainers.image.ref.name`
annotations, as skopeo and umoci write them) and `blobs/<alg>/<hex>`. No HTTP; blobs are files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import InvalidReference, RegistryError
from ..source import FileSource
from .client import (
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    Descriptor,
    Manifest,
    parse_descriptor,
    parse_manifest,
    resolve_platform,
    select_layer,
    verify_blob,
)
from .platform import Platform
from .reference import validate_digest

LAYOUT_PREFIX = "oci:"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True, slots=True)
class LayoutReference:
    """`oci:DIR[:TAG]`: a layout directory and the tag (ref.name annotation) in its index.json.

    As in containers/image, the first ":" after `oci:` ends DIR (so DIR cannot contain one).
    """

    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"{LAYOUT_PREFIX}{self.path}" + (f":{self.tag}" if self.tag else "")


def is_layout_reference(text: str) -> bool:
    """True when `text` names an OCI image layout (`oci:DIR[:TAG]`)."""
    return text.startswith(LAYOUT_PREFIX)


def parse_layout_reference(text: str) -> LayoutReference:
    """Parse `oci:DIR[:TAG]`; raise InvalidReference for anything else."""
    if not is_layout_reference(text):
        raise InvalidReference(f"{text!r}: not an OCI layout reference (oci:DIR[:TAG])")
    directory, _, tag = text[len(LAYOUT_PREFIX):].partition(":")
    if not directory:
        raise InvalidReference(f"{text}: missing layout directory (oci:DIR[:TAG])")
    return LayoutReference(Path(directory), tag or None)


class LayoutClient:
    """Reads manifests and blobs of one OCI image layout, digests verified. Thread-safe
    (files are opened per call).

    Args:
        reference: `oci:DIR[:TAG]` (string or LayoutReference). Without TAG, index.json must
            hold exactly one entry (as skopeo requires).
    """

    def __init__(self, reference: LayoutReference | str) -> None:
        self.reference = (parse_layout_reference(reference) if isinstance(reference, str)
                          else reference)
        self.root = self.reference.path

    def blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = validate_digest(digest, subject=str(self.reference)).partition(":")
        return self.root / "blobs" / algorithm / encoded

    def fetch_blob(self, descriptor: Descriptor, *, max_size: int = MAX_MANIFEST_SIZE) -> bytes:
        """A small blob (manifest, config) read whole; its size and digest checked."""
        path = self.blob_path(descriptor.digest)
        if descriptor.size > max_size:
            raise RegistryError(f"{path}: blob of {descriptor.size} bytes is larger than "
                                f"{max_size} bytes")
        try:
            with open(path, "rb") as handle:
                body = handle.read(descriptor.size + 1)
        except FileNotFoundError as exc:
            raise RegistryError(f"{path}: blob {descriptor.digest} is missing from the layout"
                                ) from exc
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read: {exc.strerror}") from exc
        return verify_blob(body, descriptor)

    def open_blob(self, descriptor: Descriptor) -> FileSource:
        """The blob file as a ByteSource (not hashed here: the index pass and the sidecar's
        span digests verify layer bytes). A size other than the descriptor's is refused."""
        path = self.blob_path(descriptor.digest)
        if not path.is_file():
            raise RegistryError(f"{path}: blob {descriptor.digest} is missing from the layout")
        source = FileSource(path)
        if source.size != descriptor.size:
            source.close()
            raise RegistryError(f"{path}: blob {descriptor.digest} has {source.size} bytes, "
                                f"the manifest says {descriptor.size}")
        return source

    def get_manifest(self, digest: str, *, media_type: str | None = None) -> Manifest:
        """The manifest or index blob `digest`, checked as parse_manifest checks a registry's."""
        path = self.blob_path(digest)
        try:
            body = path.read_bytes()
        except FileNotFoundError as exc:
            raise RegistryError(f"{path}: manifest {digest} is missing from the layout") from exc
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read: {exc.strerror}") from exc
        return parse_manifest(body, media_type, subject=f"{self.reference}@{digest}",
                              expected_digest=digest)

    def top(self) -> Manifest:
        """What TAG names in index.json: a manifest, or an index to choose a platform from."""
        index = self._read_index()
        raw = index.data.get("manifests")
        entries = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
        tag = self.reference.tag
        if tag is None:
            if len(entries) != 1:
                raise RegistryError(f"{self.reference}: index.json has {len(entries)} entries; "
                                    f"name one as oci:DIR:TAG (tags: {_tags(entries)})")
            chosen = entries
        else:
            chosen = [e for e in entries if _ref_name(e) == tag]
            if not chosen:
                raise RegistryError(f"{self.reference}: no tag {tag!r} in index.json "
                                    f"(tags: {_tags(entries)})")
        if len(chosen) > 1:
            # One tag on several per-platform manifests: choose among them like an index.
            return Manifest(OCI_INDEX, index.digest, index.body, {"manifests": chosen})
        descriptor = parse_descriptor(chosen[0], str(self.reference))
        return self.get_manifest(descriptor.digest, media_type=descriptor.media_type or None)

    def resolve(self, platform: Platform | str | None = None) -> Manifest:
        """The image manifest for `platform` (default: this host's), via an index if any."""
        return resolve_platform(self.top(), self.get_manifest, platform,
                                subject=str(self.reference))

    def layer_descriptor(
        self, *, layer: int | None = None, blob: str | None = None,
        platform: Platform | str | None = None,
    ) -> Descriptor:
        """Resolve the reference to one gzip layer's descriptor (media type, digest, size)."""
        manifest = self.resolve(platform)
        return select_layer(manifest, layer=layer, blob=blob,
                            subject=f"{self.reference}@{manifest.digest}")

    def _read_index(self) -> Manifest:
        marker = self.root / "oci-layout"
        try:
            version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
        except FileNotFoundError as exc:
            raise RegistryError(f"{self.root}: not an OCI image layout (no oci-layout file)"
                                ) from exc
        except (OSError, ValueError, AttributeError) as exc:
            raise RegistryError(f"{marker}: unreadable or not a JSON object") from exc
        if not isinstance(version, str) or not version.startswith("1."):
            raise RegistryError(f"{marker}: unsupported imageLayoutVersion {version!r}")
        path = self.root / "index.json"
        try:
            body = path.read_bytes()
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read: {exc.strerror}") from exc
        index = parse_manifest(body, None, subject=str(path))
        if not index.is_index:
            raise RegistryError(f"{path}: not an image index")
        return index

    def close(self) -> None:
        pass

    def __enter__(self) -> LayoutClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _ref_name(entry: dict[str, object]) -> str | None:
    annotations = entry.get("annotations")
    name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return name if isinstance(name, str) else None


def _tags(entries: list[dict[str, object]]) -> str:
    return ", ".join(name for e in entries if (name := _ref_name(e)) is not None) or "none"


def open_layout_blob(
    reference: str, *, layer: int | None = None, blob: str | None = None,
    platform: str | None = None,
) -> tuple[FileSource, Descriptor]:
    """Resolve `oci:DIR[:TAG]` to one gzip layer and open its blob file."""
    client = LayoutClient(reference)
    descriptor = client.layer_descriptor(layer=layer, blob=blob, platform=platform)
    return client.open_blob(descriptor), descriptor
