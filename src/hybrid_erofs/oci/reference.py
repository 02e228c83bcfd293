"""Image references: parse `[registry[:port]/]repository[:tag][@digest]` into a Reference.

Grammar from the distribution spec (DS:151-158 names and tags) and docker/distribution's
reference package (which first component is a registry, Docker Hub normalisation).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# DS:151-158: <name> components and <reference> tags.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# DS "Pulling manifests" / image-spec descriptor.md: algorithm ":" encoded.
_DIGEST = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HOST_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?")
_MAX_NAME = 255  # docker/distribution NameTotalLengthMax


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed image reference.

    `registry` is canonical (`docker.io` for Docker Hub, else `host[:port]` as written, lower
    case); `tag` is "latest" when neither tag nor digest was given; `digest`, when present,
    is what the manifest is fetched by (a tag alongside it is informational, as in docker).
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """host[:port] to send API requests to (Docker Hub's API lives on registry-1)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def scheme(self) -> str:
        """"http" for loopback-like hosts (as ggcr's name.Registry.Scheme), else "https"."""
        return "http" if is_localhost(self.registry) else "https"

    @property
    def manifest_ref(self) -> str:
        """The tag or digest to put after /manifests/ (digest wins)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_localhost(registry: str) -> bool:
    """True for localhost, *.localhost, loopback IP literals, with or without a port."""
    host = split_host_port(registry)[0].lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(registry: str) -> tuple[str, int | None]:
    """`host[:port]` or `[v6]:port` -> (host without brackets, port or None)."""
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    else:
        host, sep, port_text = registry.rpartition(":")
        if not sep:
            return registry, None
        port = port_text
    return host, int(port) if port and port.isdigit() else None


def validate_digest(text: str, *, subject: str) -> str:
    """Return `text` if it is a supported digest (sha256/sha512, lowercase hex), else raise."""
    match = _DIGEST.fullmatch(text)
    if not match:
        raise InvalidReference(f"{subject}: digest {text!r} is not 'algorithm:hex'")
    algorithm, encoded = match.groups()
    want = _HEX_LENGTH.get(algorithm)
    if want is None:
        raise InvalidReference(
            f"{subject}: unsupported digest algorithm {algorithm!r} (sha256 or sha512)"
        )
    if len(encoded) != want or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise InvalidReference(
            f"{subject}: {algorithm} digest must be {want} lowercase hex digits "
            f"(got {len(encoded)} characters)"
        )
    return text


def _validate_registry(registry: str, text: str) -> str:
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidReference(f"{text}: {registry!r} is not a valid IPv6 literal") from None
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise InvalidReference(f"{text}: unexpected {rest!r} after IPv6 literal")
    else:
        host, sep, port_text = registry.partition(":")
        port = port_text if sep else None
        if not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
            raise InvalidReference(f"{text}: registry host {host!r} is not a valid host name")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise InvalidReference(f"{text}: registry port {port!r} is not a number in 1..65535")
    return registry.lower()


def parse_reference(text: str) -> Reference:
    """Parse an image reference; raise InvalidReference saying what is wrong with it.

    Examples: `alpine` -> docker.io/library/alpine:latest; `127.0.0.1:5000/a/b@sha256:…`;
    `ghcr.io/o/r:v1@sha256:…` (the digest decides what is fetched).
    """
    if not text or text != text.strip():
        raise InvalidReference(f"{text!r}: empty reference or surrounding white space")
    rest, at, digest = text.partition("@")
    if at:
        validate_digest(digest, subject=text)
    # docker/distribution: the first component is a registry when it contains "." or ":",
    # is "localhost", or has upper-case letters (repository names never do).
    first, slash, remainder = rest.partition("/")
    if slash and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    ):
        registry = _validate_registry(first, text)
        rest = remainder
    else:
        registry = DOCKER_HUB
    name, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        name, tag = rest, ""
    elif not _TAG.fullmatch(tag):
        raise InvalidReference(
            f"{text}: tag {tag!r} must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}"
        )
    if not name:
        raise InvalidReference(f"{text}: missing repository name")
    for component in name.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise InvalidReference(
                f"{text}: repository component {component!r} must be lowercase letters, "
                "digits and single separators (., _, __, -)"
            )
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in name:
            name = f"library/{name}"
    if len(name) > _MAX_NAME:
        raise InvalidReference(f"{text}: repository name longer than {_MAX_NAME} characters")
    return Reference(
        registry=registry,
        repository=name,
        tag=tag or (None if at else "latest"),
        digest=digest or None,
    )
