"""NBD server protocol tests over raw unix sockets: every option and command, bad clients,
out-of-order replies, failing sources and shutdown. No kernel, no external client."""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hybrid_erofs.errors import InvalidInput
from hybrid_erofs.export import nbdwire as w
from hybrid_erofs.export.nbd import MAX_PAYLOAD, NbdServer, serve_nbd
from hybrid_erofs.source import ByteSource, MemorySource
from tests.nbdclient import (
    DATA,
    TIMEOUT_S,
    Client,
    FailingSource,
    GatedSource,
    go_request,
    meta_request,
)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="nbd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


Serve = Callable[..., NbdServer]


@pytest.fixture
def serve(sockdir: Path) -> Iterator[Serve]:
    """serve(source=..., **kw) starts an NbdServer in a thread; stopped and checked at teardown."""
    started: list[tuple[NbdServer, threading.Thread]] = []

    def start(source: ByteSource | None = None, **kw: object) -> NbdServer:
        path = sockdir / f"s{len(started)}.sock"
        server = NbdServer(source or MemorySource(DATA), socket_path=path,
                           export_name="disk", description="test disk", **kw)  # type: ignore[arg-type]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
    assert not list(sockdir.glob("*.sock")), "unix socket file left behind"


def connect(server: NbdServer) -> Client:
    assert server.socket_path is not None
    return Client(server.socket_path)


def assert_serves(server: NbdServer) -> None:
    """A fresh connection still negotiates and reads correctly."""
    client = connect(server)
    try:
        client.hello()
        client.go("disk")
        assert client.read_structured(4096, 8192) == DATA[4096:12288]
        client.request(w.CMD_DISC)
        assert client.closed_by_server()
    finally:
        client.close()


EXPECTED_FLAGS = (w.FLAG_HAS_FLAGS | w.FLAG_READ_ONLY | w.FLAG_SEND_FLUSH | w.FLAG_SEND_CACHE
                  | w.FLAG_CAN_MULTI_CONN)


# -- handshake and options ----------------------------------------------------------------------


def test_greeting_offers_fixed_newstyle_and_no_zeroes(serve: Serve) -> None:
    client = connect(serve())
    assert client.hello() == w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES
    client.close()


@pytest.mark.parametrize("option", [w.OPT_GO, w.OPT_INFO])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_go_and_info_report_export(serve: Serve, option: int, structured: bool) -> None:
    client = connect(serve())
    client.hello()
    infos = client.go("disk", structured=structured, option=option,
                      infos=(w.INFO_NAME, w.INFO_DESCRIPTION, w.INFO_BLOCK_SIZE, 999))
    flags = EXPECTED_FLAGS | (w.FLAG_SEND_DF if structured else 0)
    assert infos[w.INFO_EXPORT] == w.EXPORT_NAME_REPLY.pack(len(DATA), flags)
    assert infos[w.INFO_NAME] == b"disk"
    assert infos[w.INFO_DESCRIPTION] == b"test disk"
    assert infos[w.INFO_BLOCK_SIZE] == w.U32.pack(512) + w.U32.pack(4096) + w.U32.pack(32 << 20)
    if option == w.OPT_INFO:  # still haggling: INFO then GO gives the same answer
        assert client.ask(w.OPT_GO, go_request(""))[0] == (w.REP_INFO, w.U16.pack(0) + infos[0])
    read = client.read_structured if structured else client.read_simple
    assert read(1000, 5000) == DATA[1000:6000]
    client.close()


