"""RegistryBlobSource: a ByteSource over one registry blob, read with HTTP Range requests.

The bottom of the stack (RetrySource goes directly above it). Redirects are followed by hand:
Range is kept, Authorization stays on the registry's origin (DS:825), the storage URL is cached.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator

import httpx

from ..errors import RegistryError, SourceIOError
from ..metrics.samples import Sample, counter
from ..oci.auth import origin
from ..oci.client import Descriptor, RegistryClient
from ..oci.credentials import resolve_credentials
from ..oci.rangeget import Answer, RangeGetter, ShortBody
from ..oci.redact import redact
from ..oci.reference import parse_reference
from ..source import ByteSource, check_range

log = logging.getLogger(__name__)

# 408/429/5xx and the de-facto 499 (nginx) and 522 (Cloudflare) as in ggcr transport/retry.go.
TRANSIENT_STATUS = frozenset({408, 429, 499, 500, 502, 503, 504, 522})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# An expired or refused presigned URL (S3/GCS answer 403, some 400/401): resolve again once
# through the registry, as soci-snapshotter's refreshURL.
_REFRESH_STATUS = frozenset({400, 401, 403})
# Answers of a direct GET that httpx's path handles (the request is sent again through it):
# redirects, auth challenges, a refused storage URL, a body without Range; and a 206 that is
# not a plain Content-Length body.
_HTTPX_STATUS = _REDIRECT_STATUS | _REFRESH_STATUS | {200, 206}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def public_url(url: httpx.URL) -> str:
    """The URL without user info, query or fragment: presigned query strings are credentials."""
    return str(url.copy_with(query=None, fragment=None, username=None, password=None))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class RegistryBlobSource:
    """Random access to a registry blob by single-range GETs. Thread-safe.

    `pread` sends `Range: bytes=a-b` and `Accept-Encoding: identity`; a 206 must carry the
    matching Content-Range (total = descriptor size); a 200 (Range ignored, allowed since Range
    is only a SHOULD, DS:196) is streamed and skipped up to the offset, with one warning.
    Failures raise SourceIOError whose `.transient` is True for 408/429/5xx, resets and
    timeouts, and `.retry_after_s` carries Retry-After. Messages never show query strings.

    With the client's default transport and no proxy in the environment, each pread is first
    sent on a RangeGetter (oci/rangeget.py): httpx builds and authorizes the request, a clean
    206 with the exact Content-Range and a Content-Length body is received straight into one
    buffer; any other answer (a redirect, a 401, an error status, a 200, a chunked body) is
    dropped and the request sent again through httpx, which handles it as before.

    Args:
        client: the RegistryClient of the blob's repository (its httpx.Client is shared).
        descriptor: the blob's descriptor; `size` comes from it, no request is made here.
        close_client: close `client` in `close()` (when this source is its only user).
        max_redirects: redirect hops followed per request (default 10).
        direct: use the RangeGetter where it applies (default True; False: httpx only).
    """

    def __init__(
        self, client: RegistryClient, descriptor: Descriptor, *, close_client: bool = False,
        max_redirects: int = 10, direct: bool = True,
    ) -> None:
        self.client, self.descriptor = client, descriptor
        self._close_client, self._max_redirects = close_client, max_redirects
        self._blob_url = client.blob_url(descriptor.digest)
        self._origin = origin(self._blob_url)
        self._lock = threading.Lock()
        self._storage_url: httpx.URL | None = None
        self._warned_full_body = False
        self.requests = 0  # upstream HTTP requests, redirect hops included
        self.bytes_received = 0  # blob bytes received by pread, cut-off bodies included
        self.direct_reads = 0  # preads answered on the RangeGetter
        self._getter = (RangeGetter(timeout_s=client.timeout_s)
                        if direct and client.default_transport else None)

    @property
    def size(self) -> int:
        return self.descriptor.size

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if length == 0:
            return b""
        end = offset + length - 1
        start: httpx.URL | None = None
        if self._getter is not None:
            data = self._direct_pread(self._getter, length, offset, end)
            if isinstance(data, bytes):
                return data
            start = data  # None, or where a redirect answered by the direct GET points
        response, url = self._open(offset, end, start)
        # The body's pieces as received, joined once at the end: one copy of the data in
        # user space (a bytearray filled and then turned into bytes took two).
        pieces: list[bytes] = []
        filled = 0
        try:
            skip = self._check_body(response, url, offset, end)
            if skip:
                self._warn_full_body(url)
            for chunk in response.iter_bytes():
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                take = min(len(chunk), length - filled)
                if take:
                    pieces.append(chunk if take == len(chunk) else chunk[:take])
                    filled += take
                if take < len(chunk) and response.status_code == 206:
                    raise SourceIOError(f"GET {public_url(url)}: body longer than "
                                        f"{length} bytes for bytes {offset}-{end}")
                if filled == length and response.status_code == 200:
                    break  # the rest of a full body is not needed; closing drops it
        except httpx.TransportError as exc:
            raise self._transport_error(exc, url, offset, end) from exc
        finally:
            response.close()
            with self._lock:
                self.bytes_received += filled
        if filled != length:
            raise SourceIOError(
                f"GET {public_url(url)}: body ended after {filled} of {length} bytes "
                f"for bytes {offset}-{end}", transient=True)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def metric_samples(self) -> list[Sample]:
        with self._lock:
            return [counter("registry_requests", self.requests,
                            "HTTP requests for blob bytes, redirect hops included"),
                    counter("fetched_bytes", self.bytes_received,
                            "Compressed bytes received from the registry")]

    def iter_range(self, offset: int = 0) -> Iterator[bytes]:
        """Stream the blob from `offset` to its end with one Range GET, chunks as received."""
        check_range(self, 0, offset)
        if offset == self.size:
            return
        end = self.size - 1
        response, url = self._open(offset, end)
        try:
            skip = self._check_body(response, url, offset, end)
            for chunk in response.iter_bytes():  # as received: progress survives resets
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if chunk:
                    yield chunk
        except httpx.TransportError as exc:
            raise self._transport_error(exc, url, offset, end) from exc
        finally:
            response.close()

    def close(self) -> None:
        if self._getter is not None:
            self._getter.close()
        if self._close_client:
            self.client.close()

    # -- requests --------------------------------------------------------------------------
    def _direct_pread(self, getter: RangeGetter, length: int, offset: int,
                      end: int) -> bytes | httpx.URL | None:
        """The bytes by a RangeGetter GET; else the request goes through httpx: from the
        start (None: the auth needs a round trip first, or the answer was not a plain 206), or
        from where the redirect it answered points (the URL)."""
        with self._lock:
            url = self._storage_url or self._blob_url
        http = self.client.http
        if not getter.direct_for(http, url):  # through the proxy the environment names
            return None if url == self._blob_url else url
        request = http.build_request(
            "GET", url, headers={"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"})
        flow = None
        if origin(url) == self._origin:
            if http.auth is not None:
                flow = http.auth.sync_auth_flow(request)
                if next(flow) is not request:  # a token request first: httpx's path does that
                    flow.close()
                    return None
        else:  # DS:825: no Authorization off the registry's origin, whatever the auth
            request.headers.pop("Authorization", None)
        try:
            answer = self._direct_open(getter, request, offset, end)
            if answer.status == 401 and flow is not None:  # an expired token: the auth's turn
                answer.close()
                if not self._reauthorize(flow, request, answer.headers, offset, end):
                    return None
                answer = self._direct_open(getter, request, offset, end)
                if answer.status == 401:
                    answer.close()
                    raise self._status_error(401, answer.headers, url, offset, end)
        finally:
            if flow is not None:
                flow.close()
        return self._direct_body(answer, url, length, offset, end)

    def _direct_open(self, getter: RangeGetter, request: httpx.Request, offset: int,
                     end: int) -> Answer:
        with self._lock:
            self.requests += 1
        try:
            return getter.open(request)
        except OSError as exc:
            raise SourceIOError(f"GET {public_url(request.url)}: {type(exc).__name__} for bytes "
                                f"{offset}-{end}: {redact(str(exc))}", transient=True) from exc

    def _reauthorize(self, flow: Generator[httpx.Request, httpx.Response, None],
                     request: httpx.Request, headers: httpx.Headers, offset: int,
                     end: int) -> bool:
        """Hand a 401 to the auth flow as httpx would; its token requests go through httpx.
        True when it put new credentials on `request` (send it again)."""
        subject = f"GET {public_url(request.url)}"
        try:
            step = flow.send(httpx.Response(401, headers=headers, request=request))
            while step is not request:
                with self._lock:
                    self.requests += 1
                response = self.client.http.send(step, auth=None)
                step = flow.send(response)
        except StopIteration:
            return False  # no challenge it can answer: httpx's path reports the 401
        except httpx.TransportError as exc:
            raise self._transport_error(exc, request.url, offset, end) from exc
        except RegistryError as exc:  # token server trouble
            raise SourceIOError(f"{subject}: {exc}", transient=exc.transient) from exc
        return True

    def _direct_body(self, answer: Answer, url: httpx.URL, length: int, offset: int,
                     end: int) -> bytes | httpx.URL | None:
        with answer:
            status, headers = answer.status, answer.headers
            if status not in _HTTPX_STATUS:  # an error: raised as httpx's path would
                raise self._status_error(status, headers, url, offset, end)
            location = headers.get("location")
            if status in _REDIRECT_STATUS and location:
                return url.join(location)
            if status in _REFRESH_STATUS and url != self._blob_url:
                self._forget_storage_url(url, status)
                return None
            if (status != 206 or "transfer-encoding" in headers
                    or headers.get("content-length") != str(length)):
                log.debug("GET %s: HTTP %d for bytes %d-%d; sending it through httpx",
                          public_url(url), status, offset, end)
                return None
            self._check_body(httpx.Response(206, headers=headers), url, offset, end)
            try:
                data = answer.read(length)
            except ShortBody as exc:
                with self._lock:
                    self.bytes_received += exc.received
                raise SourceIOError(f"GET {public_url(url)}: body ended after {exc.received} "
                                    f"of {length} bytes for bytes {offset}-{end} "
                                    f"({redact(str(exc))})", transient=True) from exc
        with self._lock:
            self.bytes_received += length
            self.direct_reads += 1
        return data

    def _open(self, offset: int, end: int,
              start: httpx.URL | None = None) -> tuple[httpx.Response, httpx.URL]:
        """Send the Range GET; return a 200/206 response (unread) and the URL that answered.
        `start`: where a redirect already received points (one hop spent)."""
        headers = {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}
        with self._lock:
            cached = self._storage_url
        url = start or cached or self._blob_url
        response, final = self._send(url, headers, offset, end, hops=1 if start else 0)
        if cached is not None and final == cached and response.status_code in _REFRESH_STATUS:
            response.close()
            self._forget_storage_url(cached, response.status_code)
            response, final = self._send(self._blob_url, headers, offset, end)
        status = response.status_code
        if status in (200, 206):
            if final != self._blob_url:
                with self._lock:
                    self._storage_url = final
            return response, final
        response.close()
        raise self._status_error(status, response.headers, final, offset, end)

    def _forget_storage_url(self, cached: httpx.URL, status: int) -> None:
        """The storage URL refused a request (an expired presigned URL): resolve it again."""
        log.debug("GET %s: HTTP %d from the cached storage URL; resolving it again",
                  public_url(cached), status)
        with self._lock:
            if self._storage_url == cached:
                self._storage_url = None

    def _status_error(self, status: int, headers: httpx.Headers, url: httpx.URL, offset: int,
                      end: int) -> SourceIOError:
        message = f"GET {public_url(url)}: HTTP {status} for bytes {offset}-{end}"
        if status == 416:
            message += f" (blob size {self.size})"
        retry_after = parse_retry_after(headers.get("retry-after"))
        return SourceIOError(message, transient=status in TRANSIENT_STATUS,
                             retry_after_s=retry_after)

    def _send(
        self, url: httpx.URL, headers: dict[str, str], offset: int, end: int, *, hops: int = 0,
    ) -> tuple[httpx.Response, httpx.URL]:
        http = self.client.http
        for _ in range(hops, self._max_redirects + 1):
            request = http.build_request("GET", url, headers=headers)
            same_origin = origin(url) == self._origin
            try:
                with self._lock:
                    self.requests += 1
                if same_origin:
                    response = http.send(request, stream=True)
                else:  # DS:825: no Authorization off the registry's origin, whatever the auth
                    response = http.send(request, stream=True, auth=None)
            except httpx.TransportError as exc:
                raise self._transport_error(exc, url, offset, end) from exc
            except RegistryError as exc:  # token server trouble inside the auth flow
                raise SourceIOError(f"GET {public_url(url)}: {exc}",
                                    transient=exc.transient) from exc
            location = response.headers.get("location")
            if response.status_code not in _REDIRECT_STATUS or not location:
                return response, url
            response.close()
            url = url.join(location)
        raise SourceIOError(f"GET {public_url(self._blob_url)}: more than "
                            f"{self._max_redirects} redirects for bytes {offset}-{end}")

    def _check_body(self, response: httpx.Response, url: httpx.URL, offset: int, end: int) -> int:
        """Validate a 200/206 answer; return how many leading body bytes to skip."""
        subject = f"GET {public_url(url)}"
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise SourceIOError(f"{subject}: unexpected Content-Encoding {encoding!r} "
                                f"for bytes {offset}-{end}")
        if response.status_code == 200:
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != self.size:
                raise SourceIOError(f"{subject}: full body of {length} bytes, "
                                    f"but the blob size is {self.size}")
            return offset
        value = response.headers.get("content-range", "")
        match = _CONTENT_RANGE.fullmatch(value.strip())
        # RFC 9110 §14.4: a 206 names the range it carries; it must be exactly what we asked.
        if not match or (int(match[1]), int(match[2])) != (offset, end) or (
            match[3] != "*" and int(match[3]) != self.size
        ):
            raise SourceIOError(f"{subject}: Content-Range {value!r} does not match "
                                f"bytes {offset}-{end}/{self.size}")
        return 0

    def _warn_full_body(self, url: httpx.URL) -> None:
        with self._lock:
            warned, self._warned_full_body = self._warned_full_body, True
        if not warned:
            log.warning("GET %s: the server ignores Range (HTTP 200); every read streams the "
                        "blob from its start", public_url(url))

    def _transport_error(
        self, exc: httpx.TransportError, url: httpx.URL, offset: int, end: int
    ) -> SourceIOError:
        # Connection errors, resets and timeouts may all heal (ggcr retry predicate).
        detail = redact(str(exc))
        return SourceIOError(f"GET {public_url(url)}: {type(exc).__name__} for bytes "
                             f"{offset}-{end}: {detail}", transient=True)


def iter_blob(
    source: ByteSource, chunk_size: int = 1 << 20, *, verify: bool = True, attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """Yield the whole blob in order, for the index pass.

    A RegistryBlobSource is streamed with one GET, resumed from the current offset after a
    transient failure (up to `attempts` tries without progress); and, with `verify`, its
    sha256/sha512 is checked against the descriptor at the end (DS:192). Any other ByteSource
    is read with `pread` in `chunk_size` pieces.
    """
    if not isinstance(source, RegistryBlobSource):
        for offset in range(0, source.size, chunk_size):
            yield source.pread(min(chunk_size, source.size - offset), offset)
        return
    digest = source.descriptor.digest
    hasher = hashlib.new(digest.partition(":")[0]) if verify else None
    offset, failures = 0, 0
    while offset < source.size:
        try:
            for chunk in source.iter_range(offset):
                chunk = chunk[: source.size - offset]
                if hasher is not None:
                    hasher.update(chunk)
                offset += len(chunk)
                failures = 0
                yield chunk
            if offset < source.size:
                raise SourceIOError(f"blob {digest}: stream ended at {offset} of "
                                    f"{source.size} bytes", transient=True)
        except SourceIOError as exc:
            failures += 1
            if not exc.transient or failures >= attempts:
                raise
            delay_s = exc.retry_after_s or min(5.0, 0.2 * 2 ** (failures - 1))
            log.info("%s; resuming at offset %d in %.1f s", exc, offset, delay_s)
            sleep(delay_s)
    if hasher is not None and f"{digest.partition(':')[0]}:{hasher.hexdigest()}" != digest:
        raise SourceIOError(f"blob {digest}: digest mismatch after reading {offset} bytes "
                            f"(got {hasher.name}:{hasher.hexdigest()})")


def open_registry_blob(
    reference: str, *, layer: int | None = None, blob: str | None = None,
    platform: str | None = None, username: str | None = None, password: str | None = None,
    insecure: bool = False, transport: httpx.BaseTransport | None = None,
    timeout_s: float = 30.0,
) -> tuple[RegistryBlobSource, Descriptor]:
    """Resolve `reference` to one gzip layer and open it as a RegistryBlobSource.

    Credentials: explicit username/password, else the auth files (oci/credentials.py).
    The returned source owns its RegistryClient (closed by `source.close()`).
    """
    ref = parse_reference(reference)
    credentials = resolve_credentials(ref, username=username, password=password)
    client = RegistryClient(ref, transport=transport, credentials=credentials,
                            insecure=insecure, timeout_s=timeout_s)
    try:
        descriptor = client.layer_descriptor(layer=layer, blob=blob, platform=platform)
    except BaseException:
        client.close()
        raise
    return RegistryBlobSource(client, descriptor, close_client=True), descriptor
