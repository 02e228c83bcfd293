"""The registry client and RegistryBlobSource against real distribution 2.8 registries (plain,
Basic, token, redirect to expiring presigned URLs) started by tests/registry_rig.py."""

from __future__ import annotations

import logging
import random
import time
from contextlib import closing
from pathlib import Path

import pytest

from hybrid_erofs.errors import AuthError, RegistryError, SourceIOError
from hybrid_erofs.oci.client import DOCKER_MANIFEST, RegistryClient
from hybrid_erofs.oci.credentials import Credentials, resolve_credentials
from hybrid_erofs.oci.reference import parse_reference
from hybrid_erofs.sources.registry import RegistryBlobSource, iter_blob, open_registry_blob
from hybrid_erofs.sources.retry import RetrySource
from tests.registry_rig import USER, Rig

pytestmark = pytest.mark.integration


def _check_random_reads(source: RegistryBlobSource | RetrySource, blob: bytes,
                        reads: int = 40) -> None:
    rng = random.Random(5)
    assert source.size == len(blob)
    for _ in range(reads):
        offset = rng.randrange(len(blob))
        length = rng.randrange(min(256 << 10, len(blob) - offset) + 1)
        assert source.pread(length, offset) == blob[offset : offset + length]
    assert source.pread(1, len(blob) - 1) == blob[-1:]


@pytest.mark.parametrize("platform", ["linux/amd64", "linux/x86_64", "linux/arm64",
                                      "linux/aarch64", "linux/arm64/v8"])
def test_platform_resolution_and_lazy_reads(rig: Rig, platform: str) -> None:
    image = rig.images["arm64" if "64" in platform and "x86" not in platform
                       and "amd" not in platform else "amd64"]
    source, descriptor = open_registry_blob(f"{rig.hosts['plain']}/lab/img:multi",
                                            platform=platform)
    with closing(source):
        assert descriptor.digest == image.layer_digest
        _check_random_reads(source, image.layer)


def test_no_matching_platform(rig: Rig) -> None:
    with pytest.raises(RegistryError, match="no manifest for platform linux/s390x"):
        open_registry_blob(f"{rig.hosts['plain']}/lab/img:multi", platform="linux/s390x")


def test_docker_v2s2_and_digest_references(rig: Rig) -> None:
    client = RegistryClient(f"{rig.hosts['plain']}/lab/img:v2s2")
    manifest = client.resolve()
    assert manifest.media_type == DOCKER_MANIFEST
    descriptor = client.layer_descriptor()
    assert descriptor.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert descriptor.digest == rig.images["amd64"].layer_digest
    by_digest = RegistryClient(f"{rig.hosts['plain']}/lab/img@{rig.index_digest}")
    assert by_digest.resolve("linux/arm64").digest == rig.images["arm64"].manifest_digest
    client.close()
    by_digest.close()


def test_tampered_manifest_is_refused(rig: Rig) -> None:
    image = rig.images["tamper"]
    path = rig.blob_path("plain", image.manifest_digest)
    body = path.read_bytes()
    good_hex = image.layer_digest.split(":")[1]
    evil_hex = good_hex[::-1]  # same length: the registry serves it without noticing
    path.write_bytes(body.replace(good_hex.encode(), evil_hex.encode()))
    try:
        ref = f"{rig.hosts['plain']}/lab/tamper@{image.manifest_digest}"
        with pytest.raises(RegistryError, match="manifest digest mismatch"):
            open_registry_blob(ref)
    finally:
        path.write_bytes(body)


def test_iter_blob_and_retry_stack(rig: Rig) -> None:
    image = rig.images["amd64"]
    source, _ = open_registry_blob(f"{rig.hosts['plain']}/lab/img:amd64")
    assert b"".join(iter_blob(source)) == image.layer  # digest verified at the end
    retrying = RetrySource(source)
    _check_random_reads(retrying, image.layer, reads=10)
    retrying.close()
    assert source.client.http.is_closed


