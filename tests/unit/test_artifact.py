"""oci/artifact.py against an in-memory registry (httpx.MockTransport): with and without the
Referrers API, idempotent re-push, upload Locations, auth scopes, tampered and hostile artifacts."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from hybrid_erofs.errors import InvalidInput, RegistryError
from hybrid_erofs.indexing.imageindex import ARTIFACT_TYPE, META_MEDIA_TYPE, ZINFO_MEDIA_TYPE
from hybrid_erofs.oci.artifact import (
    EMPTY_CONFIG,
    TITLE,
    ArtifactFile,
    build_artifact_manifest,
    fetch_artifact,
    find_artifacts,
    push_artifact,
    referrers_tag,
)
from hybrid_erofs.oci.client import OCI_INDEX, OCI_MANIFEST, Descriptor, RegistryClient
from hybrid_erofs.oci.credentials import Credentials

REGISTRY = "http://127.0.0.1:5000"
UPLOADS = "http://upload.test:9000"
REPO = "lab/img"
SUBJECT_BODY = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
SUBJECT = Descriptor(OCI_MANIFEST, "sha256:" + hashlib.sha256(SUBJECT_BODY).hexdigest(),
                     len(SUBJECT_BODY))
TAG = referrers_tag(SUBJECT.digest)
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StreamingTransport(httpx.BaseTransport):
    """httpx.MockTransport without its `request.read()`, which makes any body replayable."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.handler = handler

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.handler(request)


@dataclass
class PushRegistry:
    """Callable MockTransport handler: blobs, upload sessions, manifests, optional Referrers API,
    optional Bearer auth whose tokens carry their scope, and knobs for faults."""

    referrers_api: bool = False
    location: str = "relative"  # "relative", "absolute" or "other-origin"
    bearer: bool = False
    reject_first_put: bool = False  # one 401 on the first file PUT (the body is sent again)
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    token_scopes: list[str] = field(default_factory=list)
    uploads: int = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        # Iterate the body as a socket transport does: a re-sent request iterates it again.
        assert isinstance(request.stream, httpx.SyncByteStream)
        body = b"".join(request.stream)
        self.requests.append(request)
        self.bodies.append(body)
        url = request.url
        if url.path == "/token":
            scope = url.params.get("scope", "")
            self.token_scopes.append(scope)
            return httpx.Response(200, json={"token": f"tok {scope}", "expires_in": 300})
        if url.host == "upload.test":
            assert "authorization" not in request.headers  # never credentials off-origin
            return self._finish_upload(request, body)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        match = re.fullmatch(rf"/v2/{REPO}/(manifests|blobs|referrers)/(.*)", url.path)
        assert match, url
        kind, ref = match.groups()
        if kind == "blobs" and ref == "uploads/" and request.method == "POST":
            self.uploads += 1
            path = f"/v2/{REPO}/blobs/uploads/u{self.uploads}?_state=st%3D%3D{self.uploads}"
            location = {"relative": path, "absolute": REGISTRY + path,
                        "other-origin": UPLOADS + path}[self.location]
            return httpx.Response(202, headers={"Location": location})
        if kind == "blobs" and ref.startswith("uploads/"):
            return self._finish_upload(request, body)
        if kind == "blobs":
            if ref not in self.blobs:
                return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
            data = self.blobs[ref]
            return httpx.Response(200, content=b"" if request.method == "HEAD" else data,
                                  headers={"Content-Length": str(len(data))})
        if kind == "manifests":
            return self._manifest(request, ref, body)
        if not self.referrers_api:
            return httpx.Response(404, text="404 page not found")
        return self._referrers(ref, url.params.get("artifactType"))

    def _check_auth(self, request: httpx.Request) -> httpx.Response | None:
        if not self.bearer:
            return None
        given = request.headers.get("authorization", "")
        need = "pull,push" if request.method in WRITES else "pull"
        scope = f"repository:{REPO}:{need}"
        if given.startswith("Bearer tok ") and given.endswith(need):
            return None
        error = ',error="insufficient_scope"' if given else ""
        return httpx.Response(401, headers={"WWW-Authenticate": (
            f'Bearer realm="{REGISTRY}/token",service="fake",scope="{scope}"{error}')})

    def _finish_upload(self, request: httpx.Request, body: bytes) -> httpx.Response:
        assert request.method == "PUT"
        if self.reject_first_put and request.url.params["digest"] != EMPTY_CONFIG.digest:
            self.reject_first_put = False
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        # The session's state must come back verbatim, the digest added as a parameter.
        raw_query = request.url.query.decode()
        assert re.fullmatch(r"_state=st%3D%3D\d+&digest=sha256%3A[0-9a-f]{64}", raw_query)
        digest = request.url.params["digest"]
        if digest_of(body) != digest or int(request.headers["content-length"]) != len(body):
            return httpx.Response(400, json={"errors": [{"code": "DIGEST_INVALID"}]})
        self.blobs[digest] = body
        return httpx.Response(201, headers={"Location": f"/v2/{REPO}/blobs/{digest}"})

    def _manifest(self, request: httpx.Request, ref: str, body: bytes) -> httpx.Response:
        if request.method == "PUT":
            ctype = request.headers["content-type"]
            self.manifests[ref] = self.manifests[digest_of(body)] = (ctype, body)
            headers = {"Docker-Content-Digest": digest_of(body)}
            subject = json.loads(body).get("subject")
            if self.referrers_api and subject:
                headers["OCI-Subject"] = subject["digest"]
            return httpx.Response(201, headers=headers)
        if ref not in self.manifests:
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        ctype, stored = self.manifests[ref]
        return httpx.Response(200, content=b"" if request.method == "HEAD" else stored,
                              headers={"Content-Type": ctype,
                                       "Content-Length": str(len(stored))})

    def _referrers(self, digest: str, artifact_type: str | None) -> httpx.Response:
        entries = []
        for ref, (ctype, body) in self.manifests.items():
            doc = json.loads(body)
            if ref.startswith("sha256:") and doc.get("subject", {}).get("digest") == digest:
                entries.append({"mediaType": ctype, "digest": ref, "size": len(body),
                                "artifactType": doc.get("artifactType", ""),
                                **({"annotations": doc["annotations"]}
                                   if "annotations" in doc else {})})
        del artifact_type  # not applied, and no OCI-Filters-Applied: the client filters
        return httpx.Response(200, json={"schemaVersion": 2, "mediaType": OCI_INDEX,
                                         "manifests": entries},
                              headers={"Content-Type": OCI_INDEX})

    def writes(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests if r.method in WRITES]

    def count(self, method: str, part: str) -> int:
        return sum(1 for r in self.requests if r.method == method and part in r.url.path)


