"""oci/artifact.py against real distribution 2.8 registries (tests/registry_rig.py): no Referrers
API there, so every push maintains the `sha256-<hex>` tag; plain, Basic and token auth, and a
fetch through the registry that redirects blobs to presigned storage URLs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hybrid_erofs.errors import AuthError
from hybrid_erofs.indexing.imageindex import (
    INDEX_MEDIA_TYPE,
    META_MEDIA_TYPE,
    SIDECAR_MEDIA_TYPE,
    ZINFO_MEDIA_TYPE,
)
from hybrid_erofs.oci.artifact import (
    ArtifactFile,
    PushReport,
    fetch_artifact,
    find_artifacts,
    push_artifact,
    referrers_tag,
)
from hybrid_erofs.oci.client import OCI_INDEX, OCI_MANIFEST, Descriptor, RegistryClient
from hybrid_erofs.oci.credentials import Credentials
from tests.registry_rig import USER, Rig

pytestmark = pytest.mark.integration


def _files(directory: Path, seed: int) -> list[ArtifactFile]:
    """Four files; the zinfo one is larger than the client's 1 MiB streaming chunk."""
    rng = random.Random(seed)
    directory.mkdir()
    contents = [("index.json", INDEX_MEDIA_TYPE, b'{"seed": %d}' % seed),
                ("layer.zinfo", ZINFO_MEDIA_TYPE, rng.randbytes((2 << 20) + 17)),
                ("layer.zinfo.json", SIDECAR_MEDIA_TYPE, b'{"spans": [%d]}' % seed),
                ("layer.meta.erofs", META_MEDIA_TYPE, rng.randbytes(8192))]
    files = []
    for name, media_type, data in contents:
        (directory / name).write_bytes(data)
        files.append(ArtifactFile(name, media_type, directory / name))
    return files


def _client(rig: Rig, host: str) -> RegistryClient:
    credentials = None if host == "plain" else Credentials(*USER)
    return RegistryClient(f"{rig.hosts[host]}/lab/img:multi", credentials=credentials)


@pytest.mark.parametrize("host", ["plain", "basic", "token"])
def test_push_find_fetch_and_repush(rig: Rig, host: str, tmp_path: Path) -> None:
    image = rig.images["amd64"]
    subject = Descriptor(OCI_MANIFEST, image.manifest_digest, len(image.manifest))
    tag = referrers_tag(subject.digest)
    files = _files(tmp_path / "a", seed=1)
    issued = rig.token.issued
    with _client(rig, host) as client:
        assert client.get_referrers(subject.digest) is None  # 2.8: no Referrers API
        assert client.get_manifest_if_present(tag) is None
        first = push_artifact(client, subject, files, annotations={"run": host})
        assert (first.blobs_uploaded, first.blobs_present) == (5, 0)  # 4 files + empty config
        assert (first.manifest_pushed, first.referrers, first.tag_updated) == (True, "tag", True)
        if host == "token":
            assert rig.token.issued - issued == 2  # one pull token, one pull,push token

        index = client.get_manifest(tag)
        assert index.media_type == OCI_INDEX
        assert index.data["manifests"] == [{
            "mediaType": OCI_MANIFEST, "digest": first.manifest_digest,
            "size": len(client.get_manifest(first.manifest_digest).body),
            "artifactType": "application/vnd.hybrid-erofs.index.v1",
            "annotations": {"run": host}}]

        [found] = find_artifacts(client, subject.digest)
        assert (found.digest, found.annotations) == (first.manifest_digest, {"run": host})
        paths = fetch_artifact(client, found, tmp_path / "out")
        assert sorted(paths) == sorted(f.name for f in files)
        for file in files:
            assert paths[file.name].read_bytes() == file.path.read_bytes()

        again = push_artifact(client, subject, files, annotations={"run": host})
        assert again == PushReport(first.manifest_digest, 0, 5, False, "tag", False)
        assert client.get_manifest(tag).digest == index.digest

        second = push_artifact(client, subject, _files(tmp_path / "b", seed=2))
        assert second.tag_updated and second.blobs_present == 1  # the shared empty config
        listed = [r.digest for r in find_artifacts(client, subject.digest, artifact_type=None)]
        assert listed == [first.manifest_digest, second.manifest_digest]
        assert listed == [r.digest for r in find_artifacts(client, subject.digest)]
        assert client.get_manifest(tag).body.count(b'"digest"') == 2
        assert find_artifacts(client, rig.images["arm64"].manifest_digest) == []


def test_fetch_follows_blob_redirects_without_leaking_credentials(rig: Rig,
                                                                   tmp_path: Path) -> None:
    # "redir" shares the token registry's storage and answers blob GETs with 307 to the store.
    image = rig.images["arm64"]
    subject = Descriptor(OCI_MANIFEST, image.manifest_digest, len(image.manifest))
    files = _files(tmp_path / "a", seed=3)
    with _client(rig, "token") as client:
        pushed = push_artifact(client, subject, files)
    hits = dict(rig.store.hits)
    with _client(rig, "redir") as client:
        [found] = find_artifacts(client, subject.digest)
        assert found.digest == pushed.manifest_digest
        paths = fetch_artifact(client, found, tmp_path / "out")
    for file in files:
        assert paths[file.name].read_bytes() == file.path.read_bytes()
    assert rig.store.hits["data"] == hits.get("data", 0) + 4
    assert rig.store.hits["authorization"] == hits.get("authorization", 0)


def test_anonymous_push_is_refused(rig: Rig, tmp_path: Path) -> None:
    image = rig.images["amd64"]
    subject = Descriptor(OCI_MANIFEST, image.manifest_digest, len(image.manifest))
    client = RegistryClient(f"{rig.hosts['token']}/public/img:multi")
    with client, pytest.raises(AuthError, match=r"^POST http://.*/v2/public/img/blobs/uploads/: "
                                                r"HTTP 401"):
        push_artifact(client, subject, _files(tmp_path / "a", seed=4))
