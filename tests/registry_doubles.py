"""An in-memory registry for httpx.MockTransport: the faults a real server cannot produce on
demand (Range ignored, 416, 503 + Retry-After, resets mid-body, wrong Content-Range), plus
Basic/Bearer challenges and a presigned-URL storage origin with revocable signatures."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

REGISTRY = "http://127.0.0.1:5000"
STORAGE = "http://storage.test:9000"
REALM = "http://127.0.0.1:5001/token"
REPO = "lab/img"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
Fault = Callable[[httpx.Request], httpx.Response | None]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_for(layers: list[tuple[str, bytes]], media_type: str = OCI_MANIFEST) -> bytes:
    config = b"{}"
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": digest_of(config), "size": len(config)},
           "layers": [{"mediaType": mt, "digest": digest_of(b), "size": len(b)}
                      for mt, b in layers]}
    return json.dumps(doc).encode()


class BrokenStream(httpx.SyncByteStream):
    """Yields `data` in pieces, then fails like a reset connection."""

    def __init__(self, data: bytes, *, error: Exception | None = None) -> None:
        self.data, self.error = data, error or httpx.ReadError("connection reset by peer")

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: len(self.data) // 2]
        yield self.data[len(self.data) // 2 :]
        raise self.error


class LazyStream(httpx.SyncByteStream):
    """A body httpx does not read ahead (a Response made with content= is read at once)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data


@dataclass
class FakeRegistry:
    """Callable MockTransport handler. `requests` records everything sent to any origin."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    auth: str | None = None  # None, "basic" or "bearer"
    user: tuple[str, str] = ("ocilab", "s3cr3t-PASSWORD")
    redirect: bool = False  # blobs: registry 307 -> storage -> 307 presigned -> data
    honour_range: bool = True
    fault: Fault | None = None
    token_ttl_s: int = 300
    requests: list[httpx.Request] = field(default_factory=list)
    valid_signatures: set[str] = field(default_factory=set)
    tokens_issued: int = 0

    def add_blob(self, data: bytes) -> str:
        self.blobs[digest_of(data)] = data
        return digest_of(data)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        # A copy: the auth flow mutates and re-sends the same Request object.
        self.requests.append(httpx.Request(request.method, request.url,
                                           headers=request.headers.copy(),
                                           content=request.content))
        if self.fault is not None:
            answer = self.fault(request)
            if answer is not None:
                return answer
        url = request.url
        if str(url).startswith(REALM):
            return self._token(request)
        if url.host == "storage.test":
            return self._storage(request)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/(.+)", url.path)
        if url.path == "/v2/":
            return httpx.Response(200, json={})
        if not match:
            return httpx.Response(404)
        _, kind, ref = match.groups()
        if kind == "manifests":
            if ref not in self.manifests:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            ctype, body = self.manifests[ref]
            return httpx.Response(200, content=body, headers={"Content-Type": ctype})
        if ref not in self.blobs:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        if self.redirect:
            return httpx.Response(307, headers={"Location": f"{STORAGE}/blobs/{ref}"})
        return self.serve(request, self.blobs[ref])

    def serve(self, request: httpx.Request, data: bytes) -> httpx.Response:
        """Single-range GET semantics (RFC 9110 §14)."""
        header = request.headers.get("range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
        if not self.honour_range or not match:
            return httpx.Response(200, content=data)
        first = int(match[1])
        last = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        if first >= len(data):
            return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
        return httpx.Response(206, content=data[first : last + 1], headers={
            "Content-Range": f"bytes {first}-{last}/{len(data)}"})

    def _check_auth(self, request: httpx.Request) -> httpx.Response | None:
        given = request.headers.get("authorization", "")
        if self.auth == "basic":
            want = "Basic " + base64.b64encode(":".join(self.user).encode()).decode()
            if given != want:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        elif self.auth == "bearer" and not given.startswith("Bearer tok-"):
            scope = ""
            match = re.match(r"/v2/(.+)/(manifests|blobs)/", request.url.path)
            if match:
                scope = f',scope="repository:{match[1]}:pull"'
            return httpx.Response(401, headers={
                "WWW-Authenticate": f'Bearer realm="{REALM}",service="fake"{scope}'})
        return None

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.tokens_issued += 1
        if request.method == "POST":
            form = dict(httpx.QueryParams(request.content.decode()))
            if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != "idtok":
                return httpx.Response(401, json={"error": "invalid_grant"})
            return httpx.Response(200, json={"access_token": f"tok-{self.tokens_issued}",
                                             "expires_in": self.token_ttl_s,
                                             "refresh_token": "idtok"})
        given = request.headers.get("authorization")
        if given is not None:
            want = "Basic " + base64.b64encode(":".join(self.user).encode()).decode()
            if given != want:
                return httpx.Response(401, json={"details": "bad credentials"})
        return httpx.Response(200, json={"token": f"tok-{self.tokens_issued}",
                                         "expires_in": self.token_ttl_s})

    def _storage(self, request: httpx.Request) -> httpx.Response:
        if "authorization" in request.headers:
            return httpx.Response(400, text="Only one auth mechanism allowed")
        digest = request.url.path.removeprefix("/blobs/")
        signature = request.url.params.get("X-Amz-Signature")
        if signature is None:
            signature = f"sig{len(self.valid_signatures)}"
            self.valid_signatures.add(signature)
            return httpx.Response(307, headers={
                "Location": f"/blobs/{digest}?X-Amz-Expires=5&X-Amz-Signature={signature}"})
        if signature not in self.valid_signatures:
            return httpx.Response(403, text="Request has expired")
        return self.serve(request, self.blobs[digest])