def _client(fake: PushRegistry, credentials: Credentials | None = None) -> RegistryClient:
    return RegistryClient(f"127.0.0.1:5000/{REPO}:multi", transport=StreamingTransport(fake),
                          credentials=credentials)


def _files(tmp_path: Path, tag: str = "a") -> list[ArtifactFile]:
    data = {"index.json": b'{"index": "%s"}' % tag.encode(),
            "layer.zinfo": bytes(range(256)) * 40 + tag.encode(),
            "layer.meta.erofs": b"\xe2\xe1\xf5\xe0" + tag.encode() * 3000}
    types = {"index.json": "application/vnd.hybrid-erofs.index.v1+json",
             "layer.zinfo": ZINFO_MEDIA_TYPE, "layer.meta.erofs": META_MEDIA_TYPE}
    (tmp_path / tag).mkdir(exist_ok=True)
    files = []
    for name, content in data.items():
        (tmp_path / tag / name).write_bytes(content)
        files.append(ArtifactFile(name, types[name], tmp_path / tag / name))
    return files


def test_manifest_is_deterministic_and_follows_the_artifact_guidelines(tmp_path: Path) -> None:
    files = _files(tmp_path)
    body = build_artifact_manifest(SUBJECT, files, annotations={"b": "2", "a": "1"})
    assert body == build_artifact_manifest(SUBJECT, files, annotations={"a": "1", "b": "2"})
    doc = json.loads(body)
    assert body == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_MANIFEST
    assert doc["artifactType"] == ARTIFACT_TYPE
    assert doc["config"] == {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                             "digest": digest_of(b"{}")} == {
        "mediaType": EMPTY_CONFIG.media_type, "digest": EMPTY_CONFIG.digest, "size": 2}
    assert [layer["annotations"] for layer in doc["layers"]] == [
        {TITLE: f.name} for f in files]
    assert [(layer["digest"], layer["size"]) for layer in doc["layers"]] == [
        (digest_of(f.path.read_bytes()), f.path.stat().st_size) for f in files]
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": SUBJECT.digest,
                              "size": SUBJECT.size}
    assert doc["annotations"] == {"a": "1", "b": "2"}


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "a\\b"])
def test_push_refuses_names_that_are_not_plain(tmp_path: Path, name: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with pytest.raises(InvalidInput, match="not a unique plain file name"):
        build_artifact_manifest(SUBJECT, [ArtifactFile(name, ZINFO_MEDIA_TYPE, path)])
    with pytest.raises(InvalidInput, match="not a unique plain file name"):
        build_artifact_manifest(SUBJECT, [ArtifactFile("f", ZINFO_MEDIA_TYPE, path)] * 2)


def test_referrers_tag_rules() -> None:
    assert referrers_tag(SUBJECT.digest) == "sha256-" + SUBJECT.digest[7:]
    assert referrers_tag("sha512:" + "ab" * 64) == "sha512-" + "ab" * 32
    assert referrers_tag("a+b.c_d:x") == "a-b.c_d-x"


def test_registry_with_referrers_api(tmp_path: Path) -> None:
    fake = PushRegistry(referrers_api=True)
    with _client(fake) as client:
        report = push_artifact(client, SUBJECT, _files(tmp_path))
        assert (report.referrers, report.tag_updated, report.manifest_pushed) == ("api", False,
                                                                                  True)
        assert (report.blobs_uploaded, report.blobs_present) == (4, 0)  # 3 files + config
        assert TAG not in fake.manifests
        found = find_artifacts(client, SUBJECT.digest)
        assert [r.digest for r in found] == [report.manifest_digest]
        assert found[0].artifact_type == ARTIFACT_TYPE
        assert fake.count("GET", "/referrers/") == 1 and fake.count("GET", TAG) == 0
        assert fake.blobs[EMPTY_CONFIG.digest] == b"{}"


def test_registry_without_referrers_api_uses_the_tag(tmp_path: Path) -> None:
    fake = PushRegistry()
    with _client(fake) as client:
        report = push_artifact(client, SUBJECT, _files(tmp_path), annotations={"k": "v"})
        assert (report.referrers, report.tag_updated) == ("tag", True)
        ctype, body = fake.manifests[TAG]
        assert ctype == OCI_INDEX
        assert json.loads(body) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": report.manifest_digest,
             "size": len(fake.manifests[report.manifest_digest][1]),
             "artifactType": ARTIFACT_TYPE, "annotations": {"k": "v"}}]}
        found = find_artifacts(client, SUBJECT.digest)
        assert [(r.digest, r.annotations) for r in found] == [(report.manifest_digest,
                                                               {"k": "v"})]
        assert find_artifacts(client, "sha256:" + "0" * 64) == []


