"""RangeGetter (oci/rangeget.py) on its own, over TLS: the server's certificate and name are
verified as httpx verifies them, and a malformed answer is an error. A loopback TLS server of
the stdlib (what is tested is our client's TLS, not a registry)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hybrid_erofs.oci.rangeget import RangeGetter

BLOB = bytes(range(256)) * 4096


def _certificate(directory: Path, names: list[x509.GeneralName]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rangeget-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/garbage":
            self.wfile.write(b"NOT-HTTP\r\n\r\n")
            self.close_connection = True
            return
        first, last = (int(n) for n in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = BLOB[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(BLOB)}")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A TLS server on 127.0.0.1 whose self-signed certificate names 127.0.0.1 only."""
    cert, key = _certificate(tmp_path_factory.mktemp("tls"),
                             [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), cert
    finally:
        server.shutdown()
        server.server_close()


def _request(url: str, first: int, last: int) -> httpx.Request:
    return httpx.Client().build_request("GET", url, headers={"Range": f"bytes={first}-{last}"})


def test_tls_with_a_trusted_certificate(tls_server: tuple[int, Path]) -> None:
    port, cert = tls_server
    getter = RangeGetter(timeout_s=5, ssl_context=ssl.create_default_context(cafile=cert))
    try:
        for first, last in ((0, 99), (5000, 300_000), (len(BLOB) - 1, len(BLOB) - 1)):
            with getter.open(_request(f"https://127.0.0.1:{port}/blob", first, last)) as answer:
                assert answer.status == 206
                assert answer.read(last - first + 1) == BLOB[first : last + 1]
    finally:
        getter.close()


def test_tls_refuses_an_unknown_certificate(tls_server: tuple[int, Path]) -> None:
    port, _ = tls_server
    getter = RangeGetter(timeout_s=5)  # httpx's default trust: the system's CAs
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        getter.open(_request(f"https://127.0.0.1:{port}/blob", 0, 9))


def test_tls_refuses_a_certificate_for_another_name(tls_server: tuple[int, Path]) -> None:
    port, cert = tls_server
    getter = RangeGetter(timeout_s=5, ssl_context=ssl.create_default_context(cafile=cert))
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        getter.open(_request(f"https://localhost:{port}/blob", 0, 9))


def test_a_malformed_answer_is_an_error(tls_server: tuple[int, Path]) -> None:
    port, cert = tls_server
    getter = RangeGetter(timeout_s=5, ssl_context=ssl.create_default_context(cafile=cert))
    with pytest.raises(OSError, match="malformed status line b'NOT-HTTP'"):
        getter.open(_request(f"https://127.0.0.1:{port}/garbage", 0, 9))


def test_only_get_and_no_header_injection() -> None:
    getter = RangeGetter(timeout_s=1)
    with pytest.raises(OSError, match="only GET"):
        getter.open(httpx.Request("POST", "http://127.0.0.1:9/"))
    with pytest.raises(OSError, match="line break"):
        getter.open(httpx.Request("GET", "http://127.0.0.1:9/", headers={"X": "a\nb"}))
    with socket.socket() as probe:  # a port nobody listens on: refused, an OSError
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError):
        getter.open(httpx.Request("GET", f"http://127.0.0.1:{port}/"))
