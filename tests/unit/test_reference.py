"""parse_reference: the distribution grammar, Docker Hub normalisation, schemes, bad input."""

from __future__ import annotations

import pytest

from hybrid_erofs.errors import InvalidInput, InvalidReference
from hybrid_erofs.oci.reference import Reference, is_localhost, parse_reference

D256 = "sha256:" + "ab" * 32
D512 = "sha512:" + "cd" * 64

GOOD = [
    # text, registry, repository, tag, digest, api_host, scheme
    ("alpine", "docker.io", "library/alpine", "latest", None, "registry-1.docker.io", "https"),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", None, "registry-1.docker.io", "https"),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None,
     "registry-1.docker.io", "https"),
    ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", None,
     "registry-1.docker.io", "https"),
    ("registry-1.docker.io/user/app:v1", "docker.io", "user/app", "v1", None,
     "registry-1.docker.io", "https"),
    ("user/app", "docker.io", "user/app", "latest", None, "registry-1.docker.io", "https"),
    ("ghcr.io/o/r:v1.2_3-x", "ghcr.io", "o/r", "v1.2_3-x", None, "ghcr.io", "https"),
    (f"ghcr.io/o/r@{D256}", "ghcr.io", "o/r", None, D256, "ghcr.io", "https"),
    (f"ghcr.io/o/r:v1@{D256}", "ghcr.io", "o/r", "v1", D256, "ghcr.io", "https"),
    (f"quay.io/a/b/c@{D512}", "quay.io", "a/b/c", None, D512, "quay.io", "https"),
    ("localhost:5000/img", "localhost:5000", "img", "latest", None, "localhost:5000", "http"),
    ("localhost/img:t", "localhost", "img", "t", None, "localhost", "http"),
    ("127.0.0.1:5055/lab/img:multi", "127.0.0.1:5055", "lab/img", "multi", None,
     "127.0.0.1:5055", "http"),
    ("[::1]:5000/img", "[::1]:5000", "img", "latest", None, "[::1]:5000", "http"),
    ("reg.localhost:8080/a", "reg.localhost:8080", "a", "latest", None,
     "reg.localhost:8080", "http"),
    ("Registry.Example.com:443/a__b/c-d.e", "registry.example.com:443", "a__b/c-d.e",
     "latest", None, "registry.example.com:443", "https"),
    ("example.com/a---b", "example.com", "a---b", "latest", None, "example.com", "https"),
    ("10.0.0.1:5000/a", "10.0.0.1:5000", "a", "latest", None, "10.0.0.1:5000", "https"),
]

GOOD_IDS = [
    "hub-short", "hub-tag", "hub-docker.io", "hub-index", "hub-registry-1", "hub-user",
    "ghcr-tag", "digest", "tag-and-digest", "sha512", "localhost-port", "localhost-bare",
    "loopback-v4", "loopback-v6", "dot-localhost", "upper-case-host", "dashes",
    "private-ip-is-https",
]


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "api_host", "scheme"),
    GOOD,
    ids=GOOD_IDS,
)
def test_parse_good(text: str, registry: str, repository: str, tag: str | None,
                    digest: str | None, api_host: str, scheme: str) -> None:
    ref = parse_reference(text)
    assert ref == Reference(registry, repository, tag, digest)
    assert (ref.api_host, ref.scheme) == (api_host, scheme)
    assert ref.manifest_ref == (digest or tag)
    assert parse_reference(str(ref)) == ref  # str() round-trips


BAD = [
    ("", "empty"),
    (" alpine", "white space"),
    ("Alpine", "component 'Alpine'"),
    ("ghcr.io/o/R", "component 'R'"),
    ("ghcr.io/a//b", "component ''"),
    ("ghcr.io/a_/b", "component 'a_'"),
    ("ghcr.io/-a", "component '-a'"),
    ("_a:_x", "component '_a'"),
    ("ghcr.io/a:", "tag ''"),
    ("ghcr.io/a:-x", "tag '-x'"),
    ("ghcr.io/a:" + "x" * 129, "must match"),
    ("ghcr.io/a@sha256:abc", "64 lowercase hex"),
    ("ghcr.io/a@sha256:" + "AB" * 32, "64 lowercase hex"),
    ("ghcr.io/a@sha512:" + "ab" * 32, "128 lowercase hex"),
    ("ghcr.io/a@md5:" + "ab" * 16, "unsupported digest algorithm 'md5'"),
    ("ghcr.io/a@nothing", "not 'algorithm:hex'"),
    ("ghcr.io:99999/a", "port '99999'"),
    ("ghcr.io:/a", "port ''"),
    ("bad_host.io/a", "host 'bad_host.io'"),
    ("[zz::1]:5000/a", "IPv6"),
    ("ghcr.io/", "missing repository"),
    ("ghcr.io/" + "a" * 256, "longer than 255"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[
    "empty", "spaces", "upper-repo", "upper-component", "empty-component", "trailing-underscore",
    "leading-dash", "leading-underscore", "empty-tag", "tag-leading-dash", "tag-too-long", "short-digest",
    "upper-hex", "sha512-short", "md5", "no-algorithm", "port-range", "port-empty",
    "underscore-host", "bad-ipv6", "no-repo", "name-too-long",
])
def test_parse_bad(text: str, message: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert message in str(info.value)
    assert isinstance(info.value, InvalidInput) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("registry", "local"), [
    ("localhost", True), ("localhost:5000", True), ("a.localhost", True), ("127.0.0.1", True),
    ("127.1.2.3:80", True), ("[::1]:5000", True), ("ghcr.io", False), ("localhost.com", False),
    ("10.1.1.1:5000", False),
], ids=lambda v: str(v))
def test_is_localhost(registry: str, local: bool) -> None:
    assert is_localhost(registry) is local