@pytest.mark.parametrize("api", [True, False], ids=["api", "tag"])
def test_second_push_writes_nothing(tmp_path: Path, api: bool) -> None:
    fake = PushRegistry(referrers_api=api)
    with _client(fake) as client:
        first = push_artifact(client, SUBJECT, _files(tmp_path))
        tag_before = fake.manifests.get(TAG)
        before = len(fake.requests)
        messages: list[str] = []
        again = push_artifact(client, SUBJECT, _files(tmp_path), progress=messages.append)
    assert again.manifest_digest == first.manifest_digest
    assert (again.blobs_uploaded, again.blobs_present) == (0, 4)
    assert (again.manifest_pushed, again.tag_updated) == (False, False)
    assert again.referrers == ("api" if api else "tag")
    assert [r for r in fake.requests[before:] if r.method in WRITES] == []
    assert fake.manifests.get(TAG) == tag_before
    assert len(messages) == 5 + (0 if api else 1)


def test_artifacts_accumulate_in_the_tag_and_are_filtered_by_type(tmp_path: Path) -> None:
    fake = PushRegistry()
    with _client(fake) as client:
        first = push_artifact(client, SUBJECT, _files(tmp_path, "a"))
        second = push_artifact(client, SUBJECT, _files(tmp_path, "b"))
        other = push_artifact(client, SUBJECT, _files(tmp_path, "c"),
                              artifact_type="application/vnd.example.other")
        assert second.tag_updated and second.blobs_present == 1  # the shared empty config
        entries = json.loads(fake.manifests[TAG][1])["manifests"]
        assert [e["digest"] for e in entries] == [first.manifest_digest,
                                                  second.manifest_digest, other.manifest_digest]
        assert [r.digest for r in find_artifacts(client, SUBJECT.digest)] == [
            first.manifest_digest, second.manifest_digest]
        assert len(find_artifacts(client, SUBJECT.digest, artifact_type=None)) == 3


