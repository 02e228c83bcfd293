"""Kernel NBD over generic netlink (family "nbd", nbd-netlink.h): hand a connected socket to
/dev/nbdX (NBD_CMD_CONNECT) and take it back (NBD_CMD_DISCONNECT).

The kernel speaks only the transmission phase (simple replies); the handshake is done in user
space first (`client_handshake`). Used by mounting/layer.py when /dev/nbd* exists.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from pathlib import Path

from ..errors import MountError

# linux/netlink.h, linux/genetlink.h
NETLINK_GENERIC = 16
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NLA_F_NESTED = 0x8000
# nbd-netlink.h (NetworkBlockDevice/nbd), version 1
NBD_GENL_VERSION = 1
NBD_CMD_CONNECT, NBD_CMD_DISCONNECT = 1, 2
NBD_ATTR_INDEX, NBD_ATTR_SIZE_BYTES, NBD_ATTR_BLOCK_SIZE_BYTES = 1, 2, 3
NBD_ATTR_TIMEOUT, NBD_ATTR_SERVER_FLAGS, NBD_ATTR_CLIENT_FLAGS = 4, 5, 6
NBD_ATTR_SOCKETS, NBD_ATTR_DEAD_CONN_TIMEOUT, NBD_ATTR_BACKEND_IDENTIFIER = 7, 8, 10
NBD_SOCK_ITEM, NBD_SOCK_FD = 1, 1
NBD_CFLAG_DISCONNECT_ON_CLOSE = 2
# proto.md transmission flags
NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY = 1 << 0, 1 << 1


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute: <u16 len><u16 type> payload, padded to 4 bytes (len excludes pad)."""
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + bytes(-len(payload) % 4)


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def nla_u64(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=Q", value))


def genl_message(family: int, command: int, attributes: bytes, *, seq: int,
                 version: int = NBD_GENL_VERSION) -> bytes:
    """nlmsghdr (16 bytes) + genlmsghdr (cmd, version, reserved) + attributes."""
    payload = struct.pack("=BBH", command, version, 0) + attributes
    return struct.pack("=IHHII", 16 + len(payload), family, NLM_F_REQUEST | NLM_F_ACK,
                       seq, 0) + payload


def connect_attributes(*, size: int, sock_fd: int, block_size: int = 512,
                       timeout_s: int = 30, dead_conn_timeout_s: int = 0,
                       backend: str | None = None) -> bytes:
    """The attributes of NBD_CMD_CONNECT for one read-only socket; no INDEX: the kernel
    picks a free device and answers with its index."""
    attributes = (nla_u64(NBD_ATTR_SIZE_BYTES, size)
                  + nla_u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size)
                  + nla_u64(NBD_ATTR_TIMEOUT, timeout_s)
                  + nla_u64(NBD_ATTR_SERVER_FLAGS, NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY)
                  + nla_u64(NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DISCONNECT_ON_CLOSE)
                  + nla_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_s)
                  + nla(NBD_ATTR_SOCKETS | NLA_F_NESTED,
                        nla(NBD_SOCK_ITEM | NLA_F_NESTED, nla_u32(NBD_SOCK_FD, sock_fd))))
    if backend is not None:
        attributes += nla(NBD_ATTR_BACKEND_IDENTIFIER, backend.encode() + b"\0")
    return attributes


def parse_attributes(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & ~NLA_F_NESTED] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def nbd_devices() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("nbd[0-9]*") if p.name[3:].isdigit())


class NbdNetlink:
    """A generic-netlink socket talking to the kernel's nbd family. Needs CAP_SYS_ADMIN."""

    def __init__(self) -> None:
        if not nbd_devices():
            raise MountError("kernel NBD: no /dev/nbd* (modprobe nbd)")
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._sock.bind((0, 0))
        self._seq = 0
        self.family = self._resolve_family()

    def close(self) -> None:
        self._sock.close()

    def _request(self, family: int, command: int, attributes: bytes,
                 version: int = NBD_GENL_VERSION) -> dict[int, bytes]:
        """Send one request; return the attributes of its answer (empty for a bare ACK)."""
        self._seq += 1
        self._sock.send(genl_message(family, command, attributes, seq=self._seq, version=version))
        answer: dict[int, bytes] = {}
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
                body = data[offset + 16 : offset + length]
                offset += (length + 3) & ~3
                if seq != self._seq:
                    continue
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code:
                        error = MountError(f"kernel NBD: netlink command {command}: "
                                           f"{os.strerror(-code)}")
                        error.errno = -code
                        raise error
                    return answer
                answer.update(parse_attributes(body[4:]))

    def _resolve_family(self) -> int:
        try:
            answer = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                                   nla(CTRL_ATTR_FAMILY_NAME, b"nbd\0"), version=1)
        except MountError as exc:
            raise MountError("kernel NBD: no generic netlink family 'nbd' (modprobe nbd)") from exc
        return int(struct.unpack("=H", answer[CTRL_ATTR_FAMILY_ID][:2])[0])

    def connect(self, sock: socket.socket, *, size: int, timeout_s: int = 30,
                dead_conn_timeout_s: int = 0, backend: str | None = None) -> str:
        """Give `sock` (handshake done) to a free /dev/nbdX; returns its path."""
        answer = self._request(self.family, NBD_CMD_CONNECT, connect_attributes(
            size=size, sock_fd=sock.fileno(), timeout_s=timeout_s,
            dead_conn_timeout_s=dead_conn_timeout_s, backend=backend))
        if NBD_ATTR_INDEX not in answer:
            raise MountError("kernel NBD: CONNECT answered without a device index")
        return f"/dev/nbd{struct.unpack('=I', answer[NBD_ATTR_INDEX][:4])[0]}"

    def disconnect(self, device: str) -> None:
        index = int(device.removeprefix("/dev/nbd"))
        try:
            self._request(self.family, NBD_CMD_DISCONNECT, nla_u32(NBD_ATTR_INDEX, index))
        except MountError as exc:
            if exc.errno not in (errno.ENODEV, errno.EINVAL):  # already gone
                raise


def disconnect_quietly(device: str) -> None:
    """Disconnect `device` if it is still connected; teardown goes on whatever happens."""
    with contextlib.suppress(MountError, OSError):
        netlink = NbdNetlink()
        netlink.disconnect(device)
        netlink.close()


def client_handshake(sock: socket.socket, export_name: str) -> int:
    """Fixed-newstyle client side up to transmission (proto.md, NBD_OPT_EXPORT_NAME);
    returns the export size. What nbd-client does before handing the socket to the kernel."""

    def recv(length: int) -> bytes:
        data = b""
        while len(data) < length:
            chunk = sock.recv(length - len(data))
            if not chunk:
                raise MountError("kernel NBD: server closed during the handshake")
            data += chunk
        return data

    magic, opt_magic, _flags = struct.unpack(">8sQH", recv(18))
    if magic != b"NBDMAGIC" or opt_magic != 0x49484156454F5054:
        raise MountError("kernel NBD: not a fixed-newstyle NBD server")
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export_name.encode()
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
    size, _transmission_flags = struct.unpack(">QH", recv(10))
    return int(size)


__all__ = [
    "NbdNetlink",
    "client_handshake",
    "connect_attributes",
    "disconnect_quietly",
    "genl_message",
    "nbd_devices",
]
