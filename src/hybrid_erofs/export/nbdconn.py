"""One NBD connection: fixed-newstyle handshake, then pipelined requests on a worker pool.

Used by export/nbd.py (NbdServer), which accepts sockets and owns the lifecycle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import already_logged
from ..source import ByteSource, FileRanged
from . import nbdwire as w

log = logging.getLogger("hybrid_erofs.nbd")

MAX_PAYLOAD = 32 << 20  # advertised max payload; READ/WRITE above it get EINVAL / a close
MIN_BLOCK = 512
PREFERRED_BLOCK = 4096
MAX_OPTION_LENGTH = 64 << 10  # option data cap (strings are <= 4096 bytes, proto.md "Conventions")
META_CONTEXT_ID = 1  # our id for base:allocation once selected


@dataclass(frozen=True, slots=True)
class Export:
    """What every connection serves, and how (see NbdServer for the meaning of each field)."""

    source: ByteSource
    name: str
    description: str
    workers: int
    inflight_bytes: int


class _PeerGone(Exception):
    """The client closed (or broke) the connection; `received` bytes of the message had arrived."""

    def __init__(self, received: int, wanted: int) -> None:
        super().__init__(f"connection closed after {received} of {wanted} bytes")
        self.received = received


# Reads at least this long from a file-backed source go out with sendfile(2).
SENDFILE_MIN = 64 << 10


class _Violation(Exception):
    """The client broke a MUST of the protocol: hard disconnect (proto.md "Termination")."""


def _sendmsg_all(sock: socket.socket, buffers: list[bytes]) -> None:
    """Send the buffers back to back without joining them (sendmsg may send partially)."""
    views = [memoryview(b) for b in buffers if b]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


class Connection:
    """One client: handshake, then a request loop feeding a worker pool; replies under a lock."""

    def __init__(self, export: Export, sock: socket.socket, label: str, *,
                 stopping: threading.Event, on_close: Callable[[Connection], None]) -> None:
        self.export = export
        self.source = export.source
        self._stopping = stopping
        self._on_close = on_close
        self.sock = sock
        self.label = label
        self.thread = threading.Thread(target=self._run, name=f"nbd-conn{label.split()[0]}",
                                       daemon=True)
        self.structured = False
        self.no_zeroes = False
        self.meta_selected = False
        self._send_lock = threading.Lock()
        self._broken = False
        self._cond = threading.Condition()
        self._inflight = 0
        self._inflight_bytes = 0
        # (cookie, offset, length) of READs for the workers; None stops one worker.
        self._jobs: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()

    # -- lifecycle --------------------------------------------------------------------------

    def stop_reading(self) -> None:
        # SHUT_RD wakes a blocked recv() with EOF; the write side stays open for replies.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        workers: list[threading.Thread] = []
        try:
            log.debug("%s: connected", self.label)
            if self._handshake():
                workers = [threading.Thread(target=self._worker, daemon=True,
                                            name=f"nbd-io{self.label.split()[0]}.{i}")
                           for i in range(self.export.workers)]
                for thread in workers:
                    thread.start()
                self._transmission()
        except _PeerGone as exc:
            if exc.received:
                log.warning("%s: client vanished mid-message (%s)", self.label, exc)
            else:
                log.info("%s: client closed the connection", self.label)
        except _Violation as exc:
            log.warning("%s: protocol violation, closing: %s", self.label, exc)
        except OSError as exc:
            log.warning("%s: connection error: %s", self.label, exc)
        except Exception:
            log.exception("%s: unexpected error; closing this connection", self.label)
        finally:
            # Queued and in-flight replies finish before the close (skipped once broken).
            for _ in workers:
                self._jobs.put(None)
            for thread in workers:
                thread.join()
            with contextlib.suppress(OSError):
                self.sock.close()
            self._on_close(self)
            log.debug("%s: closed", self.label)

    def _worker(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._read(*job)

    # -- receiving --------------------------------------------------------------------------

    def _recv(self, length: int) -> bytes:
        first = self.sock.recv(length)  # usually the whole message
        if len(first) == length:
            return first
        buf = bytearray(length)
        view = memoryview(buf)
        view[:len(first)] = first
        got = len(first)
        if got == 0:
            raise _PeerGone(0, length)
        while got < length:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise _PeerGone(got, length)
            got += n
        return bytes(buf)

    def _discard(self, length: int) -> None:
        """Read and drop `length` bytes (a WRITE payload or an over-long option)."""
        scratch = bytearray(min(length, 1 << 20))
        left = length
        while left:
            n = self.sock.recv_into(scratch, min(left, len(scratch)))
            if n == 0:
                raise _PeerGone(length - left, length)
            left -= n

    # -- sending ----------------------------------------------------------------------------

    def _send(self, *buffers: bytes) -> None:
        with self._send_lock:
            if self._broken:
                return
            try:
                _sendmsg_all(self.sock, list(buffers))
            except OSError as exc:
                self._broken = True
                log.warning("%s: cannot send reply: %s", self.label, exc)
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)  # wake the request loop

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._send(w.OPTION_REPLY.pack(w.OPTION_REPLY_MAGIC, option, reply, len(data)), data)

    def _simple(self, cookie: int, error: int, data: bytes = b"") -> None:
        self._send(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, error, cookie), data)

    def _error(self, cookie: int, error: int, message: str, *, chunk: bool) -> None:
        """An error reply: an ERROR chunk for READ/BLOCK_STATUS once structured, else simple."""
        if chunk and self.structured:
            text = message.encode()[:4096]
            payload = w.U32.pack(error) + w.U16.pack(len(text)) + text
            self._send(w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                    w.REPLY_TYPE_ERROR, cookie, len(payload)), payload)
        else:
            self._simple(cookie, error)

    def transmission_flags(self) -> int:
        flags = (w.FLAG_HAS_FLAGS | w.FLAG_READ_ONLY | w.FLAG_SEND_FLUSH | w.FLAG_SEND_CACHE
                 | w.FLAG_CAN_MULTI_CONN)
        if self.structured:
            flags |= w.FLAG_SEND_DF  # every READ reply is one chunk anyway
        return flags

    # -- handshake (proto.md "Fixed newstyle negotiation") -----------------------------------

    def _handshake(self) -> bool:
        """Negotiate; True when transmission starts, False when the client gave up."""
        self._send(w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT,
                                   w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES))
        (cflags,) = w.CLIENT_FLAGS.unpack(self._recv(w.CLIENT_FLAGS.size))
        if cflags & ~(w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES):
            raise _Violation(f"unknown client flags {cflags:#x}")  # server MUST close
        fixed = bool(cflags & w.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & w.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = w.OPTION.unpack(self._recv(w.OPTION.size))
            if magic != w.IHAVEOPT:
                raise _Violation(f"bad option magic {magic:#x}")
            if not fixed and option != w.OPT_EXPORT_NAME:
                raise _Violation(f"option {option} without fixed newstyle")
            if length > MAX_OPTION_LENGTH:
                if option == w.OPT_EXPORT_NAME:
                    raise _Violation(f"EXPORT_NAME of {length} bytes")
                self._discard(length)
                self._option_reply(option, w.REP_ERR_TOO_BIG, b"option data too long")
                continue
            data = self._recv(length)
            if self._stopping.is_set() and option != w.OPT_ABORT:
                if option == w.OPT_EXPORT_NAME:
                    return False
                self._option_reply(option, w.REP_ERR_SHUTDOWN, b"server is shutting down")
                continue
            done = self._option(option, data)
            if done is not None:
                return done

    def _option(self, option: int, data: bytes) -> bool | None:
        """Answer one option; True = enter transmission, False = end, None = keep haggling."""
        if option == w.OPT_EXPORT_NAME:
            name = _decode(data)
            if name is None or not self._known(name):
                raise _Violation(f"EXPORT_NAME for unknown export {data[:64]!r}")
            zeroes = b"" if self.no_zeroes else bytes(w.EXPORT_NAME_ZEROES)
            self._send(w.EXPORT_NAME_REPLY.pack(self.source.size, self.transmission_flags()),
                       zeroes)
            log.debug("%s: EXPORT_NAME %r", self.label, name)
            return True
        if option == w.OPT_ABORT:
            # The client may close without reading the ACK: not worth a warning.
            with self._send_lock, contextlib.suppress(OSError):
                self.sock.sendall(w.OPTION_REPLY.pack(w.OPTION_REPLY_MAGIC, option, w.REP_ACK, 0))
            return False
        if option == w.OPT_LIST:
            if data:
                self._option_reply(option, w.REP_ERR_INVALID, b"LIST takes no data")
                return None
            export = self.export.name.encode()
            self._option_reply(option, w.REP_SERVER,
                               w.U32.pack(len(export)) + export + self.export.description.encode())
            self._option_reply(option, w.REP_ACK)
            return None
        if option == w.OPT_STARTTLS:
            self._option_reply(option, w.REP_ERR_POLICY, b"TLS is not supported")
            return None
        if option in (w.OPT_INFO, w.OPT_GO):
            return self._info(option, data)
        if option == w.OPT_STRUCTURED_REPLY:
            if data:
                self._option_reply(option, w.REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._option_reply(option, w.REP_ACK)
            return None
        if option in (w.OPT_LIST_META_CONTEXT, w.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        self._option_reply(option, w.REP_ERR_UNSUP, f"option {option} not supported".encode())
        return None

    def _known(self, name: str) -> bool:
        return name in ("", self.export.name)

    def _info(self, option: int, data: bytes) -> bool | None:
        """NBD_OPT_INFO / NBD_OPT_GO: u32 namelen, name, u16 nreq, u16 req[nreq]."""
        if len(data) < 6:
            self._option_reply(option, w.REP_ERR_INVALID, b"truncated INFO/GO request")
            return None
        (namelen,) = w.U32.unpack_from(data, 0)
        if namelen > len(data) - 6:
            self._option_reply(option, w.REP_ERR_INVALID, b"name length past the data")
            return None
        name = _decode(data[4:4 + namelen])
        (nreq,) = w.U16.unpack_from(data, 4 + namelen)
        if 4 + namelen + 2 + 2 * nreq != len(data):
            self._option_reply(option, w.REP_ERR_INVALID, b"INFO/GO length mismatch")
            return None
        if name is None:
            self._option_reply(option, w.REP_ERR_INVALID, b"export name is not UTF-8")
            return None
        if not self._known(name):
            self._option_reply(option, w.REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return None
        requests = {w.U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(nreq)}
        self._option_reply(option, w.REP_INFO, w.U16.pack(w.INFO_EXPORT)
                           + w.EXPORT_NAME_REPLY.pack(self.source.size, self.transmission_flags()))
        if w.INFO_NAME in requests:
            self._option_reply(option, w.REP_INFO,
                               w.U16.pack(w.INFO_NAME) + self.export.name.encode())
        if w.INFO_DESCRIPTION in requests and self.export.description:
            self._option_reply(option, w.REP_INFO,
                               w.U16.pack(w.INFO_DESCRIPTION) + self.export.description.encode())
        if w.INFO_BLOCK_SIZE in requests:
            minimum = MIN_BLOCK if self.source.size % MIN_BLOCK == 0 else 1
            self._option_reply(option, w.REP_INFO, w.U16.pack(w.INFO_BLOCK_SIZE)
                               + w.U32.pack(minimum) + w.U32.pack(PREFERRED_BLOCK)
                               + w.U32.pack(MAX_PAYLOAD))
        self._option_reply(option, w.REP_ACK)
        if option == w.OPT_GO:
            log.debug("%s: GO %r structured=%s", self.label, name, self.structured)
            return True
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        """u32 namelen, name, u32 nqueries, {u32 len, query}* (proto.md "Metadata querying")."""
        try:
            name, queries = _parse_meta_request(data)
        except ValueError as exc:
            self._option_reply(option, w.REP_ERR_INVALID, str(exc).encode())
            return
        if option == w.OPT_SET_META_CONTEXT and not self.structured:
            self._option_reply(option, w.REP_ERR_INVALID, b"negotiate STRUCTURED_REPLY first")
            return
        if not self._known(name):
            self._option_reply(option, w.REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        if option == w.OPT_LIST_META_CONTEXT:
            # No query lists everything; "base:" lists the whole namespace.
            match = not queries or any(q in ("base:", w.BASE_ALLOCATION) for q in queries)
            context_id = 0
        else:
            match = w.BASE_ALLOCATION in queries  # SET replaces the selection
            self.meta_selected = match
            context_id = META_CONTEXT_ID
        if match:
            self._option_reply(option, w.REP_META_CONTEXT,
                               w.U32.pack(context_id) + w.BASE_ALLOCATION.encode())
        self._option_reply(option, w.REP_ACK)

    # -- transmission (proto.md "Transmission") ----------------------------------------------

    def _transmission(self) -> None:
        size = self.source.size
        while True:
            try:
                header = self._recv(w.REQUEST.size)
            except _PeerGone as exc:
                if exc.received == 0:  # EOF at a request boundary: a normal close (nbdfuse)
                    log.debug("%s: client closed without DISC", self.label)
                    return
                raise
            magic, flags, command, cookie, offset, length = w.REQUEST.unpack(header)
            if magic != w.REQUEST_MAGIC:
                raise _Violation(f"bad request magic {magic:#x}")
            if command == w.CMD_DISC:
                log.debug("%s: DISC", self.label)
                return
            if command == w.CMD_WRITE:
                if length > MAX_PAYLOAD:  # the payload cannot be trusted: drop the connection
                    raise _Violation(f"WRITE of {length} bytes exceeds {MAX_PAYLOAD}")
                self._discard(length)
                self._simple(cookie, w.EPERM)
                continue
            in_range = offset + length <= size
            if command == w.CMD_READ:
                allowed = w.CMD_FLAG_FUA | (w.CMD_FLAG_DF if self.structured else 0)
                if flags & ~allowed:
                    self._error(cookie, w.EINVAL, f"bad READ flags {flags:#x}", chunk=True)
                elif length > MAX_PAYLOAD:
                    self._error(cookie, w.EINVAL, f"READ of {length} bytes exceeds "
                                f"{MAX_PAYLOAD}", chunk=True)
                elif not in_range:
                    self._error(cookie, w.EINVAL, f"READ of {length} bytes at {offset} is past "
                                f"the end ({size})", chunk=True)
                elif length == 0:
                    self._read_reply(cookie, offset, b"")
                else:
                    self._acquire(length)
                    self._jobs.put((cookie, offset, length))
            elif command in (w.CMD_FLUSH, w.CMD_CACHE):
                ok = command == w.CMD_FLUSH or in_range
                self._simple(cookie, 0 if ok and not flags & ~w.CMD_FLAG_FUA else w.EINVAL)
            elif command in (w.CMD_TRIM, w.CMD_WRITE_ZEROES):
                self._simple(cookie, w.EPERM)
            elif command == w.CMD_BLOCK_STATUS:
                self._block_status(cookie, flags, offset, length, in_range)
            else:
                self._simple(cookie, w.EINVAL)

    def _acquire(self, length: int) -> None:
        budget = self.export.inflight_bytes
        with self._cond:
            while self._inflight and self._inflight_bytes + length > budget:
                self._cond.wait()
            self._inflight += 1
            self._inflight_bytes += length

    def _release(self, length: int) -> None:
        with self._cond:
            self._inflight -= 1
            self._inflight_bytes -= length
            self._cond.notify()

    def _read(self, cookie: int, offset: int, length: int) -> None:
        """Worker: read first, then send header + data (an error reply if the read failed)."""
        try:
            if self._broken:  # the client is gone: do not fetch bytes nobody will get
                return
            if length >= SENDFILE_MIN and isinstance(self.source, FileRanged):
                where = self.source.file_range(length, offset)
                if where is not None:
                    self._read_reply_sendfile(cookie, offset, length, *where)
                    return
            try:
                data = self.source.pread(length, offset)
                if len(data) != length:
                    raise OSError(f"source returned {len(data)} of {length} bytes")
            except Exception as exc:
                log.log(logging.DEBUG if already_logged(exc) else logging.WARNING,
                        "%s: READ of %d bytes at %d failed: %s", self.label, length, offset, exc)
                self._error(cookie, w.EIO, f"read of {length} bytes at {offset} failed",
                            chunk=True)
                return
            self._read_reply(cookie, offset, data)
        except Exception:  # never let a worker die silently
            log.exception("%s: READ reply failed", self.label)
            self.abort()
        finally:
            self._release(length)

    def _reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        if not self.structured:
            return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, cookie)
        return (w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                             w.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length) + w.U64.pack(offset))

    def _read_reply_sendfile(self, cookie: int, offset: int, length: int, fd: int,
                             file_offset: int) -> None:
        """Send a read straight from the page cache with sendfile(2). Once the header is
        out, a short file can no longer become an error reply: then the connection is
        closed (the client sees a failed request, never wrong data)."""
        with self._send_lock:
            if self._broken:
                return
            try:
                self.sock.sendall(self._reply_header(cookie, offset, length))
                sent = 0
                while sent < length:
                    n = os.sendfile(self.sock.fileno(), fd, file_offset + sent, length - sent)
                    if n == 0:
                        raise OSError(f"file ended after {sent} of {length} bytes")
                    sent += n
            except OSError as exc:
                self._broken = True
                log.warning("%s: READ of %d bytes at %d failed mid-reply (%s): closing",
                            self.label, length, offset, exc)
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def _read_reply(self, cookie: int, offset: int, data: bytes) -> None:
        if not self.structured:
            self._send(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, cookie), data)
        elif not data:
            self._send(w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                    w.REPLY_TYPE_NONE, cookie, 0))
        else:
            # One OFFSET_DATA chunk carrying the whole read, flagged DONE (so DF holds too).
            self._send(w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                    w.REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(data))
                       + w.U64.pack(offset), data)

    def _block_status(self, cookie: int, flags: int, offset: int, length: int,
                      in_range: bool) -> None:
        """base:allocation: one extent, all data (flags 0 is always a correct answer)."""
        if not (self.structured and self.meta_selected):
            self._error(cookie, w.EINVAL, "no metadata context selected", chunk=True)
        elif flags & ~(w.CMD_FLAG_FUA | w.CMD_FLAG_REQ_ONE) or length == 0 or not in_range:
            self._error(cookie, w.EINVAL, f"bad BLOCK_STATUS of {length} bytes at {offset}",
                        chunk=True)
        else:
            payload = w.U32.pack(META_CONTEXT_ID) + w.U32.pack(length) + w.U32.pack(0)
            self._send(w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                    w.REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)), payload)


def _decode(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """Split a LIST/SET_META_CONTEXT payload; ValueError names what is wrong."""
    def take(offset: int, length: int) -> bytes:
        if offset + length > len(data):
            raise ValueError("meta context request is truncated")
        return data[offset:offset + length]

    (namelen,) = w.U32.unpack(take(0, 4))
    name = _decode(take(4, namelen))
    offset = 4 + namelen
    (count,) = w.U32.unpack(take(offset, 4))
    offset += 4
    queries: list[str] = []
    for _ in range(count):
        (qlen,) = w.U32.unpack(take(offset, 4))
        query = _decode(take(offset + 4, qlen))
        if query is None:
            raise ValueError("meta context query is not UTF-8")
        queries.append(query)
        offset += 4 + qlen
    if offset != len(data):
        raise ValueError("meta context request has trailing bytes")
    if name is None:
        raise ValueError("export name is not UTF-8")
    return name, queries