def test_api_registry_is_filtered_client_side(tmp_path: Path) -> None:
    fake = PushRegistry(referrers_api=True)
    with _client(fake) as client:
        push_artifact(client, SUBJECT, _files(tmp_path, "a"), artifact_type="x/other")
        wanted = push_artifact(client, SUBJECT, _files(tmp_path, "b"))
        assert [r.digest for r in find_artifacts(client, SUBJECT.digest)] == [
            wanted.manifest_digest]
        assert "artifactType=application%2Fvnd.hybrid-erofs.index.v1" in str(
            fake.requests[-1].url)


@pytest.mark.parametrize("location", ["relative", "absolute", "other-origin"])
def test_upload_locations_keep_their_query(tmp_path: Path, location: str) -> None:
    fake = PushRegistry(location=location, bearer=True)
    with _client(fake, Credentials("user", "secret")) as client:
        report = push_artifact(client, SUBJECT, _files(tmp_path))
    assert report.blobs_uploaded == 4
    puts = [r for r in fake.requests if r.method == "PUT" and "/uploads/" in r.url.path]
    assert len(puts) == 4
    assert {r.url.host for r in puts} == {"upload.test" if location == "other-origin"
                                          else "127.0.0.1"}
    for file in _files(tmp_path):
        assert fake.blobs[digest_of(file.path.read_bytes())] == file.path.read_bytes()


def test_push_asks_for_push_scope_up_front(tmp_path: Path) -> None:
    fake = PushRegistry(bearer=True)
    with _client(fake, Credentials("user", "secret")) as client:
        push_artifact(client, SUBJECT, _files(tmp_path))
        push_artifact(client, SUBJECT, _files(tmp_path, "b"))
    # One token per scope: reads use the pull token, every write the cached pull,push token.
    assert fake.token_scopes == [f"repository:{REPO}:pull", f"repository:{REPO}:pull,push"]
    statuses = [r for r in fake.requests if r.method in WRITES]
    assert all(r.headers["authorization"].endswith("pull,push") for r in statuses)


def test_a_file_body_is_sent_again_after_401(tmp_path: Path) -> None:
    fake = PushRegistry(reject_first_put=True)
    files = _files(tmp_path)
    with _client(fake, Credentials("user", "secret")) as client:
        report = push_artifact(client, SUBJECT, files)
    assert report.blobs_uploaded == 4
    first_put = next(n for n, r in enumerate(fake.requests) if "/uploads/u2" in r.url.path)
    assert fake.bodies[first_put] == fake.bodies[first_put + 1] == files[0].path.read_bytes()
    assert fake.requests[first_put + 1].headers["authorization"].startswith("Basic ")