def test_go_without_info_requests_sends_only_export(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    assert set(client.go("", structured=False)) == {w.INFO_EXPORT}
    client.close()


def test_block_size_minimum_is_1_for_odd_sizes(serve: Serve) -> None:
    client = connect(serve(MemorySource(DATA[:1000])))
    client.hello()
    infos = client.go("disk", infos=(w.INFO_BLOCK_SIZE,))
    assert infos[w.INFO_BLOCK_SIZE][:4] == w.U32.pack(1)
    client.close()


def test_go_unknown_export_is_err_unknown_and_haggling_continues(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    ((rtype, _),) = client.ask(w.OPT_GO, go_request("nope"))
    assert rtype == w.REP_ERR_UNKNOWN
    client.go("disk")
    assert client.read_structured(0, 512) == DATA[:512]
    client.close()


@pytest.mark.parametrize("bad", [b"", b"\0\0\0\x05ab\0\0", go_request("disk") + b"x",
                                 b"\0\0\0\0\0\x02\0\0"], ids=["empty", "namelen", "trailing", "nreq"])
def test_malformed_go_is_err_invalid(serve: Serve, bad: bytes) -> None:
    server = serve()
    client = connect(server)
    client.hello()
    ((rtype, _),) = client.ask(w.OPT_GO, bad)
    assert rtype == w.REP_ERR_INVALID
    client.go("disk")
    client.close()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_with_and_without_zero_padding(serve: Serve, no_zeroes: bool) -> None:
    client = connect(serve())
    client.hello(w.FLAG_C_FIXED_NEWSTYLE | (w.FLAG_C_NO_ZEROES if no_zeroes else 0))
    client.option(w.OPT_EXPORT_NAME, b"disk")
    size, flags = w.EXPORT_NAME_REPLY.unpack(client.recv(w.EXPORT_NAME_REPLY.size))
    assert (size, flags) == (len(DATA), EXPECTED_FLAGS)
    if not no_zeroes:
        assert client.recv(124) == bytes(124)
    # The next bytes on the wire are the READ reply: proves the padding length was exact.
    assert client.read_simple(512, 1024) == DATA[512:1536]
    client.close()


def test_export_name_after_structured_reply_advertises_df(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    assert client.ask(w.OPT_STRUCTURED_REPLY) == [(w.REP_ACK, b"")]
    client.option(w.OPT_EXPORT_NAME, b"")
    _, flags = w.EXPORT_NAME_REPLY.unpack(client.recv(w.EXPORT_NAME_REPLY.size))
    assert flags == EXPECTED_FLAGS | w.FLAG_SEND_DF
    assert client.read_structured(0, 100) == DATA[:100]
    client.close()


def test_export_name_unknown_closes_connection_only(serve: Serve) -> None:
    server = serve()
    client = connect(server)
    client.hello()
    client.option(w.OPT_EXPORT_NAME, b"other")
    assert client.closed_by_server()
    client.close()
    assert_serves(server)


def test_not_fixed_newstyle_allows_only_export_name(serve: Serve) -> None:
    server = serve()
    client = connect(server)
    client.hello(cflags=0)
    client.option(w.OPT_EXPORT_NAME, b"disk")
    w.EXPORT_NAME_REPLY.unpack(client.recv(w.EXPORT_NAME_REPLY.size))
    assert client.recv(124) == bytes(124)
    assert client.read_simple(0, 10) == DATA[:10]
    client.close()
    client = connect(server)
    client.hello(cflags=0)
    client.option(w.OPT_LIST)
    assert client.closed_by_server()
    client.close()
    assert_serves(server)


def test_list_exports(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    assert client.ask(w.OPT_LIST) == [
        (w.REP_SERVER, w.U32.pack(4) + b"disk" + b"test disk"), (w.REP_ACK, b"")]
    assert client.ask(w.OPT_LIST, b"junk")[0][0] == w.REP_ERR_INVALID
    client.close()


def test_abort_acks_then_closes(serve: Serve) -> None:
    server = serve()
    client = connect(server)
    client.hello()
    assert client.ask(w.OPT_ABORT, b"ignored") == [(w.REP_ACK, b"")]
    assert client.closed_by_server()
    client.close()
    # A client that closes without reading the ACK does not bother the server either.
    client = connect(server)
    client.hello()
    client.option(w.OPT_ABORT)
    client.close()
    assert_serves(server)


@pytest.mark.parametrize(("option", "data", "expected"), [
    (w.OPT_STARTTLS, b"", w.REP_ERR_POLICY),
    (w.OPT_PEEK_EXPORT, b"", w.REP_ERR_UNSUP),
    (w.OPT_EXTENDED_HEADERS, b"", w.REP_ERR_UNSUP),
    (99, b"some data to skip", w.REP_ERR_UNSUP),
    (w.OPT_STRUCTURED_REPLY, b"x", w.REP_ERR_INVALID),
], ids=["starttls", "peek", "extended", "unknown", "structured-with-data"])
def test_refused_options_keep_haggling(serve: Serve, option: int, data: bytes,
                                       expected: int) -> None:
    client = connect(serve())
    client.hello()
    ((rtype, _),) = client.ask(option, data)
    assert rtype == expected
    client.go("disk")
    assert client.read_structured(0, 64) == DATA[:64]
    client.close()


def test_oversized_option_is_too_big_and_skipped(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    ((rtype, _),) = client.ask(w.OPT_LIST_META_CONTEXT, bytes(100_000))
    assert rtype == w.REP_ERR_TOO_BIG
    client.go("disk")
    client.close()


def test_list_meta_context(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    want = (w.REP_META_CONTEXT, w.U32.pack(0) + b"base:allocation")
    for queries in ([], ["base:"], ["base:allocation"], ["qemu:x", "base:allocation"]):
        assert client.ask(w.OPT_LIST_META_CONTEXT, meta_request("disk", queries)) == [
            want, (w.REP_ACK, b"")], queries
    assert client.ask(w.OPT_LIST_META_CONTEXT, meta_request("", ["qemu:dirty-bitmap:a"])) == [
        (w.REP_ACK, b"")]
    assert client.ask(w.OPT_LIST_META_CONTEXT,
                      meta_request("zzz", []))[0][0] == w.REP_ERR_UNKNOWN
    assert client.ask(w.OPT_LIST_META_CONTEXT,
                      meta_request("", ["base:allocation"])[:-3])[0][0] == w.REP_ERR_INVALID
    client.close()


def test_set_meta_context_needs_structured_replies(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    request = meta_request("disk", [w.BASE_ALLOCATION])
    assert client.ask(w.OPT_SET_META_CONTEXT, request)[0][0] == w.REP_ERR_INVALID
    assert client.ask(w.OPT_STRUCTURED_REPLY) == [(w.REP_ACK, b"")]
    assert client.ask(w.OPT_SET_META_CONTEXT, request) == [
        (w.REP_META_CONTEXT, w.U32.pack(1) + b"base:allocation"), (w.REP_ACK, b"")]
    client.close()


@pytest.mark.parametrize("cflags", [4, 1 << 31])
def test_unknown_client_flags_close(serve: Serve, cflags: int) -> None:
    server = serve()
    client = connect(server)
    client.hello(cflags=w.FLAG_C_FIXED_NEWSTYLE | cflags)
    assert client.closed_by_server()
    client.close()
    assert_serves(server)


def test_bad_option_magic_closes(serve: Serve) -> None:
    server = serve()
    client = connect(server)
    client.hello()
    client.option(w.OPT_LIST, magic=0x1234)
    assert client.closed_by_server()
    client.close()
    assert_serves(server)


@pytest.mark.parametrize("cut", [0, 2, 10, 17, 20], ids=lambda n: f"cut{n}")
def test_truncated_handshake_closes_connection_only(serve: Serve, cut: int) -> None:
    server = serve()
    client = connect(server)
    client.recv(w.GREETING.size)
    wire = w.CLIENT_FLAGS.pack(3) + w.OPTION.pack(w.IHAVEOPT, w.OPT_GO, 10) + b"\0\0"
    client.sock.sendall(wire[:cut])
    client.close()
    assert_serves(server)


# -- transmission -------------------------------------------------------------------------------


@pytest.fixture
def session(serve: Serve) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def open_session(source: ByteSource | None = None, *, structured: bool = True,
                     context: bool = False, **kw: object) -> Client:
        client = connect(serve(source, **kw))
        client.hello()
        client.go("disk", structured=structured, context=context)
        clients.append(client)
        return client

    yield open_session
    for client in clients:
        client.close()


@pytest.mark.parametrize(("offset", "length"), [(0, 1), (0, 512), (511, 2), (12345, 100_000),
                                                (len(DATA) - 1, 1), (0, len(DATA))])
def test_read_simple_and_structured(session: Callable[..., Client], offset: int,
                                    length: int) -> None:
    assert session(structured=False).read_simple(offset, length) == DATA[offset:offset + length]
    assert session(structured=True).read_structured(offset, length) == DATA[
        offset:offset + length]


def test_read_zero_length(session: Callable[..., Client]) -> None:
    client = session(structured=False)
    cookie = client.request(w.CMD_READ, 100, 0)
    assert client.simple() == (0, cookie)
    client = session(structured=True)
    cookie = client.request(w.CMD_READ, 100, 0)
    assert client.chunk() == (w.REPLY_FLAG_DONE, w.REPLY_TYPE_NONE, cookie, b"")


@pytest.mark.parametrize(("offset", "length"), [
    (len(DATA) - 10, 11), (len(DATA), 1), (len(DATA) + 4096, 512), (2**64 - 512, 1024),
    (0, MAX_PAYLOAD + 1)], ids=["straddle", "at-end", "past-end", "wrap", "oversized"])
def test_read_out_of_range_is_einval(session: Callable[..., Client], offset: int,
                                     length: int) -> None:
    client = session(structured=False)
    cookie = client.request(w.CMD_READ, offset, length)
    assert client.simple() == (w.EINVAL, cookie)
    assert client.read_simple(0, 100) == DATA[:100]  # stream still in sync
    client = session(structured=True)
    cookie = client.request(w.CMD_READ, offset, length)
    assert client.error_chunk(cookie) == w.EINVAL
    assert client.read_structured(0, 100) == DATA[:100]


def test_read_flags(session: Callable[..., Client]) -> None:
    client = session(structured=True)
    cookie = client.request(w.CMD_READ, 0, 10, flags=w.CMD_FLAG_DF | w.CMD_FLAG_FUA)
    assert client.chunk()[3] == w.U64.pack(0) + DATA[:10]
    cookie = client.request(w.CMD_READ, 0, 10, flags=w.CMD_FLAG_REQ_ONE)
    assert client.error_chunk(cookie) == w.EINVAL
    client = session(structured=False)  # DF is not valid without structured replies
    cookie = client.request(w.CMD_READ, 0, 10, flags=w.CMD_FLAG_DF)
    assert client.simple() == (w.EINVAL, cookie)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_failing_source_gives_eio_never_data(session: Callable[..., Client],
                                             structured: bool) -> None:
    client = session(FailingSource(DATA, fail_from=65536), structured=structured)
    cookie = client.request(w.CMD_READ, 60000, 10000)
    if structured:
        assert client.error_chunk(cookie) == w.EIO
        assert client.read_structured(0, 4096) == DATA[:4096]
    else:
        assert client.simple() == (w.EIO, cookie)
        assert client.read_simple(0, 4096) == DATA[:4096]  # no data followed the error header


def test_writes_are_refused_and_payload_drained(session: Callable[..., Client]) -> None:
    client = session(structured=False)
    payload = b"\xaa" * 8192
    cookie = client.request(w.CMD_WRITE, 0, len(payload), payload=payload)
    assert client.simple() == (w.EPERM, cookie)
    for command in (w.CMD_TRIM, w.CMD_WRITE_ZEROES):
        cookie = client.request(command, 0, 4096)
        assert client.simple() == (w.EPERM, cookie)
    assert client.read_simple(0, 8192) == DATA[:8192]  # unchanged, and in sync


def test_oversized_write_closes_connection_only(serve: Serve) -> None:
    server = serve()
    client = connect(server)
    client.hello()
    client.go("disk")
    client.request(w.CMD_WRITE, 0, MAX_PAYLOAD + 1, payload=b"\0" * 1000)
    assert client.closed_by_server()
    client.close()
    assert_serves(server)


def test_flush_cache_and_unknown_commands(session: Callable[..., Client]) -> None:
    client = session(structured=True)
    cookie = client.request(w.CMD_FLUSH)
    assert client.simple() == (0, cookie)
    cookie = client.request(w.CMD_CACHE, 0, len(DATA))
    assert client.simple() == (0, cookie)
    cookie = client.request(w.CMD_CACHE, len(DATA) - 1, 2)
    assert client.simple() == (w.EINVAL, cookie)
    cookie = client.request(42, 0, 512)
    assert client.simple() == (w.EINVAL, cookie)
    cookie = client.request(w.CMD_FLUSH, flags=w.CMD_FLAG_REQ_ONE)
    assert client.simple() == (w.EINVAL, cookie)
    assert client.read_structured(0, 512) == DATA[:512]


def test_block_status(session: Callable[..., Client]) -> None:
    client = session(structured=True, context=True)
    for flags, offset, length in ((0, 0, len(DATA)), (w.CMD_FLAG_REQ_ONE, 4096, 1000),
                                  (0, 1, len(DATA) - 1)):
        cookie = client.request(w.CMD_BLOCK_STATUS, offset, length, flags=flags)
        assert client.chunk() == (w.REPLY_FLAG_DONE, w.REPLY_TYPE_BLOCK_STATUS, cookie,
                                  w.U32.pack(1) + w.U32.pack(length) + w.U32.pack(0))
    for offset, length in ((0, 0), (len(DATA), 1), (0, len(DATA) + 1)):
        cookie = client.request(w.CMD_BLOCK_STATUS, offset, length)
        assert client.error_chunk(cookie) == w.EINVAL


def test_block_status_without_context_is_einval(session: Callable[..., Client]) -> None:
    client = session(structured=True, context=False)
    cookie = client.request(w.CMD_BLOCK_STATUS, 0, 4096)
    assert client.error_chunk(cookie) == w.EINVAL
    client = session(structured=False)
    cookie = client.request(w.CMD_BLOCK_STATUS, 0, 4096)
    assert client.simple() == (w.EINVAL, cookie)


def test_set_meta_context_base_namespace_selects_nothing(serve: Serve) -> None:
    client = connect(serve())
    client.hello()
    assert client.ask(w.OPT_STRUCTURED_REPLY) == [(w.REP_ACK, b"")]
    assert client.ask(w.OPT_SET_META_CONTEXT, meta_request("", ["base:"])) == [(w.REP_ACK, b"")]
    client.go("disk", structured=False)
    cookie = client.request(w.CMD_BLOCK_STATUS, 0, 4096)
    assert client.error_chunk(cookie) == w.EINVAL
    client.close()


def test_bad_request_magic_closes_connection_only(serve: Serve) -> None:
    server = serve()
    client = connect(server)
    client.hello()
    client.go("disk")
    client.request(w.CMD_READ, 0, 512, magic=0x12560953)
    assert client.closed_by_server()
    client.close()
    assert_serves(server)


@pytest.mark.parametrize("cut", [1, 27, 28 + 100], ids=["header1", "header27", "write-payload"])
def test_truncated_request_closes_connection_only(serve: Serve, cut: int) -> None:
    server = serve()
    client = connect(server)
    client.hello()
    client.go("disk")
    wire = w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 1, 0, 4096) + bytes(4096)
    client.sock.sendall(wire[:cut])
    client.close()
    assert_serves(server)


def test_disc_finishes_in_flight_requests_then_closes(serve: Serve) -> None:
    source = GatedSource(DATA, gated={0})
    client = connect(serve(source))
    client.hello()
    client.go("disk")
    cookie = client.request(w.CMD_READ, 0, 4096)
    assert source.waiting.acquire(timeout=TIMEOUT_S)
    client.request(w.CMD_DISC)
    source.gate.set()
    assert client.chunk() == (w.REPLY_FLAG_DONE, w.REPLY_TYPE_OFFSET_DATA, cookie,
                              w.U64.pack(0) + DATA[:4096])
    assert client.closed_by_server()
    client.close()


def test_client_vanishing_with_requests_in_flight(serve: Serve) -> None:
    source = GatedSource(DATA, gated={0})
    server = serve(source)
    client = connect(server)
    client.hello()
    client.go("disk")
    for _ in range(4):
        client.request(w.CMD_READ, 0, 65536)
    assert source.waiting.acquire(timeout=TIMEOUT_S)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()
    source.gate.set()
    assert_serves(server)


def test_replies_out_of_order_on_several_connections(serve: Serve) -> None:
    source = GatedSource(DATA, gated={0})
    server = serve(source)
    clients = [connect(server) for _ in range(3)]
    for client in clients:
        client.hello()
        client.go("disk")
    slow = [client.request(w.CMD_READ, 0, 4096) for client in clients]
    for _ in clients:
        assert source.waiting.acquire(timeout=TIMEOUT_S)
    # While every connection's first read is stuck, later ones are answered.
    for client in clients:
        fast = {client.request(w.CMD_READ, offset, 8192): offset
                for offset in (4096, 65536, 200_000, 700_000)}
        for _ in range(len(fast)):
            cookie, payload = client.any_reply()
            offset = fast.pop(cookie)
            assert payload == w.U64.pack(offset) + DATA[offset:offset + 8192]
    source.gate.set()
    for client, cookie in zip(clients, slow, strict=True):
        assert client.any_reply() == (cookie, w.U64.pack(0) + DATA[:4096])
        client.close()


def test_many_pipelined_requests_with_small_budget(serve: Serve) -> None:
    client = connect(serve(inflight_bytes=100_000, workers=3))
    client.hello()
    client.go("disk")
    offsets = range(0, 900_000, 7_000)
    wanted = {cookie: off for cookie, off in enumerate(offsets, start=1)}
    # Like real clients, send and receive at once: the server stops reading requests while
    # its in-flight budget is used up, and its replies fill the socket buffers.
    sender = threading.Thread(target=lambda: [client.request(w.CMD_READ, off, 65536)
                                              for off in offsets])
    sender.start()
    while wanted:
        cookie, payload = client.any_reply()
        offset = wanted.pop(cookie)
        assert payload == w.U64.pack(offset) + DATA[offset:offset + 65536]
    sender.join()
    client.close()


# -- lifecycle ----------------------------------------------------------------------------------


def test_shutdown_lets_in_flight_replies_finish(sockdir: Path) -> None:
    source = GatedSource(DATA, gated={0})
    server = NbdServer(source, socket_path=sockdir / "s.sock")
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    client = connect(server)
    client.hello()
    client.go("")
    cookie = client.request(w.CMD_READ, 0, 100_000)
    assert source.waiting.acquire(timeout=TIMEOUT_S)
    stopper = threading.Thread(target=server.shutdown)
    stopper.start()
    time.sleep(0.2)
    assert stopper.is_alive()  # waiting for the in-flight read
    assert not (sockdir / "s.sock").exists()  # no longer accepting
    source.gate.set()
    assert client.any_reply() == (cookie, w.U64.pack(0) + DATA[:100_000])
    assert client.closed_by_server()
    stopper.join(TIMEOUT_S)
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    client.close()


def test_serve_nbd_stop_event_and_ready(sockdir: Path) -> None:
    stop = threading.Event()
    seen: list[NbdServer] = []
    thread = threading.Thread(target=serve_nbd, args=(MemorySource(DATA),), kwargs={
        "socket_path": sockdir / "s.sock", "listen": ("127.0.0.1", 0), "export_name": "disk",
        "ready": seen.append, "stop": stop})
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    (server,) = seen
    assert server.tcp_address is not None and server.tcp_address[1] > 0
    tcp = socket.create_connection(server.tcp_address, timeout=TIMEOUT_S)
    assert w.GREETING.unpack(tcp.recv(18))[0] == w.NBDMAGIC
    tcp.close()
    assert stat.S_IMODE(os.stat(sockdir / "s.sock").st_mode) == 0o600
    assert_serves(server)
    stop.set()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    assert not (sockdir / "s.sock").exists()


def test_sigterm_stops_a_foreground_server(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    code = ("import sys; from pathlib import Path; from hybrid_erofs.source import MemorySource;"
            "from hybrid_erofs.export.nbd import serve_nbd;"
            "serve_nbd(MemorySource(bytes(4096)), socket_path=Path(sys.argv[1]),"
            " ready=lambda s: print('ready', flush=True))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        client = Client(path)
        client.hello()
        client.go("")
        proc.terminate()
        assert proc.wait(TIMEOUT_S) == 0
        assert client.closed_by_server()
        client.close()
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_socket_path_checks(sockdir: Path) -> None:
    (sockdir / "file").write_text("x")
    with pytest.raises(InvalidInput, match="not a socket"):
        NbdServer(MemorySource(DATA), socket_path=sockdir / "file")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sockdir / "stale.sock"))
    stale.close()  # leaves the file, nobody listening
    with NbdServer(MemorySource(DATA), socket_path=sockdir / "stale.sock") as server:
        with pytest.raises(InvalidInput, match="another server"):
            NbdServer(MemorySource(DATA), socket_path=sockdir / "stale.sock")
        assert server.socket_path == sockdir / "stale.sock"
    assert not (sockdir / "stale.sock").exists()
    with pytest.raises(ValueError, match="socket_path"):
        NbdServer(MemorySource(DATA))


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_file_backed_reads_go_out_with_sendfile(session: Callable[..., Client], tmp_path: Path,
                                                structured: bool) -> None:
    from hybrid_erofs.source import FileSource

    path = tmp_path / "disk.img"
    data = random.Random(9).randbytes(1 << 20)
    path.write_bytes(data)
    source = FileSource(path)
    try:
        client = session(source, structured=structured)
        read = client.read_structured if structured else client.read_simple
        assert read(12345, 300_000) == data[12345:312345]
        assert read(0, 4096) == data[:4096]  # short reads take the copying path
        # The file shrinks under the server: once a header is out the connection must close,
        # never pad the reply with other bytes.
        with open(path, "r+b") as handle:
            handle.truncate(200_000)
        client.request(w.CMD_READ, 100_000, 300_000)
        header = 16 + 8 if structured else 16
        with pytest.raises((EOFError, ConnectionResetError)):
            client.recv(header + 300_000)  # a full reply would be wrong bytes past 200,000
    finally:
        source.close()
