"""RegistryBlobSource's direct GETs (oci/rangeget.py: our own keep-alive connections, the body
received into one buffer) against Debian's docker-registry (plain, token, redirect to presigned
URLs) and, for faults a real server does not produce, the loopback fault registry: the same
bytes and requests as httpx's path, and every failure an error, never wrong bytes."""

from __future__ import annotations

import gzip
import logging
import random
from collections.abc import Iterator
from contextlib import closing

import pytest

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.oci.client import RegistryClient
from hybrid_erofs.oci.credentials import Credentials
from hybrid_erofs.sources.registry import RegistryBlobSource, open_registry_blob
from tests.fault_registry import FaultRegistry, make_layer
from tests.registry_rig import USER, Rig

pytestmark = pytest.mark.integration


def _reads(size: int, count: int = 30, seed: int = 7) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    reads = [(rng.randrange(1, 600_000), rng.randrange(size)) for _ in range(count)]
    return [(min(length, size - offset), offset) for length, offset in reads]


@pytest.mark.parametrize("registry", ["plain", "token", "redir"])
def test_direct_reads_match_the_blob_and_httpx(rig: Rig, registry: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    blob = rig.images["amd64"].layer
    hits = dict(rig.store.hits)
    client = RegistryClient(f"{rig.hosts[registry]}/lab/img:multi",
                            credentials=Credentials(*USER))
    descriptor = client.layer_descriptor(platform="linux/amd64")
    with closing(RegistryBlobSource(client, descriptor, close_client=True)) as direct, \
            closing(RegistryBlobSource(client, descriptor, direct=False)) as plain:
        for length, offset in _reads(len(blob)):
            assert direct.pread(length, offset) == blob[offset : offset + length]
            assert plain.pread(length, offset) == blob[offset : offset + length]
        reads = len(_reads(len(blob)))
        # Every read but a redirected first one is answered on the direct path, and with the
        # same number of requests as httpx's path: the first read's redirect is followed from
        # where the direct GET's answer points, not asked again.
        assert direct.direct_reads == reads - (registry == "redir")
        assert plain.direct_reads == 0
        assert direct.requests == plain.requests
        assert direct.bytes_received == plain.bytes_received
    if registry == "redir":
        assert rig.store.hits["authorization"] == hits["authorization"]  # never off-origin
    assert "X-Amz-Signature" not in caplog.text
    assert USER[1] not in caplog.text


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultRegistry]:
    blob, _ = make_layer(11, count=60)
    registry = FaultRegistry(blob)
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture
def source(faults: FaultRegistry) -> Iterator[RegistryBlobSource]:
    faults.clear_faults()
    faults.token_ttl_s, faults.expires_in = 300.0, None
    faults.reset_counters()
    blob, _ = open_registry_blob(faults.ref)
    try:
        yield blob
    finally:
        blob.close()
        faults.clear_faults()


def test_keep_alive_one_connection_for_many_reads(faults: FaultRegistry,
                                                  source: RegistryBlobSource) -> None:
    blob = faults.layer
    before = faults.counts["connection"]
    for length, offset in _reads(len(blob), 20):
        assert source.pread(length, offset) == blob[offset : offset + length]
    assert source.direct_reads == 20 and len(faults.blob_ranges) == 20
    assert faults.counts["connection"] - before == 1  # reused, one by one


def test_a_connection_the_server_closed_is_replaced(faults: FaultRegistry,
                                                    source: RegistryBlobSource) -> None:
    faults.drop_idle = True
    blob = faults.layer
    for length, offset in _reads(len(blob), 8):
        assert source.pread(length, offset) == blob[offset : offset + length]
    # Each read found its pooled connection closed, sent again on a new one: no error, no
    # request lost or doubled at the server.
    assert source.direct_reads == 8 and len(faults.blob_ranges) == 8


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_a_body_cut_short_is_a_transient_error(faults: FaultRegistry, source: RegistryBlobSource,
                                               fault: str) -> None:
    (faults.reset_next if fault == "reset" else faults.truncate_next)(1)
    with pytest.raises(SourceIOError, match=r"body ended after \d+ of 400000 bytes") as caught:
        source.pread(400_000, 1000)
    assert caught.value.transient
    assert 0 < source.bytes_received < 400_000
    assert source.pread(400_000, 1000) == faults.layer[1000:401_000]  # a new connection


