"""RegistryClient: Accept list, manifest verification (digest, media type, schema1), platform
normalisation and selection, layer selection and media types; faults via httpx.MockTransport."""

from __future__ import annotations

import json

import httpx
import pytest

from hybrid_erofs.errors import AuthError, InvalidInput, InvalidReference, RegistryError
from hybrid_erofs.oci.client import (
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    RegistryClient,
    parse_manifest,
)
from hybrid_erofs.oci.platform import Platform, host_platform, normalize, parse_platform
from hybrid_erofs.sources.registry import open_registry_blob
from tests.registry_doubles import GZIP_LAYER, REPO, FakeRegistry, digest_of, manifest_for

ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize(("text", "want"), [
    ("linux/amd64", ("linux", "amd64", "")), ("linux/x86_64", ("linux", "amd64", "")),
    ("linux/amd64/v1", ("linux", "amd64", "")), ("linux/amd64/v3", ("linux", "amd64", "v3")),
    ("linux/aarch64", ("linux", "arm64", "")), ("linux/arm64/v8", ("linux", "arm64", "")),
    ("linux/arm64/8", ("linux", "arm64", "")), ("linux/arm64/v8.0", ("linux", "arm64", "")),
    ("linux/arm64/v8.2", ("linux", "arm64", "v8.2")), ("linux/arm", ("linux", "arm", "v7")),
    ("linux/arm/v6", ("linux", "arm", "v6")), ("linux/armhf", ("linux", "arm", "v7")),
    ("linux/armel", ("linux", "arm", "v6")), ("Linux/ARM64", ("linux", "arm64", "")),
], ids=lambda v: str(v))
def test_platform_normalisation(text: str, want: tuple[str, str, str]) -> None:
    assert parse_platform(text) == Platform(*want)


def test_platform_errors_and_host() -> None:
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(InvalidInput, match="expected os/arch"):
            parse_platform(bad)
    assert host_platform().os == "linux"
    assert str(normalize("linux", "arm")) == "linux/arm/v7"


def _entry(body: bytes, platform: dict[str, str] | None, media_type: str = OCI_MANIFEST
           ) -> dict[str, object]:
    entry: dict[str, object] = {"mediaType": media_type, "digest": digest_of(body),
                                "size": len(body)}
    if platform is not None:
        entry["platform"] = platform
    return entry


def _image(fake: FakeRegistry, tag: str, layers: list[tuple[str, bytes]],
           media_type: str = OCI_MANIFEST) -> bytes:
    body = manifest_for(layers, media_type)
    fake.manifests[tag] = (media_type, body)
    fake.manifests[digest_of(body)] = (media_type, body)
    return body


def _registry() -> tuple[FakeRegistry, dict[str, bytes]]:
    fake = FakeRegistry()
    amd = _image(fake, "amd64", [(GZIP_LAYER, b"base"), (GZIP_LAYER, b"amd-top")])
    arm = _image(fake, "arm64", [(DOCKER_GZIP, b"arm-only")], DOCKER_MANIFEST)
    arm7 = _image(fake, "arm7", [(GZIP_LAYER, b"arm7")])
    bare = _image(fake, "bare", [(GZIP_LAYER, b"bare")])
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        _entry(b"attestation", {"os": "unknown", "architecture": "unknown"}),
        _entry(amd, {"os": "linux", "architecture": "amd64"}),
        _entry(arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}, DOCKER_MANIFEST),
        _entry(arm7, {"os": "linux", "architecture": "arm"}),
        _entry(bare, None),  # no platform: counts as linux/amd64, but comes after amd
    ]}
    body = json.dumps(index).encode()
    fake.manifests["multi"] = (OCI_INDEX, body)
    return fake, {"amd": amd, "arm": arm, "arm7": arm7, "bare": bare, "index": body}


def _client(fake: FakeRegistry, ref: str = "multi") -> RegistryClient:
    sep = "@" if ref.startswith("sha256:") else ":"
    return RegistryClient(f"127.0.0.1:5000/{REPO}{sep}{ref}", transport=fake.transport())


