"""Platforms `os/arch[/variant]`: parsing, normalisation (containerd/platforms normalizeArch)
and choosing a manifest from an image index (image-spec image-index.md: first match wins)."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass

from ..errors import InvalidInput

_ARCH_ALIASES = {"aarch64": "arm64", "x86_64": "amd64", "x86-64": "amd64", "i386": "386",
                 "i686": "386", "armhf": "arm", "armel": "arm"}
_ARCH_DEFAULT_VARIANT = {"armhf": "v7", "armel": "v6"}


@dataclass(frozen=True, slots=True)
class Platform:
    """A normalised platform. An empty variant in a *wanted* platform matches any variant."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def normalize(os_name: str, architecture: str, variant: str = "") -> Platform:
    """containerd normalizeArch: aarch64/arm64 v8 -> arm64, x86_64 -> amd64 (v1 dropped),
    arm without variant -> v7, armhf -> arm/v7, armel -> arm/v6."""
    arch = architecture.lower()
    variant = variant.lower() or _ARCH_DEFAULT_VARIANT.get(arch, "")
    arch = _ARCH_ALIASES.get(arch, arch)
    if variant and variant[0].isdigit():
        variant = "v" + variant
    if (arch, variant) in (("arm64", "v8"), ("arm64", "v8.0"), ("amd64", "v1")):
        variant = ""
    elif arch == "arm" and not variant:
        variant = "v7"
    return Platform(os_name.lower(), arch, variant)


def parse_platform(text: str) -> Platform:
    """Parse `os/arch[/variant]` (e.g. linux/arm64/v8) into a normalised Platform."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise InvalidInput(f"platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
    return normalize(*parts)


def host_platform() -> Platform:
    """The platform of this machine (linux/<normalised uname -m>)."""
    return normalize("linux", _platform.machine() or "amd64")


def descriptor_platform(descriptor: dict[str, object]) -> Platform:
    """The platform of an index entry; one without `platform` is linux/amd64 (ggcr)."""
    raw = descriptor.get("platform")
    if not isinstance(raw, dict):
        return Platform("linux", "amd64")
    return normalize(str(raw.get("os", "")), str(raw.get("architecture", "")),
                     str(raw.get("variant", "") or ""))


def matches(wanted: Platform, offered: Platform) -> bool:
    """os and architecture equal; variant compared only when one is wanted (ggcr)."""
    return (
        wanted.os == offered.os
        and wanted.architecture == offered.architecture
        and (not wanted.variant or wanted.variant == offered.variant)
    )