def test_a_wrong_content_range_is_refused(faults: FaultRegistry,
                                          source: RegistryBlobSource) -> None:
    faults.misanswer = "content-range"
    with pytest.raises(SourceIOError, match="Content-Range 'bytes 101-200/"):
        source.pread(100, 100)
    assert len(faults.blob_ranges) == 1 and source.direct_reads == 0


def test_a_short_content_length_is_an_error(faults: FaultRegistry,
                                            source: RegistryBlobSource) -> None:
    faults.misanswer = "content-length"
    with pytest.raises(SourceIOError, match="body ended after 99 of 100 bytes") as caught:
        source.pread(100, 100)
    assert caught.value.transient and source.direct_reads == 0


def test_an_error_status_is_raised_once_with_retry_after(faults: FaultRegistry,
                                                         source: RegistryBlobSource) -> None:
    faults.fail_next(1, status=503, retry_after=7)
    with pytest.raises(SourceIOError, match="HTTP 503 for bytes 0-99") as caught:
        source.pread(100, 0)
    assert caught.value.transient and caught.value.retry_after_s == 7
    assert len(faults.blob_ranges) == 1  # not asked again through httpx
    faults.fail_next(1, status=404)
    with pytest.raises(SourceIOError, match="HTTP 404") as caught:
        source.pread(100, 0)
    assert not caught.value.transient and len(faults.blob_ranges) == 2


def test_range_ignored_goes_through_httpx(faults: FaultRegistry,
                                          source: RegistryBlobSource) -> None:
    faults.ignore_range = True
    assert source.pread(5000, 12345) == faults.layer[12345:17345]
    assert source.direct_reads == 0


def test_an_expired_token_is_renewed_on_the_direct_path(faults: FaultRegistry,
                                                        source: RegistryBlobSource) -> None:
    assert source.pread(100, 0) == faults.layer[:100]
    faults.expire_tokens()  # the client's token still looks valid to it
    tokens, unauthorized = faults.token_requests, faults.counts["unauthorized"]
    assert source.pread(100, 5000) == faults.layer[5000:5100]
    assert faults.counts["unauthorized"] == unauthorized + 1  # one 401, answered by the auth
    assert faults.token_requests == tokens + 1
    assert source.direct_reads == 2


def test_tampered_bytes_are_passed_up_unchanged_for_the_verifier(
        faults: FaultRegistry, source: RegistryBlobSource) -> None:
    # The source is below verification: it returns what the server sent (the span's sha256
    # above turns it into EIO, test_registry_faults), never bytes of its own making.
    faults.tamper(150)
    got = source.pread(100, 100)
    assert got[50] == faults.layer[150] ^ 0xFF and got[:50] == faults.layer[100:150]
    assert gzip.decompress(faults.layer)  # the stored blob itself is intact


def test_a_proxy_in_the_environment_keeps_reads_on_httpx(
        faults: FaultRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx sends through the proxy the environment names; the direct path cannot, so it is
    # off for that URL: the read goes to the proxy (here a closed port: it fails), never around it.
    first, descriptor = open_registry_blob(faults.ref)
    first.close()
    faults.reset_counters()
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    blob = RegistryBlobSource(RegistryClient(faults.ref), descriptor, close_client=True)
    with closing(blob), pytest.raises(SourceIOError):
        blob.pread(1000, 2000)
    assert blob.direct_reads == 0 and not faults.blob_ranges


def test_no_proxy_for_the_registry_keeps_its_reads_direct(
        faults: FaultRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy for everything else, NO_PROXY naming the registry's host (as httpx reads it):
    # httpx would connect to it directly, and so does the direct path.
    faults.reset_counters()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    blob, _ = open_registry_blob(faults.ref)
    with closing(blob):
        assert blob.pread(1000, 2000) == faults.layer[2000:3000]
        assert blob.direct_reads == 1