@pytest.mark.parametrize(("platform", "layer", "want"), [
    ("linux/amd64", -1, b"amd-top"), ("linux/x86_64", 0, b"base"),
    ("linux/arm64", None, b"arm-only"), ("linux/aarch64/v8", 0, b"arm-only"),
    ("linux/arm/v7", None, b"arm7"), ("linux/arm", 0, b"arm7"),
], ids=lambda v: str(v))
def test_platform_selection(platform: str, layer: int | None, want: bytes) -> None:
    fake, _ = _registry()
    got = _client(fake).layer_descriptor(platform=platform, layer=layer)
    assert got.digest == digest_of(want) and got.size == len(want)
    accept = fake.requests[0].headers["accept"]
    assert accept == ", ".join(MANIFEST_ACCEPT)
    assert accept.split(", ")[:2] == [OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"]


def test_platform_without_match_lists_offers() -> None:
    fake, _ = _registry()
    with pytest.raises(RegistryError, match=r"no manifest for platform linux/s390x \(index offers: "
                       r"unknown/unknown, linux/amd64, linux/arm64, linux/arm/v7, linux/amd64\)"):
        _client(fake).layer_descriptor(platform="linux/s390x")


def test_descriptor_without_platform_is_linux_amd64() -> None:
    fake, bodies = _registry()
    index = json.loads(bodies["index"])
    index["manifests"] = index["manifests"][-1:]
    fake.manifests["multi"] = (OCI_INDEX, json.dumps(index).encode())
    assert _client(fake).layer_descriptor(platform="linux/amd64").digest == digest_of(b"bare")


def test_tampered_child_manifest_is_refused() -> None:
    fake, bodies = _registry()
    tampered = bodies["arm"].replace(digest_of(b"arm-only").encode(), digest_of(b"evil").encode())
    fake.manifests[digest_of(bodies["arm"])] = (DOCKER_MANIFEST, tampered)
    with pytest.raises(RegistryError, match="manifest digest mismatch: expected "
                       + digest_of(bodies["arm"])):
        _client(fake).layer_descriptor(platform="linux/arm64")


def test_digest_reference_is_verified() -> None:
    fake, bodies = _registry()
    digest = digest_of(bodies["amd"])
    assert _client(fake, digest).resolve().digest == digest
    fake.manifests[digest] = (OCI_MANIFEST, bodies["amd"] + b" ")
    with pytest.raises(RegistryError, match="digest mismatch"):
        _client(fake, digest).resolve()


@pytest.mark.parametrize(("ctype", "body", "message"), [
    ("application/vnd.docker.distribution.manifest.v1+prettyjws", b'{"schemaVersion":1}',
     "schema1 manifests are deprecated"),
    ("application/json", b'{"schemaVersion":1,"fsLayers":[]}', "schema1"),
    (OCI_INDEX, json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode(),
     "does not match Content-Type"),
    (OCI_MANIFEST, b"not json", "not JSON"),
    ("text/plain", b"{}", "unsupported manifest type"),
], ids=["schema1-type", "schema1-body", "type-mismatch", "not-json", "unknown"])
def test_bad_manifests(ctype: str, body: bytes, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        parse_manifest(body, ctype, subject="GET x")


def test_manifest_type_from_body_when_content_type_is_generic() -> None:
    body = manifest_for([(GZIP_LAYER, b"x")])
    assert parse_manifest(body, "application/octet-stream", subject="x").media_type == OCI_MANIFEST
    assert parse_manifest(b'{"manifests":[]}', None, subject="x").is_index


@pytest.mark.parametrize(("layers", "kw", "message"), [
    ([(ZSTD, b"z")], {}, "layer 0 is zstd-compressed (media type '" + ZSTD
     + "'); only gzip layers are supported"),
    ([(GZIP_LAYER, b"a"), ("application/vnd.oci.image.layer.v1.tar", b"t")], {"layer": -1},
     "layer 1 is uncompressed"),
    ([(GZIP_LAYER, b"a"), (GZIP_LAYER, b"b")], {}, "the image has 2 layers; choose one"),
    ([(GZIP_LAYER, b"a")], {"layer": 1}, "layer 1 is out of range: the image has 1 layers"),
    ([(GZIP_LAYER, b"a")], {"layer": -2}, "layer -2 is out of range"),
    ([(GZIP_LAYER, b"a")], {"blob": digest_of(b"nope")}, "is not one of the image's 1 layers"),
], ids=["zstd", "uncompressed", "ambiguous", "too-high", "too-low", "unknown-blob"])
def test_layer_selection_errors(layers: list[tuple[str, bytes]], kw: dict[str, object],
                                message: str) -> None:
    fake = FakeRegistry()
    _image(fake, "t", layers)
    with pytest.raises(RegistryError) as info:
        _client(fake, "t").layer_descriptor(**kw)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_layer_by_blob_digest_and_open_registry_blob() -> None:
    fake = FakeRegistry()
    layers = [(GZIP_LAYER, b"first"), (DOCKER_GZIP, b"second"), (GZIP_LAYER, b"third")]
    _image(fake, "t", layers)
    for _, data in layers:
        fake.add_blob(data)
    assert _client(fake, "t").layer_descriptor(blob=digest_of(b"second")) == Descriptor(
        DOCKER_GZIP, digest_of(b"second"), 6)
    source, descriptor = open_registry_blob(f"127.0.0.1:5000/{REPO}:t", layer=-1,
                                            transport=fake.transport())
    assert descriptor.digest == digest_of(b"third")
    assert source.pread(3, 1) == b"hir" and source.size == 5
    source.close()
    assert source.client.http.is_closed
    with pytest.raises(InvalidReference):
        open_registry_blob("127.0.0.1:5000/Bad", transport=fake.transport())


@pytest.mark.parametrize(("status", "error", "transient"), [
    (404, RegistryError, False), (401, AuthError, False), (403, AuthError, False),
    (503, RegistryError, True), (429, RegistryError, True),
], ids=lambda v: str(v))
def test_manifest_http_errors(status: int, error: type[Exception], transient: bool) -> None:
    fake = FakeRegistry(fault=lambda r: httpx.Response(status))
    with pytest.raises(error, match=f"GET http://127.0.0.1:5000/v2/{REPO}/manifests/multi: "
                                    f"HTTP {status}") as info:
        _client(fake).resolve()
    assert getattr(info.value, "transient", None) is transient


def test_schemes() -> None:
    assert RegistryClient("127.0.0.1:5000/a").base_url == "http://127.0.0.1:5000"
    assert RegistryClient("ghcr.io/a").base_url == "https://ghcr.io"
    assert RegistryClient("alpine").base_url == "https://registry-1.docker.io"
    assert RegistryClient("reg.lan:5000/a", insecure=True).base_url == "http://reg.lan:5000"


def test_clients_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every RegistryClient of a process uses the one TLS context (default_ssl_context):
    making one loads no CA bundle (28 ms each, per layer a snapshotter resolves), also
    with proxies from the environment (each proxy gets a transport of its own)."""
    import ssl

    from hybrid_erofs.oci.client import RegistryClient
    from hybrid_erofs.oci.rangeget import default_ssl_context

    shared = default_ssl_context()
    loads: list[object] = []
    real = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        loads.append(args)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    clients = [RegistryClient(f"registry.example/app/{n}:1") for n in range(3)]
    try:
        assert loads == []
        assert default_ssl_context() is shared
    finally:
        for client in clients:
            client.http.close()


def test_warm_up_loads_the_http_stack_and_the_tls_context() -> None:
    """`warm_up` (the snapshotter runs it as it starts) leaves nothing for the first client to
    import or load: in a fresh interpreter, a client made after it imports no module."""
    import subprocess
    import sys

    script = """if True:
        import sys
        from hybrid_erofs.oci.client import RegistryClient, warm_up
        assert "httpcore" not in sys.modules
        warm_up()
        before = set(sys.modules)
        RegistryClient("registry.example/app:1").http.close()
        assert set(sys.modules) == before, sorted(set(sys.modules) - before)
        print("ok")
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_warm_up_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """It runs in a thread of its own: a failure (a CA file it cannot read) is left for the
    first client to report, never a traceback."""
    from hybrid_erofs.oci import client as module

    def broken() -> None:
        raise OSError("no CA bundle")

    monkeypatch.setattr(module, "default_ssl_context", broken)
    module.warm_up()
