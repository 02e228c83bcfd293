"""A read-only NBD server (fixed newstyle, structured replies, base:allocation) for one ByteSource.

Protocol only: the caller builds the device (device.open_device) and owns it. Top of the stack.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import cast

from ..errors import InvalidInput
from ..source import ByteSource
from .nbdconn import MAX_PAYLOAD, Connection, Export

log = logging.getLogger("hybrid_erofs.nbd")

Address = str | tuple[str, int]


class NbdServer:
    """Serve `source` read-only over NBD until shutdown(); many connections, pipelined requests.

    Args:
        source: the device to export; not owned (the caller closes it after serving).
        socket_path: listen on this unix socket (created mode 0600, removed at shutdown).
        listen: also/instead listen on this TCP (host, port); port 0 picks a free port.
        export_name: the export's name; the empty (default) name is accepted too.
        description: sent as NBD_INFO_DESCRIPTION and in NBD_OPT_LIST.
        workers: reader threads per connection (replies may go out of order). Default 4:
            on 2 CPUs, 8 lost ~25% throughput to GIL contention on page-cached and gzip
            reads (tools/bench_nbd.py); raise it for high-latency (network) sources.
        inflight_bytes: per connection, stop reading requests while this many bytes of READs
            are being served (backpressure; one larger request still runs alone).
        grace_s: at shutdown, how long in-flight replies may take before sockets are cut.

    Sockets are bound in the constructor, so `addresses` is known before serve_forever().
    Thread-safe: shutdown() may be called from any thread.
    """

    def __init__(self, source: ByteSource, *, socket_path: Path | None = None,
                 listen: tuple[str, int] | None = None, export_name: str = "",
                 description: str = "", workers: int = 4, inflight_bytes: int = 128 << 20,
                 grace_s: float = 30.0) -> None:
        if socket_path is None and listen is None:
            raise ValueError("give 'socket_path' and/or 'listen'")
        if workers < 1:
            raise ValueError(f"'workers' must be >= 1 (got {workers})")
        for label, text in (("export_name", export_name), ("description", description)):
            if len(text.encode()) > 4096:
                raise ValueError(f"'{label}' must be at most 4096 bytes of UTF-8")
        self.export = Export(source, export_name, description, workers, inflight_bytes)
        self.grace_s = grace_s
        self._listeners: list[socket.socket] = []
        self._socket_path: Path | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._serving = False
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._counter = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        try:
            if socket_path is not None:
                self._listeners.append(_bind_unix(Path(socket_path)))
                self._socket_path = Path(socket_path)
            if listen is not None:
                self._listeners.append(_bind_tcp(listen))
        except BaseException:
            self._close_listeners()
            raise

    @property
    def addresses(self) -> list[Address]:
        """Bound addresses: the unix socket path and/or the TCP (host, port)."""
        out: list[Address] = []
        for sock in self._listeners:
            name = sock.getsockname()
            out.append(name if isinstance(name, str) else (name[0], name[1]))
        return out

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return next((a for a in self.addresses if isinstance(a, tuple)), None)

    @property
    def socket_path(self) -> Path | None:
        return self._socket_path

    @property
    def size(self) -> int:
        return self.export.source.size

    def serve_forever(self, *, stop: threading.Event | None = None) -> None:
        """Accept and serve connections until shutdown() (or `stop` is set), then drain."""
        with self._lock:
            if self._serving or self._done.is_set():
                raise RuntimeError("serve_forever() may run only once")
            self._serving = True
        log.info("serving %d bytes as %r on %s", self.size, self.export.name,
                 ", ".join(map(str, self.addresses)))
        try:
            with selectors.DefaultSelector() as selector:
                for sock in self._listeners:
                    selector.register(sock, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    if stop is not None and stop.is_set():
                        break
                    for key, _ in selector.select(0.25 if stop is not None else None):
                        if key.fileobj is not self._wake_r:
                            self._accept(cast(socket.socket, key.fileobj))
        finally:
            self._stopping.set()
            self._drain()
            self._done.set()

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop accepting, let in-flight replies finish, close every socket.

        With `wait` (the default) return once serve_forever() has finished; pass wait=False
        from a signal handler running on the serving thread.
        """
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        with self._lock:
            serving = self._serving
        if not serving:
            self._drain()
            self._done.set()
        elif wait:
            self._done.wait()

    def close(self) -> None:
        self.shutdown()

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._counter += 1
            label = f"#{self._counter} {peer or 'unix'}"
            conn = Connection(self.export, sock, label, stopping=self._stopping,
                              on_close=self._forget)
            self._connections.add(conn)
        conn.thread.start()

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _drain(self) -> None:
        """Close listeners, stop reading requests, wait for in-flight replies, cut the rest."""
        self._close_listeners()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.stop_reading()
        for conn in conns:
            conn.thread.join(self.grace_s)
        for conn in conns:
            if conn.thread.is_alive():
                log.warning("%s: in-flight requests did not finish in %.1f s; closing",
                            conn.label, self.grace_s)
                conn.abort()
        for conn in conns:
            conn.thread.join(1.0)
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        self._listeners = []
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
            self._socket_path = None


def _bind_unix(path: Path) -> socket.socket:
    """Listen on a unix socket created mode 0600; replace a stale socket file, nothing else."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidInput(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # stale: nobody listens
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot check existing socket: {exc.strerror}") from exc
        else:
            raise InvalidInput(f"{path}: another server is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the socket inode's mode (minus umask): no window
        # in which another user could connect; chmod again for other platforms.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"{path}: cannot listen: {exc.strerror or exc}") from exc
    return sock


def _bind_tcp(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=64)
    except OSError as exc:
        raise InvalidInput(f"{host}:{port}: cannot listen: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _signals_stop(server: NbdServer) -> Iterator[None]:
    """On the main thread, SIGTERM/SIGINT shut the server down cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        server.shutdown(wait=False)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def serve_nbd(source: ByteSource, *, socket_path: Path | None = None,
              listen: tuple[str, int] | None = None, export_name: str = "",
              description: str = "", ready: Callable[[NbdServer], None] | None = None,
              stop: threading.Event | None = None) -> None:
    """Serve `source` in the foreground until SIGTERM/SIGINT (main thread) or `stop` is set.

    `ready(server)` is called once the sockets listen (e.g. to write a pidfile or print the
    address). `source` is not closed.
    """
    with NbdServer(source, socket_path=socket_path, listen=listen, export_name=export_name,
                   description=description) as server, _signals_stop(server):
        if ready is not None:
            ready(server)
        server.serve_forever(stop=stop)


__all__ = ["MAX_PAYLOAD", "NbdServer", "serve_nbd"]
