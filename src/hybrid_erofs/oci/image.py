"""Image metadata: resolve a reference (registry or `oci:` layout) to its platform manifest and
config, and refuse malformed images (config media type, rootfs, diff_ids) before any mount.

Config fields as image-spec config.md and Docker's image JSON spec v1.2 name them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import httpx

from ..errors import RegistryError
from .client import CONFIG_TYPES, Descriptor, Manifest, RegistryClient, parse_descriptor
from .credentials import resolve_credentials
from .layout import LayoutClient, is_layout_reference
from .platform import Platform
from .reference import parse_reference, validate_digest


class ImageClient(Protocol):
    """What inspect_image needs: RegistryClient and LayoutClient both provide it."""

    def resolve(self, platform: Platform | str | None = None) -> Manifest: ...

    def fetch_blob(self, descriptor: Descriptor, *, max_size: int = ...) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config that say how the container runs and what it is built of.

    `entrypoint`/`cmd` are None when the config does not set them (not the same as empty).
    """

    os: str
    architecture: str
    variant: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    diff_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """A resolved, validated single-platform image: manifest digest, config and layers."""

    reference: str
    manifest_digest: str
    manifest_media_type: str
    config_descriptor: Descriptor
    config: ImageConfig
    layers: tuple[Descriptor, ...]

    def to_json(self) -> dict[str, object]:
        c = self.config
        return {
            "reference": self.reference,
            "manifest": {"digest": self.manifest_digest, "mediaType": self.manifest_media_type},
            "config": {"digest": self.config_descriptor.digest,
                       "mediaType": self.config_descriptor.media_type,
                       "size": self.config_descriptor.size},
            "os": c.os, "architecture": c.architecture, "variant": c.variant,
            "entrypoint": list(c.entrypoint) if c.entrypoint is not None else None,
            "cmd": list(c.cmd) if c.cmd is not None else None,
            "env": list(c.env), "working_dir": c.working_dir, "user": c.user,
            "labels": dict(c.labels),
            "layers": [{"blob": {"digest": d.digest, "mediaType": d.media_type, "size": d.size},
                        "layer": {"digest": diff_id}}
                       for d, diff_id in zip(self.layers, c.diff_ids, strict=True)],
        }


def open_image_client(
    reference: str, *, username: str | None = None, password: str | None = None,
    insecure: bool = False, transport: httpx.BaseTransport | None = None,
) -> RegistryClient | LayoutClient:
    """A LayoutClient for `oci:DIR[:TAG]`, else a RegistryClient with resolved credentials."""
    if is_layout_reference(reference):
        return LayoutClient(reference)
    ref = parse_reference(reference)
    credentials = resolve_credentials(ref, username=username, password=password)
    return RegistryClient(ref, transport=transport, credentials=credentials, insecure=insecure)


def inspect_image(client: ImageClient, reference: str,
                  platform: Platform | str | None = None) -> ImageInfo:
    """Resolve `platform`'s manifest, fetch and check its config; raise RegistryError naming
    the offending digest when the image is malformed."""
    return inspect_manifest(client, client.resolve(platform), reference)


def inspect_manifest(client: ImageClient, manifest: Manifest, reference: str) -> ImageInfo:
    """Fetch and check the config of an image manifest (see inspect_image)."""
    if manifest.is_index:
        raise RegistryError(f"{manifest.digest}: an image index, not an image manifest")
    subject = manifest.digest
    raw_config = manifest.data.get("config")
    if raw_config is None:
        raise RegistryError(f"{subject}: manifest has no config descriptor")
    config_descriptor = parse_descriptor(raw_config, subject)
    if config_descriptor.media_type not in CONFIG_TYPES:
        raise RegistryError(
            f"{subject}: config {config_descriptor.digest} has media type "
            f"{config_descriptor.media_type!r}, not an image config (an artifact, not an image?)"
        )
    raw_layers = manifest.data.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"{subject}: manifest has no 'layers' list")
    layers = tuple(parse_descriptor(raw, subject) for raw in raw_layers)
    config = parse_image_config(client.fetch_blob(config_descriptor),
                                digest=config_descriptor.digest)
    if len(config.diff_ids) != len(layers):
        raise RegistryError(
            f"{config_descriptor.digest}: config lists {len(config.diff_ids)} diff_ids but "
            f"manifest {subject} has {len(layers)} layers"
        )
    return ImageInfo(reference, manifest.digest, manifest.media_type, config_descriptor,
                     config, layers)


def parse_image_config(body: bytes, *, digest: str) -> ImageConfig:
    """Parse an image config; `rootfs.type` must be "layers" and fields must have their types."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise RegistryError(f"{digest}: config is not JSON ({len(body)} bytes)") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{digest}: config is not a JSON object")
    rootfs = data.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        found = rootfs.get("type") if isinstance(rootfs, dict) else None
        raise RegistryError(f"{digest}: config rootfs.type is {found!r}, not 'layers'")
    diff_ids = _strings(rootfs.get("diff_ids"), digest, "rootfs.diff_ids") or ()
    for diff_id in diff_ids:
        validate_digest(diff_id, subject=f"{digest}: rootfs.diff_ids")
    run = data.get("config") or {}
    if not isinstance(run, dict):
        raise RegistryError(f"{digest}: config 'config' is not a JSON object")
    labels = run.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise RegistryError(f"{digest}: config.Labels is not an object of strings")
    return ImageConfig(
        os=_string(data.get("os"), digest, "os"),
        architecture=_string(data.get("architecture"), digest, "architecture"),
        variant=_string(data.get("variant"), digest, "variant"),
        entrypoint=_strings(run.get("Entrypoint"), digest, "config.Entrypoint"),
        cmd=_strings(run.get("Cmd"), digest, "config.Cmd"),
        env=_strings(run.get("Env"), digest, "config.Env") or (),
        working_dir=_string(run.get("WorkingDir"), digest, "config.WorkingDir"),
        user=_string(run.get("User"), digest, "config.User"),
        labels=tuple(sorted(labels.items())),
        diff_ids=diff_ids,
    )


def _string(value: object, digest: str, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RegistryError(f"{digest}: config {name} is not a string")
    return value


def _strings(value: object, digest: str, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistryError(f"{digest}: config {name} is not a list of strings")
    return tuple(value)
