"""RegistryBlobSource against httpx.MockTransport faults: 206/200/416/503/resets/Content-Range,
redirects with Authorization scoping, presigned-URL refresh; iter_blob streaming and resume."""

from __future__ import annotations

import logging
import random
import threading

import httpx
import pytest

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.oci.client import Descriptor, RegistryClient
from hybrid_erofs.oci.credentials import Credentials
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.registry import (
    RegistryBlobSource,
    iter_blob,
    parse_retry_after,
    public_url,
)
from hybrid_erofs.sources.retry import RetrySource
from tests.registry_doubles import (
    GZIP_LAYER,
    REGISTRY,
    REPO,
    BrokenStream,
    FakeRegistry,
    LazyStream,
    digest_of,
)

DATA = random.Random(7).randbytes(300_000)
DIGEST = digest_of(DATA)


def _source(fake: FakeRegistry, *, size: int | None = None,
            credentials: Credentials | None = None) -> RegistryBlobSource:
    client = RegistryClient(f"127.0.0.1:5000/{REPO}:t", transport=fake.transport(),
                            credentials=credentials)
    descriptor = Descriptor(GZIP_LAYER, DIGEST, len(DATA) if size is None else size)
    return RegistryBlobSource(client, descriptor, close_client=True)


def _blob_requests(fake: FakeRegistry) -> list[httpx.Request]:
    return [r for r in fake.requests if "/blobs/" in r.url.path]


def test_range_reads_at_random_offsets() -> None:
    fake = FakeRegistry()
    fake.add_blob(DATA)
    source = _source(fake)
    rng = random.Random(1)
    for _ in range(50):
        offset = rng.randrange(len(DATA))
        length = rng.randrange(min(70_000, len(DATA) - offset) + 1)
        assert source.pread(length, offset) == DATA[offset : offset + length]
    assert source.pread(0, len(DATA)) == b""
    last = fake.requests[-1]
    assert last.headers["accept-encoding"] == "identity"
    assert last.url == httpx.URL(f"{REGISTRY}/v2/{REPO}/blobs/{DIGEST}")
    with pytest.raises(ValueError, match="outside"):
        source.pread(2, len(DATA) - 1)
    source.close()


def test_200_ignoring_range_is_streamed_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRegistry(honour_range=False)
    fake.add_blob(DATA)
    source = _source(fake)
    with caplog.at_level(logging.WARNING):
        assert source.pread(1000, 200_000) == DATA[200_000:201_000]
        assert source.pread(5, 0) == DATA[:5]
        assert source.pread(7, len(DATA) - 7) == DATA[-7:]
    warnings = [r for r in caplog.records if "ignores Range" in r.getMessage()]
    assert len(warnings) == 1


def test_416_names_range_and_size() -> None:
    fake = FakeRegistry()
    fake.add_blob(DATA)
    source = _source(fake, size=len(DATA) + 100)  # the descriptor lies about the size
    with pytest.raises(SourceIOError) as info:
        source.pread(10, len(DATA) + 50)
    assert str(info.value) == (f"GET {REGISTRY}/v2/{REPO}/blobs/{DIGEST}: HTTP 416 for bytes "
                               f"{len(DATA) + 50}-{len(DATA) + 59} (blob size {len(DATA) + 100})")
    assert info.value.transient is False


@pytest.mark.parametrize(("status", "transient"), [
    (503, True), (500, True), (502, True), (504, True), (408, True), (429, True),
    (404, False), (400, False), (403, False), (410, False),
], ids=lambda v: str(v))
def test_status_classification(status: int, transient: bool) -> None:
    fake = FakeRegistry(fault=lambda r: httpx.Response(status, headers={"Retry-After": "7"}))
    with pytest.raises(SourceIOError) as info:
        _source(fake).pread(101, 100)
    assert str(info.value) == f"GET {REGISTRY}/v2/{REPO}/blobs/{DIGEST}: HTTP {status} for bytes 100-200"
    assert info.value.transient is transient
    assert info.value.retry_after_s == 7.0


