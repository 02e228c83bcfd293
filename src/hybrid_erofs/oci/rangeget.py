"""RangeGetter: ranged GETs of blob bytes on keep-alive HTTP/1.1 connections of its own, the
body received straight into one buffer (httpx/h11 parse, slice and copy every 64 KiB). Only the
data plane: requests come built (and authorized) by httpx, and what is not a plain answer with
a Content-Length body is left to the caller's httpx path."""

from __future__ import annotations

import socket
import ssl
import threading
import urllib.request
from dataclasses import dataclass, field

import httpx

_MAX_HEAD = 64 << 10  # status line and headers; registries send a few hundred bytes
_MAX_IDLE = 16  # idle connections kept per origin (the registry client's pool size)


class ShortBody(OSError):
    """The connection ended (or failed) before the whole body arrived; `received` bytes did."""

    def __init__(self, received: int, cause: str) -> None:
        super().__init__(cause)
        self.received = received


@dataclass(slots=True)
class _Connection:
    sock: socket.socket
    origin: tuple[str, str, int]
    pending: bytes = b""  # bytes received past the head: the body's start
    used: bool = False  # answered a request before: the server may have closed it meanwhile


@dataclass(slots=True)
class Answer:
    """A response whose head was read; its body is still on the connection. Read it with
    `read` or drop it with `close` (the connection goes back to the pool only after a read)."""

    status: int
    headers: httpx.Headers
    _getter: RangeGetter = field(repr=False)
    _connection: _Connection | None = field(repr=False)

    def read(self, length: int) -> bytes:
        """The body, which the caller checked to be `length` bytes (Content-Length); raises
        ShortBody when fewer arrive."""
        connection = self._connection
        assert connection is not None, "body read twice"
        self._connection = None
        buffer = bytearray(length)
        view = memoryview(buffer)
        filled = min(len(connection.pending), length)
        view[:filled] = connection.pending[:filled]
        extra = len(connection.pending) > length  # more than the body: never reuse it
        try:
            while filled < length:
                got = connection.sock.recv_into(view[filled:], length - filled)
                if not got:
                    raise ShortBody(filled, "connection closed by the server")
                filled += got
        except ShortBody:
            connection.sock.close()
            raise
        except OSError as exc:  # reset, timeout, TLS failure
            connection.sock.close()
            raise ShortBody(filled, f"{type(exc).__name__}: {exc}") from exc
        finally:
            view.release()
        connection.pending = b""
        if extra or self.headers.get("connection", "").lower() == "close":
            connection.sock.close()
        else:
            self._getter.release(connection)
        return bytes(buffer)

    def close(self) -> None:
        """Drop the body unread: the connection is closed, not reused."""
        if self._connection is not None:
            self._connection.sock.close()
            self._connection = None

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RangeGetter:
    """Sends GET requests built by httpx on its own pooled HTTP/1.1 connections. Thread-safe.

    Same trust as the httpx client it stands beside: TLS with httpx's default context
    (certificates verified, SSL_CERT_FILE/SSL_CERT_DIR honoured), the client's timeout for
    connecting and for every receive. A request on a reused connection that the server had
    closed while idle is sent once more on a new one (nothing of its answer was received).
    Ask `direct_for(client, url)` first: where httpx would go through a proxy the
    environment names, httpx's path must be taken (this one connects directly).
    """

    def __init__(self, *, timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self._timeout_s = timeout_s
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closed = False
        # direct_for's answers per (client, scheme, host, port): httpx chose its proxies when
        # the client was made, so they hold for the client's life (reading the environment
        # again at every read took 60 us).
        self._direct: dict[tuple[int, str, str, int | None], bool] = {}

    def direct_for(self, client: httpx.Client, url: httpx.URL) -> bool:
        """True when `client` would connect to `url` itself: no proxy in the environment, or
        NO_PROXY names the host (httpx's own reading of the variables decides)."""
        key = (id(client), url.scheme, url.host, url.port)
        found = self._direct.get(key)
        if found is None:
            found = self._direct[key] = self._decide(client, url)
        return found

    @staticmethod
    def _decide(client: httpx.Client, url: httpx.URL) -> bool:
        if not urllib.request.getproxies():
            return True
        try:
            transport_for = client._transport_for_url  # httpx's choice of proxy per URL
            return transport_for(url) is client._transport
        except AttributeError:  # another httpx: never bypass a proxy it might use
            return False

    def open(self, request: httpx.Request) -> Answer:
        """Send `request` (a GET without a body) and read the answer's head; raises OSError
        (connection refused, reset, timeout, TLS failure, a malformed head)."""
        url = request.url
        if url.scheme not in ("http", "https"):
            raise OSError(f"unsupported URL scheme {url.scheme!r}")
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        message = self._serialize(request)
        for attempt in range(2):
            connection = self._take(origin)
            try:
                connection.sock.sendall(message)
                status, headers, pending = self._read_head(connection)
            except _StaleConnection:
                connection.sock.close()
                if attempt == 0:
                    continue
                raise OSError("connection closed by the server before an answer") from None
            except BaseException:
                connection.sock.close()
                raise
            connection.pending, connection.used = pending, True
            return Answer(status, headers, self, connection)
        raise AssertionError("unreachable")  # pragma: no cover

    def release(self, connection: _Connection) -> None:
        """Keep a connection whose last answer was read in full, for the next request."""
        with self._lock:
            idle = self._idle.setdefault(connection.origin, [])
            if self._closed or len(idle) >= _MAX_IDLE:
                connection.sock.close()
            else:
                idle.append(connection)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.sock.close()

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _serialize(request: httpx.Request) -> bytes:
        if request.method != "GET":
            raise OSError(f"{request.method}: only GET is sent here")
        lines = [b"GET " + request.url.raw_path + b" HTTP/1.1"]
        for name, value in request.headers.raw:
            if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
                raise OSError("header with a line break")
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _take(self, origin: tuple[str, str, int]) -> _Connection:
        with self._lock:
            if self._closed:
                raise OSError("range getter closed")
            idle = self._idle.get(origin)
            if idle:
                return idle.pop()
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout=self._timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                context = self._ssl_context or default_ssl_context()
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock, origin)

    @staticmethod
    def _read_head(connection: _Connection) -> tuple[int, httpx.Headers, bytes]:
        received = b""
        while True:
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(received) > _MAX_HEAD:
                raise OSError(f"response head longer than {_MAX_HEAD} bytes")
            try:
                chunk = connection.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError) as exc:
                if connection.used and not received:
                    raise _StaleConnection from exc
                raise
            if not chunk:
                if connection.used and not received:
                    raise _StaleConnection
                raise OSError("connection closed by the server in the response head")
            received += chunk
        lines = received[:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not (
                parts[1].isdigit() and len(parts[1]) == 3):
            raise OSError(f"malformed status line {lines[0][:80]!r}")
        raw: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise OSError(f"malformed header line {line[:80]!r}")
            raw.append((name, value.strip()))
        headers = httpx.Headers(raw)
        if parts[0] == b"HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            headers["connection"] = "close"
        return int(parts[1]), headers, received[end + 4:]


class _StaleConnection(Exception):
    """A reused connection the server had closed: nothing of the answer arrived."""


_CONTEXT: list[ssl.SSLContext] = []
_CONTEXT_LOCK = threading.Lock()


def default_ssl_context() -> ssl.SSLContext:
    """httpx's default TLS context (certificates verified, SSL_CERT_FILE/SSL_CERT_DIR
    honoured), built once per process and shared by every client: loading the CA bundle
    takes about 28 ms, which each httpx.Client made without it would pay again."""
    with _CONTEXT_LOCK:
        if not _CONTEXT:
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            _CONTEXT.append(context)
        return _CONTEXT[0]


__all__ = ["Answer", "RangeGetter", "ShortBody", "default_ssl_context"]