def test_basic_auth(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ref = f"{rig.hosts['basic']}/lab/img:multi"
    texts: list[str] = []
    with pytest.raises(AuthError) as anonymous:
        open_registry_blob(ref, platform="linux/amd64")
    with pytest.raises(AuthError) as wrong:
        open_registry_blob(ref, platform="linux/amd64", username=USER[0],
                           password="wrong-" + USER[1])
    texts += [str(anonymous.value), str(wrong.value), repr(wrong.value)]
    source, _ = open_registry_blob(ref, platform="linux/amd64", username=USER[0],
                                   password=USER[1])
    with closing(source):
        _check_random_reads(source, rig.images["amd64"].layer, reads=10)
        texts.append(repr(source.client.auth.__dict__))
    _assert_no_secret(caplog.text + "\n".join(texts))


def test_token_auth(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    host = rig.hosts["token"]
    public, _ = open_registry_blob(f"{host}/public/img:multi", platform="linux/arm64")
    with closing(public):  # anonymous token for public/*
        _check_random_reads(public, rig.images["arm64"].layer, reads=5)
    with pytest.raises(AuthError, match="HTTP 401"):
        open_registry_blob(f"{host}/lab/img:multi", platform="linux/arm64")
    issued = rig.token.issued
    source, _ = open_registry_blob(f"{host}/lab/img:multi", platform="linux/arm64",
                                   username=USER[0], password=USER[1])
    with closing(source):
        _check_random_reads(source, rig.images["arm64"].layer)
    assert rig.token.issued - issued == 1  # one token for the pull scope, cached for all reads
    with pytest.raises(AuthError, match="token server .*: HTTP 401") as info:
        open_registry_blob(f"{host}/lab/img:multi", username=USER[0], password="nope")
    _assert_no_secret(caplog.text + str(info.value))


def test_credentials_from_auth_file(rig: Rig, tmp_path: Path) -> None:
    import base64
    import json

    auth = base64.b64encode(":".join(USER).encode()).decode()
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {rig.hosts["token"]: {"auth": auth}}}))
    ref = parse_reference(f"{rig.hosts['token']}/lab/img:multi")
    credentials = resolve_credentials(ref, env={"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")})
    assert credentials.username == USER[0]
    with RegistryClient(ref, credentials=credentials) as client:
        assert client.layer_descriptor(platform="linux/amd64").digest == (
            rig.images["amd64"].layer_digest)


def test_redirect_to_storage_and_presigned_expiry(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    image = rig.images["amd64"]
    rig.store.ttl_s = 1
    try:
        client = RegistryClient(f"{rig.hosts['redir']}/lab/img:multi",
                                credentials=Credentials(*USER))
        source = RegistryBlobSource(client, client.layer_descriptor(platform="linux/amd64"),
                                    close_client=True)
        with closing(source):
            hits = dict(rig.store.hits)
            assert source.pread(1000, 500) == image.layer[500:1500]
            first = source.requests
            assert first == 3  # registry 307 -> store presign 307 -> 206
            assert source.pread(1000, 100_000) == image.layer[100_000:101_000]
            assert source.requests == first + 1  # cached presigned URL
            time.sleep(1.5)  # the presigned URL (1 s) expires
            assert source.pread(4096, 2_000_000) == image.layer[2_000_000:2_004_096]
            assert rig.store.hits["expired"] == hits["expired"] + 1
            assert rig.store.hits["presign"] == hits["presign"] + 2
            assert rig.store.hits["authorization"] == hits["authorization"]  # never leaked
            assert b"".join(iter_blob(source)) == image.layer
    finally:
        rig.store.ttl_s = 30
    assert "X-Amz-Signature" not in caplog.text
    _assert_no_secret(caplog.text)


def test_source_errors_name_the_range(rig: Rig) -> None:
    client = RegistryClient(f"{rig.hosts['plain']}/lab/img:amd64")
    descriptor = client.layer_descriptor()
    # A descriptor that claims more bytes than the blob has: the real 2.8 answers 416.
    from dataclasses import replace

    source = RegistryBlobSource(client, replace(descriptor, size=descriptor.size + 10),
                                close_client=True)
    with closing(source), pytest.raises(SourceIOError, match=rf"HTTP 416 for bytes {descriptor.size + 5}"
                               rf"-{descriptor.size + 6} \(blob size {descriptor.size + 10}\)"):
        source.pread(2, descriptor.size + 5)


def _assert_no_secret(text: str) -> None:
    import base64

    assert USER[1] not in text
    assert base64.b64encode(":".join(USER).encode()).decode() not in text