def test_retry_source_recovers_from_503_with_retry_after() -> None:
    calls = {"n": 0}

    def fault(request: httpx.Request) -> httpx.Response | None:
        calls["n"] += 1
        return httpx.Response(503, headers={"Retry-After": "2"}) if calls["n"] <= 2 else None

    fake = FakeRegistry(fault=fault)
    fake.add_blob(DATA)
    slept: list[float] = []
    source = RetrySource(_source(fake), sleep=slept.append, rng=lambda: 0.5)
    assert source.pread(100, 1000) == DATA[1000:1100]
    assert slept == [2.0, 2.0] and len(_blob_requests(fake)) == 3


def test_reset_mid_body_is_transient() -> None:
    def fault(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, headers={"Content-Range": f"bytes 0-99/{len(DATA)}"},
                              stream=BrokenStream(DATA[:60]))

    with pytest.raises(SourceIOError, match="ReadError for bytes 0-99") as info:
        _source(FakeRegistry(fault=fault)).pread(100, 0)
    assert info.value.transient is True


def test_short_body_is_transient() -> None:
    def fault(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, headers={"Content-Range": f"bytes 0-99/{len(DATA)}"},
                              content=DATA[:60])

    with pytest.raises(SourceIOError, match="body ended after 60 of 100 bytes") as info:
        _source(FakeRegistry(fault=fault)).pread(100, 0)
    assert info.value.transient is True


