"""In-process peers for the real-registry rig: a distribution token server (ES256 JWT with x5c,
as distribution 2.8 `auth: token` verifies) and an S3-like blob store with expiring presigned
URLs behind 2.8's `redirect` storage middleware. Loopback only."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # avoid Nagle/delayed-ACK stalls on small answers

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops its connection (an abandoned or failed read) is part of the
        # tests, not a server error: no traceback in the test run's output. Others are shown.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class TokenServer(_Server):
    """GET/POST /token. Anonymous users may pull `public/*`; `user` may do anything."""

    def __init__(self, keydir: Path, *, user: tuple[str, str], service: str, issuer: str) -> None:
        self.user, self.service, self.issuer = user, service, issuer
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hybrid-erofs-test-signer")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        keydir.mkdir(parents=True, exist_ok=True)
        self.cert_path = keydir / "cert.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.ttl_s = 300
        self.issued = 0
        self.refresh_tokens: dict[str, str] = {}
        super().__init__(_TokenHandler)

    def mint(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if user else [a for a in wanted if a == "pull"
                                           and name.startswith("public/")]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service, "exp": now + self.ttl_s,
                  "nbf": now - 1, "iat": now, "jti": secrets.token_hex(8), "access": access}
        header = {"typ": "JWT", "alg": "ES256", "x5c": self.x5c}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)  # JWS ES256 wants r || s, 32 bytes each
        self.issued += 1
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


class _TokenHandler(_Handler):
    server: TokenServer

    def _answer(self, user: str | None, scopes: list[str], extra: dict[str, str]) -> None:
        token = self.server.mint(user, scopes)
        body = {"token": token, "access_token": token, "expires_in": self.server.ttl_s,
                "issued_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                **extra}
        self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        given = self.headers.get("Authorization")
        user = None
        if given:
            try:
                name, _, password = base64.b64decode(given.split(" ", 1)[1]).decode().partition(":")
            except (ValueError, IndexError):
                name, password = "", ""
            if (name, password) != self.server.user:
                return self.reply(401, b'{"details":"bad credentials"}')
            user = name
        scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
        extra = {}
        if user and query.get("offline_token") == ["true"]:
            extra["refresh_token"] = secrets.token_urlsafe(16)
            self.server.refresh_tokens[extra["refresh_token"]] = user
        self._answer(user, scopes, extra)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        if form.get("grant_type") == "password":
            if (form.get("username"), form.get("password")) != self.server.user:
                return self.reply(401, b'{"error":"invalid_grant"}')
            user = self.server.user[0]
        elif form.get("grant_type") == "refresh_token":
            found = self.server.refresh_tokens.get(form.get("refresh_token", ""))
            if found is None:
                return self.reply(401, b'{"error":"invalid_grant"}')
            user = found
        else:
            return self.reply(400, b'{"error":"unsupported_grant_type"}')
        refresh = secrets.token_urlsafe(16)
        self.server.refresh_tokens[refresh] = user
        self._answer(user, form.get("scope", "").split(), {"refresh_token": refresh})


class BlobStore(_Server):
    """Serves `root/docker/registry/v2/blobs/...`: an unsigned path gets a 307 to a presigned
    URL valid `ttl_s` seconds; expired -> 403; any Authorization -> 400 (as S3)."""

    secret = b"test-only"

    def __init__(self, root: Path) -> None:
        self.root, self.ttl_s = root, 30
        self.hits: dict[str, int] = {"presign": 0, "expired": 0, "authorization": 0, "data": 0}
        super().__init__(_StoreHandler)

    def sign(self, path: str, date: str, expires: str) -> str:
        return hmac.new(self.secret, f"{path}|{date}|{expires}".encode(), hashlib.sha256).hexdigest()


class _StoreHandler(_Handler):
    server: BlobStore

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        store = self.server
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if not url.path.startswith("/docker/registry/v2/blobs/") or ".." in url.path:
            return self.reply(404)
        if "X-Amz-Signature" not in query:
            store.hits["presign"] += 1
            date, expires = f"{time.time():.3f}", str(store.ttl_s)
            signed = urlencode({"X-Amz-Date": date, "X-Amz-Expires": expires,
                                "X-Amz-Signature": store.sign(url.path, date, expires)})
            host = self.headers.get("Host", f"localhost:{store.port}")
            return self.reply(307, headers={"Location": f"http://{host}{url.path}?{signed}"})
        date, expires = query.get("X-Amz-Date", "0"), query.get("X-Amz-Expires", "0")
        if not hmac.compare_digest(store.sign(url.path, date, expires), query["X-Amz-Signature"]):
            return self.reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
        if time.time() > float(date) + float(expires):
            store.hits["expired"] += 1
            return self.reply(403, b"<Error><Code>AccessDenied</Code>expired</Error>")
        if self.headers.get("Authorization"):
            store.hits["authorization"] += 1
            return self.reply(400, b"<Error><Code>InvalidArgument</Code>Only one auth "
                                   b"mechanism allowed</Error>")
        path = store.root / url.path.lstrip("/")
        size = os.path.getsize(path)
        first, last, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            first = int(match[1])
            last = min(int(match[2]) if match[2] else size - 1, size - 1)
            if first >= size:
                return self.reply(416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
        store.hits["data"] += 1
        with open(path, "rb") as f:
            f.seek(first)
            body = f.read(last - first + 1)
        headers = {"Content-Type": "application/octet-stream"}
        if status == 206:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        self.reply(status, body, headers)
