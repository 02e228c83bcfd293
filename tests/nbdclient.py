"""A hand-written raw-socket NBD client and test sources for the NBD server tests."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.export import nbdwire as w
from hybrid_erofs.source import MemorySource, check_range

DATA = bytes((i * 7 + i // 256) & 0xFF for i in range(1 << 20))  # 1 MiB, non-repeating-ish
TIMEOUT_S = 10.0


class GatedSource(MemorySource):
    """Reads at offsets in `gated` block until `gate` is set (forces replies out of order)."""

    def __init__(self, data: bytes, gated: set[int]) -> None:
        super().__init__(data)
        self.gated = gated
        self.gate = threading.Event()
        self.waiting = threading.Semaphore(0)

    def pread(self, length: int, offset: int) -> bytes:
        if offset in self.gated:
            self.waiting.release()
            assert self.gate.wait(TIMEOUT_S)
        return super().pread(length, offset)


class FailingSource(MemorySource):
    """Reads touching [fail_from, size) raise SourceIOError."""

    def __init__(self, data: bytes, fail_from: int) -> None:
        super().__init__(data)
        self.fail_from = fail_from

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if offset + length > self.fail_from:
            raise SourceIOError(f"test: read of {length} at {offset} failed", transient=False)
        return super().pread(length, offset)


class Client:
    """A minimal hand-written NBD client speaking raw bytes."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(str(path))
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def recv(self, length: int) -> bytes:
        buf = b""
        while len(buf) < length:
            chunk = self.sock.recv(length - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {length} bytes")
            buf += chunk
        return buf

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # handshake
    def hello(self, cflags: int = w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, hflags = w.GREETING.unpack(self.recv(w.GREETING.size))
        assert (magic, opt_magic) == (w.NBDMAGIC, w.IHAVEOPT)
        self.sock.sendall(w.CLIENT_FLAGS.pack(cflags))
        return int(hflags)

    def option(self, option: int, data: bytes = b"", *, magic: int = w.IHAVEOPT) -> None:
        self.sock.sendall(w.OPTION.pack(magic, option, len(data)) + data)

    def reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = w.OPTION_REPLY.unpack(self.recv(w.OPTION_REPLY.size))
        assert (magic, opt) == (w.OPTION_REPLY_MAGIC, option)
        return rtype, self.recv(length)

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        """All replies up to the final one (ACK or an error)."""
        out = []
        while True:
            rtype, data = self.reply(option)
            out.append((rtype, data))
            if rtype == w.REP_ACK or rtype & (1 << 31):
                return out

    def ask(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.option(option, data)
        return self.replies(option)

    def go(self, name: str = "", *, structured: bool = True, infos: tuple[int, ...] = (),
           option: int = w.OPT_GO, context: bool = False) -> dict[int, bytes]:
        if structured:
            assert self.ask(w.OPT_STRUCTURED_REPLY) == [(w.REP_ACK, b"")]
        if context:
            got = self.ask(w.OPT_SET_META_CONTEXT, meta_request(name, [w.BASE_ALLOCATION]))
            assert got[-1] == (w.REP_ACK, b"")
        replies = self.ask(option, go_request(name, infos))
        assert replies[-1] == (w.REP_ACK, b""), replies
        return {int.from_bytes(d[:2], "big"): d[2:] for t, d in replies if t == w.REP_INFO}

    # transmission
    def request(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                payload: bytes = b"", magic: int = w.REQUEST_MAGIC) -> int:
        self.cookie += 1
        self.sock.sendall(w.REQUEST.pack(magic, flags, command, self.cookie, offset, length)
                          + payload)
        return self.cookie

    def simple(self) -> tuple[int, int]:
        magic, error, cookie = w.SIMPLE_REPLY.unpack(self.recv(w.SIMPLE_REPLY.size))
        assert magic == w.SIMPLE_REPLY_MAGIC
        return error, cookie

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, rtype, cookie, length = w.CHUNK.unpack(self.recv(w.CHUNK.size))
        assert magic == w.STRUCTURED_REPLY_MAGIC
        return flags, rtype, cookie, self.recv(length)

    def any_reply(self) -> tuple[int, bytes]:
        """(cookie, payload) of one structured or simple reply, by its magic."""
        (magic,) = w.U32.unpack(self.recv(4))
        if magic == w.SIMPLE_REPLY_MAGIC:
            error, cookie = w.U32.unpack(self.recv(4))[0], w.U64.unpack(self.recv(8))[0]
            return cookie, w.U32.pack(error)
        assert magic == w.STRUCTURED_REPLY_MAGIC
        _, _, _, cookie, length = w.CHUNK.unpack(w.U32.pack(magic) + self.recv(w.CHUNK.size - 4))
        return cookie, self.recv(length)

    def read_simple(self, offset: int, length: int) -> bytes:
        cookie = self.request(w.CMD_READ, offset, length)
        assert self.simple() == (0, cookie)
        return self.recv(length)

    def read_structured(self, offset: int, length: int) -> bytes:
        cookie = self.request(w.CMD_READ, offset, length)
        flags, rtype, got, payload = self.chunk()
        assert (flags, rtype, got) == (w.REPLY_FLAG_DONE, w.REPLY_TYPE_OFFSET_DATA, cookie)
        assert w.U64.unpack(payload[:8])[0] == offset
        return payload[8:]

    def error_chunk(self, cookie: int) -> int:
        flags, rtype, got, payload = self.chunk()
        assert (flags, rtype, got) == (w.REPLY_FLAG_DONE, w.REPLY_TYPE_ERROR, cookie)
        error, msglen = w.U32.unpack(payload[:4])[0], w.U16.unpack(payload[4:6])[0]
        assert len(payload) == 6 + msglen
        return int(error)


def go_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (w.U32.pack(len(raw)) + raw + w.U16.pack(len(infos))
            + b"".join(w.U16.pack(i) for i in infos))


def meta_request(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = w.U32.pack(len(raw)) + raw + w.U32.pack(len(queries))
    for query in queries:
        out += w.U32.pack(len(query.encode())) + query.encode()
    return out