@pytest.mark.parametrize("content_range", [
    "bytes 1-100/300000", "bytes 0-98/300000", "bytes 0-99/299999", "", "bytes */300000",
], ids=["start", "end", "total", "missing", "unsatisfied"])
def test_wrong_content_range_is_refused(content_range: str) -> None:
    def fault(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Range": content_range} if content_range else {}
        return httpx.Response(206, headers=headers, content=DATA[:100])

    with pytest.raises(SourceIOError, match="does not match bytes 0-99/300000") as info:
        _source(FakeRegistry(fault=fault)).pread(100, 0)
    assert info.value.transient is False


def test_content_encoding_is_refused() -> None:
    def fault(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, stream=LazyStream(DATA[:10]), headers={
            "Content-Range": f"bytes 0-9/{len(DATA)}", "Content-Encoding": "gzip"})

    with pytest.raises(SourceIOError, match="unexpected Content-Encoding 'gzip'"):
        _source(FakeRegistry(fault=fault)).pread(10, 0)


def test_timeout_is_transient() -> None:
    def fault(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(SourceIOError, match="ReadTimeout for bytes 0-9") as info:
        _source(FakeRegistry(fault=fault)).pread(10, 0)
    assert info.value.transient is True


def test_redirect_keeps_range_drops_authorization_and_caches_url() -> None:
    fake = FakeRegistry(auth="basic", redirect=True)
    fake.add_blob(DATA)
    source = _source(fake, credentials=Credentials("ocilab", "s3cr3t-PASSWORD"))
    assert source.pread(100, 5000) == DATA[5000:5100]
    hops = [(r.url.host, "authorization" in r.headers, r.headers.get("range"))
            for r in fake.requests]
    assert hops == [
        ("127.0.0.1", False, "bytes=5000-5099"),  # 401 challenge
        ("127.0.0.1", True, "bytes=5000-5099"),  # 307 to storage
        ("storage.test", False, "bytes=5000-5099"),  # presign hop: 307
        ("storage.test", False, "bytes=5000-5099"),  # 206
    ]
    fake.requests.clear()
    assert source.pread(10, 0) == DATA[:10]
    assert [r.url.host for r in fake.requests] == ["storage.test"]  # cached presigned URL


def test_expired_presigned_url_is_resolved_once_more() -> None:
    fake = FakeRegistry(redirect=True)
    fake.add_blob(DATA)
    source = _source(fake)
    assert source.pread(10, 0) == DATA[:10]
    fake.valid_signatures.clear()  # every signature handed out so far expires
    fake.requests.clear()
    assert source.pread(10, 100) == DATA[100:110]
    assert [r.url.host for r in fake.requests] == [
        "storage.test", "127.0.0.1", "storage.test", "storage.test"]
    # Refused again right after resolving: fail, do not loop; never show the signature.
    fake.fault = lambda r: httpx.Response(403) if "X-Amz-Signature" in str(r.url) else None
    with pytest.raises(SourceIOError) as info:
        source.pread(10, 200)
    assert "HTTP 403 for bytes 200-209" in str(info.value)
    assert "X-Amz" not in str(info.value) and "sig" not in str(info.value)
    assert info.value.transient is False


def test_redirect_loop_is_bounded() -> None:
    fake = FakeRegistry(fault=lambda r: httpx.Response(302, headers={"Location": str(r.url)}))
    with pytest.raises(SourceIOError, match="more than 10 redirects"):
        _source(fake).pread(1, 0)
    assert len(fake.requests) == 11


def test_concurrent_reads() -> None:
    fake = FakeRegistry(redirect=True)
    fake.add_blob(DATA)
    source = _source(fake)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(20):
                offset = rng.randrange(len(DATA) - 1000)
                assert source.pread(1000, offset) == DATA[offset : offset + 1000]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_iter_blob_streams_resumes_and_verifies() -> None:
    resets = {"n": 0}

    def fault(request: httpx.Request) -> httpx.Response | None:
        if resets["n"] < 2 and request.headers.get("range", "").startswith("bytes=0-"):
            resets["n"] += 1
            return httpx.Response(206, stream=BrokenStream(DATA[:50_000]),
                                  headers={"Content-Range": f"bytes 0-{len(DATA) - 1}/{len(DATA)}"})
        return None

    fake = FakeRegistry(fault=fault)
    fake.add_blob(DATA)
    slept: list[float] = []
    assert b"".join(iter_blob(_source(fake), 1 << 16, sleep=slept.append)) == DATA
    ranges = [r.headers["range"] for r in _blob_requests(fake)]
    assert ranges == [f"bytes=0-{len(DATA) - 1}", f"bytes=50000-{len(DATA) - 1}"]
    assert len(slept) == 1


def test_iter_blob_detects_digest_mismatch_and_reads_plain_sources() -> None:
    fake = FakeRegistry()
    fake.blobs[DIGEST] = DATA[:-1] + b"\0"  # same size, wrong content
    with pytest.raises(SourceIOError, match=f"blob {DIGEST}: digest mismatch"):
        b"".join(iter_blob(_source(fake)))
    assert b"".join(iter_blob(MemorySource(DATA), 4096)) == DATA


def test_retry_after_and_public_url() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    url = httpx.URL("https://u:p@s3.test/b/data?X-Amz-Signature=abc#frag")
    assert public_url(url) == "https://s3.test/b/data"


def test_logs_never_show_presigned_queries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # httpx logs every URL at INFO, httpcore headers at DEBUG
    fake = FakeRegistry(redirect=True)
    fake.add_blob(DATA)
    source = _source(fake)
    assert source.pread(10, 0) == DATA[:10]
    fake.valid_signatures.clear()
    assert source.pread(10, 10) == DATA[10:20]
    assert "storage.test" in caplog.text
    assert "X-Amz-Signature=sig" not in caplog.text and "X-Amz-Expires=5" not in caplog.text


@pytest.mark.parametrize(("text", "want"), [
    ("GET https://s3.test/b?X-Amz-Signature=abc&x=1 done", "GET https://s3.test/b?<redacted> done"),
    ("(b'Location', b'/blobs/d?X-Amz-Expires=5&X-Amz-Signature=abc')",
     "(b'Location', b'/blobs/d?X-Amz-Expires=<redacted>&X-Amz-Signature=<redacted>')"),
    ("no url here", "no url here"),
], ids=["absolute", "relative", "plain"])
def test_redact(text: str, want: str) -> None:
    from hybrid_erofs.oci.redact import redact

    assert redact(text) == want
