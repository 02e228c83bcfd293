"""A loopback OCI registry of our own for fault tests: /v2/, one image (OCI manifest, config, one
gzip layer), blobs with Range, bearer tokens from /token, and fault switches settable at any time
(failures with Retry-After, resets, truncated bodies, ignored Range, delays, expiring tokens,
tampered bytes) with counters of what was asked; `make_layer` builds layers for it. Stdlib only;
stopped by `close()`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import secrets
import socket
import struct
import tarfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPOSITORY, TAG, SERVICE = "lab/faults", "latest", "fault-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_WRITE = 64 << 10


def make_layer(seed: int, *, count: int = 150,
               level: int = 6) -> tuple[bytes, dict[str, bytes]]:
    """A gzip layer of `count` files of 1 KiB to 1 MiB (two thirds text-like, one third
    random; 150 files are ~16 MB of layer data) and its files by name."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(2, 8)).hex().encode() for _ in range(3000)]
    files: dict[str, bytes] = {}
    for n in range(count):
        size = int(2 ** rng.uniform(10, 20))
        files[f"d{n % 7}/f{n:0{len(str(count - 1))}d}.bin"] = (
            b" ".join(rng.choice(words) for _ in range(size // 6 + 1))[:size] if n % 3
            else rng.randbytes(size))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=level, mtime=0), files


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FaultRegistry:
    """A registry serving one image whose only layer is `layer` (a gzip blob).

    Fault switches apply to blob GETs, in this order: `delay_s`, then `dead` (every GET fails
    with 503 while set), then `fail_next` failures, then `reset_next` / `truncate_next` (body
    cut after half its bytes); `tamper`, `ignore_range`, `misanswer` (a 206 whose
    "content-range" is one byte off, or whose "content-length" and body are one byte short)
    and `drop_idle` (the connection closed after each blob answer, without saying so, as a
    server ends an idle keep-alive connection) apply to every blob answer until changed. With `token_auth`, every /v2/
    request needs a bearer token from /token (realm on the same server) that the server
    accepts for `token_ttl_s` seconds; the token response announces `expires_in`
    (default: the true lifetime), so a test can make tokens die earlier than announced.
    Counters are `counts` (kind -> requests: ping, manifest, blob, token, unauthorized,
    failed, reset, truncated; and connection, per TCP connection accepted), `paths`, `blob_ranges` and `bytes_served`.
    """

    def __init__(self, layer: bytes, *, token_auth: bool = True,
                 diff_ids: bool = False) -> None:
        self.layer = layer
        self.token_auth = token_auth
        # diff_ids: a config that lists the layer's (what `index --all-layers` requires).
        listed = [_digest(gzip.decompress(layer))] if diff_ids else []
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": listed}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": GZIP_LAYER, "digest": _digest(layer), "size": len(layer)}],
        }).encode()
        self.layer_digest = _digest(layer)
        self.manifest_digest = _digest(manifest)
        self.blobs = {self.layer_digest: layer, _digest(config): config}
        self.manifests = {TAG: manifest, self.manifest_digest: manifest}
        self.lock = threading.Lock()
        # Fault switches (public: tests may set them directly at any time).
        self.ignore_range = False
        self.dead = False
        self.delay_s = 0.0
        self.misanswer: str | None = None
        self.drop_idle = False
        self.token_ttl_s = 300.0
        self.expires_in: float | None = None
        self.tampered: set[int] = set()
        self._fail: list[tuple[int, int | None]] = []  # (status, retry_after) per next request
        self._cut: list[str] = []  # "reset" or "truncate" per next request
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.reset_counters()
        self.server = _Server(self)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- for tests ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def ref(self) -> str:
        return f"{self.host}/{REPOSITORY}:{TAG}"

    @property
    def token_requests(self) -> int:
        return self.counts["token"]

    @property
    def blob_requests(self) -> int:
        return self.counts["blob"]

    @property
    def pending(self) -> int:
        """Queued one-shot faults (fail_next, reset_next, truncate_next) not yet served."""
        with self.lock:
            return len(self._fail) + len(self._cut)

    def fail_next(self, n: int, status: int = 503, retry_after: int | None = None) -> None:
        with self.lock:
            self._fail += [(status, retry_after)] * n

    def reset_next(self, n: int) -> None:
        with self.lock:
            self._cut += ["reset"] * n

    def truncate_next(self, n: int) -> None:
        with self.lock:
            self._cut += ["truncate"] * n

    def tamper(self, offset: int | None) -> None:
        """Flip every bit of the blob byte at `offset` in answers; None clears all tampering."""
        with self.lock:
            if offset is None:
                self.tampered.clear()
            else:
                self.tampered.add(offset)

    def expire_tokens(self) -> None:
        """Every token handed out so far is refused from now on (as a server that restarted)."""
        with self.lock:
            self._tokens.clear()

    def clear_faults(self) -> None:
        with self.lock:
            self._fail.clear()
            self._cut.clear()
            self.tampered.clear()
            self.ignore_range, self.delay_s, self.dead = False, 0.0, False
            self.misanswer, self.drop_idle = None, False

    def reset_counters(self) -> None:
        with self.lock:
            self.counts: Counter[str] = Counter()
            self.paths: Counter[str] = Counter()
            self.blob_ranges: list[tuple[int, int]] = []  # (offset, end inclusive) asked for
            self.bytes_served = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # -- used by the handler -----------------------------------------------------------------
    def count(self, kind: str, path: str = "", served: int = 0) -> None:
        with self.lock:
            self.counts[kind] += 1
            if path:
                self.paths[path] += 1
            self.bytes_served += served

    def issue_token(self) -> tuple[str, float]:
        token = secrets.token_urlsafe(16)
        with self.lock:
            self._tokens[token] = time.monotonic() + self.token_ttl_s
            self.counts["token"] += 1
            return token, self.expires_in if self.expires_in is not None else self.token_ttl_s

    def authorized(self, header: str | None) -> bool:
        if not self.token_auth:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        with self.lock:
            expiry = self._tokens.get(header[7:])
        return expiry is not None and time.monotonic() < expiry

    def next_fault(self) -> tuple[tuple[int, int | None] | None, str | None]:
        with self.lock:
            if self.dead:
                return (503, None), None
            failure = self._fail.pop(0) if self._fail else None
            cut = self._cut.pop(0) if self._cut and failure is None else None
            return failure, cut


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, registry: FaultRegistry) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.registry = registry

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that drop connections (resets, abandoned 200s) are part of the game


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.registry.count("connection")  # one per TCP connection: keep-alive reuse shows

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def registry(self) -> FaultRegistry:
        assert isinstance(self.server, _Server)
        return self.server.registry

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        reg, path = self.registry, self.path.split("?", 1)[0]
        if path == "/token":
            token, expires_in = reg.issue_token()
            body = {"token": token, "expires_in": expires_in,
                    "issued_at": datetime.now(UTC).isoformat()}
            return self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        if not reg.authorized(self.headers.get("Authorization")):
            reg.count("unauthorized", path)
            scope = f'scope="repository:{REPOSITORY}:pull",' if path != "/v2/" else ""
            challenge = f'Bearer realm="http://{reg.host}/token",{scope}service="{SERVICE}"'
            return self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                              {"WWW-Authenticate": challenge})
        prefix = f"/v2/{REPOSITORY}/"
        if path == "/v2/":
            reg.count("ping", path)
            return self.reply(200, b"{}")
        if path.startswith(prefix + "manifests/"):
            reg.count("manifest", path)
            manifest = reg.manifests.get(path[len(prefix + "manifests/"):])
            if manifest is None:
                return self.reply(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            return self.reply(200, manifest, {"Content-Type": OCI_MANIFEST,
                                              "Docker-Content-Digest": _digest(manifest)})
        if path.startswith(prefix + "blobs/"):
            blob = reg.blobs.get(path[len(prefix + "blobs/"):])
            if blob is None:
                reg.count("blob", path)
                return self.reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            return self.blob(path, blob)
        reg.count("other", path)
        self.reply(404)

    def blob(self, path: str, blob: bytes) -> None:
        reg = self.registry
        offset, end, status = 0, len(blob) - 1, 200
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if match and not reg.ignore_range:
            offset, status = int(match[1]), 206
            end = min(int(match[2]), len(blob) - 1) if match[2] else len(blob) - 1
            if offset >= len(blob) or end < offset:
                reg.count("blob", path)
                return self.reply(416, b"", {"Content-Range": f"bytes */{len(blob)}"})
        with reg.lock:
            reg.blob_ranges.append((offset, end))
            delay_s, tampered = reg.delay_s, sorted(reg.tampered)
            misanswer, drop_idle = reg.misanswer, reg.drop_idle
        if delay_s:
            time.sleep(delay_s)
        failure, cut = reg.next_fault()
        if failure is not None:
            reg.count("failed")
            reg.count("blob", path)
            status_code, retry_after = failure
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return self.reply(status_code, b"unavailable", headers)
        body = bytearray(blob[offset : end + 1])
        for position in tampered:
            if offset <= position <= end:
                body[position - offset] ^= 0xFF
        named = (offset + 1, end + 1) if misanswer == "content-range" else (offset, end)
        if status == 206 and misanswer == "content-length":
            del body[-1:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {named[0]}-{named[1]}/{len(blob)}")
        self.end_headers()
        send = len(body) // 2 if cut else len(body)
        view = memoryview(body)
        sent = 0
        try:
            for at in range(0, send, _WRITE):
                piece = view[at : min(send, at + _WRITE)]
                self.wfile.write(piece)
                sent += len(piece)
        except OSError:
            self.close_connection = True  # the client went away (e.g. a 200 it stopped reading)
        reg.count("blob", path, served=sent)
        if drop_idle:
            self.close_connection = True  # no "Connection: close": the client finds out later
        if cut:
            reg.count(cut)
            self.close_connection = True
            if cut == "reset":  # SO_LINGER 0: close() sends RST instead of FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            self.connection.close()