def test_upload_errors_are_one_line_without_the_upload_state(tmp_path: Path) -> None:
    fake = PushRegistry()
    files = _files(tmp_path)
    blob = digest_of(files[0].path.read_bytes())  # as hashed, before the change

    def changing(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":  # the file changes after it was hashed
            files[0].path.write_bytes(b"changed")
        return fake(request)

    with RegistryClient(f"127.0.0.1:5000/{REPO}", transport=StreamingTransport(changing)
                        ) as client, pytest.raises(RegistryError) as info:
        push_artifact(client, SUBJECT, files)
    message = str(info.value)
    assert message == (f"PUT http://127.0.0.1:5000/v2/lab/img/blobs/uploads/u2 (blob {blob}): "
                       "HTTP 400 (DIGEST_INVALID)")
    assert not info.value.transient


def test_transport_errors_are_transient(tmp_path: Path) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with RegistryClient(f"127.0.0.1:5000/{REPO}", transport=StreamingTransport(down)
                        ) as client, pytest.raises(RegistryError, match="HEAD .*ConnectError") as info:
        push_artifact(client, SUBJECT, _files(tmp_path))
    assert info.value.transient


def _pushed(tmp_path: Path) -> tuple[PushRegistry, RegistryClient, Descriptor]:
    fake = PushRegistry()
    client = _client(fake)
    report = push_artifact(client, SUBJECT, _files(tmp_path, "src"))
    size = len(fake.manifests[report.manifest_digest][1])
    return fake, client, Descriptor(OCI_MANIFEST, report.manifest_digest, size)


def test_fetch_round_trip_and_files_already_present(tmp_path: Path) -> None:
    fake, client, artifact = _pushed(tmp_path)
    with client:
        [found] = find_artifacts(client, SUBJECT.digest)
        paths = fetch_artifact(client, found, tmp_path / "out")
        assert list(paths) == ["index.json", "layer.zinfo", "layer.meta.erofs"]
        for name, path in paths.items():
            assert path == tmp_path / "out" / name
            assert path.read_bytes() == (tmp_path / "src" / name).read_bytes()
        gets = fake.count("GET", "/blobs/")
        assert gets == 3
        (tmp_path / "out" / "layer.zinfo").write_bytes(b"stale")
        assert fetch_artifact(client, artifact, tmp_path / "out") == paths
        assert fake.count("GET", "/blobs/") == gets + 1  # only the stale file again
        assert paths["layer.zinfo"].read_bytes() == (tmp_path / "src/layer.zinfo").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(paths)


def test_fetch_refuses_a_tampered_blob_and_leaves_nothing(tmp_path: Path) -> None:
    fake, client, artifact = _pushed(tmp_path)
    digest = digest_of((tmp_path / "src/layer.zinfo").read_bytes())
    fake.blobs[digest] = fake.blobs[digest][:-1] + b"X"
    with client:
        with pytest.raises(RegistryError, match=rf"^{digest}: blob digest mismatch"):
            fetch_artifact(client, artifact, tmp_path / "out")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json"]
        fake.blobs[digest] += b"more"
        with pytest.raises(RegistryError, match=rf"^{digest}: blob size mismatch"):
            fetch_artifact(client, artifact, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json"]


def _hostile(fake: PushRegistry, layers: list[dict[str, object]],
             artifact_type: str = ARTIFACT_TYPE) -> Descriptor:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "artifactType": artifact_type, "layers": layers}).encode()
    fake.manifests[digest_of(body)] = (OCI_MANIFEST, body)
    return Descriptor(OCI_MANIFEST, digest_of(body), len(body))


@pytest.mark.parametrize("titles", [["../x"], ["a/b"], [".bashrc"], [""], [None],
                                    ["same", "same"]], ids=str)
def test_fetch_refuses_titles_that_are_not_plain_names(tmp_path: Path,
                                                       titles: list[str | None]) -> None:
    fake = PushRegistry()
    blob = b"payload"
    fake.blobs[digest_of(blob)] = blob
    layers: list[dict[str, object]] = [
        {"mediaType": ZINFO_MEDIA_TYPE, "digest": digest_of(blob), "size": len(blob),
         **({"annotations": {TITLE: t}} if t is not None else {})} for t in titles]
    artifact = _hostile(fake, layers)
    with _client(fake) as client, pytest.raises(
            RegistryError, match=rf"^{artifact.digest}: layer \d title .* plain file name$"):
        fetch_artifact(client, artifact, tmp_path / "out")
    assert fake.count("GET", "/blobs/") == 0
    assert not (tmp_path / "x").exists()


def test_fetch_checks_artifact_type_and_size_limit(tmp_path: Path) -> None:
    fake = PushRegistry()
    layer = {"mediaType": ZINFO_MEDIA_TYPE, "digest": digest_of(b"x" * 100), "size": 100,
             "annotations": {TITLE: "big"}}
    with _client(fake) as client:
        other = _hostile(fake, [layer], artifact_type="x/other")
        with pytest.raises(RegistryError, match="artifactType is 'x/other'"):
            fetch_artifact(client, other, tmp_path)
        artifact = _hostile(fake, [layer])
        with pytest.raises(RegistryError, match="has 100 bytes, more than the limit of 99"):
            fetch_artifact(client, artifact, tmp_path, max_blob_size=99)
