"""RegistryClient: fetch and verify manifests, choose a platform and a gzip layer, name blob URLs.

One pooled httpx.Client per registry; RegistryBlobSource (sources/registry.py) reads blobs with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import httpx

from ..errors import AuthError, InvalidInput, RegistryError
from .auth import RegistryAuth, origin
from .credentials import Credentials
from .platform import Platform, descriptor_platform, host_platform, matches, parse_platform
from .rangeget import default_ssl_context
from .redact import install_log_redaction
from .reference import Reference, parse_reference, validate_digest

log = logging.getLogger(__name__)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# Explicit Accept list, indexes first: 2.8 answers 404 for OCI content without it and
# down-converts Docker schema2 to schema1 (oci-registry.md §1.2).
MANIFEST_ACCEPT = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
SCHEMA1_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})
GZIP_LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
})
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
MAX_MANIFEST_SIZE = 32 << 20  # the spec asks registries to accept >= 4 MB; ggcr caps at 100 MiB
USER_AGENT = "hybrid-erofs"
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor (image-spec descriptor.md): what a blob is, its digest and size."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """A verified manifest or index: media type, digest of the exact body, parsed JSON."""

    media_type: str
    digest: str
    body: bytes = field(repr=False)
    data: dict[str, object] = field(repr=False, compare=False)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def compute_digest(body: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def parse_manifest(
    body: bytes, content_type: str | None, *, subject: str, expected_digest: str | None = None
) -> Manifest:
    """Check a manifest body: digest (DS:173-177), media type vs Content-Type (DS:162-167),
    no schema1. `expected_digest` is the digest reference or the index's child descriptor."""
    if expected_digest is not None:
        algorithm = expected_digest.partition(":")[0]
        actual = compute_digest(body, algorithm)
        if actual != expected_digest:
            raise RegistryError(
                f"{subject}: manifest digest mismatch: expected {expected_digest}, "
                f"got {actual} ({len(body)} bytes)"
            )
    ctype = (content_type or "").split(";")[0].strip().lower()
    try:
        data = json.loads(body)
    except ValueError as exc:
        if ctype in SCHEMA1_TYPES:
            data = {"schemaVersion": 1}
        else:
            raise RegistryError(f"{subject}: manifest is not JSON ({len(body)} bytes)") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{subject}: manifest is not a JSON object")
    if ctype in SCHEMA1_TYPES or data.get("schemaVersion") == 1:
        raise RegistryError(
            f"{subject}: Docker schema1 manifests are deprecated and not supported; "
            "push the image again with a current tool (OCI or Docker schema2)"
        )
    declared = data.get("mediaType")
    if isinstance(declared, str) and ctype in INDEX_TYPES | MANIFEST_TYPES and declared != ctype:
        raise RegistryError(
            f"{subject}: mediaType {declared!r} does not match Content-Type {ctype!r}"
        )
    media_type = ctype if ctype in INDEX_TYPES | MANIFEST_TYPES else declared
    if not isinstance(media_type, str) or media_type not in INDEX_TYPES | MANIFEST_TYPES:
        # No usable type anywhere: recognise the shape (image-spec allows omitting mediaType).
        media_type = OCI_INDEX if "manifests" in data else OCI_MANIFEST if "layers" in data else ""
    if not media_type:
        raise RegistryError(f"{subject}: unsupported manifest type {ctype or declared!r}")
    return Manifest(media_type, expected_digest or compute_digest(body), body, data)


def parse_descriptor(raw: object, subject: str) -> Descriptor:
    """A descriptor from JSON: digest validated, size >= 0, media type "" when absent."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{subject}: descriptor is not a JSON object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
        raise RegistryError(f"{subject}: descriptor lacks a valid digest and size")
    validate_digest(digest, subject=subject)
    return Descriptor(media_type if isinstance(media_type, str) else "", digest, size)


def select_manifest(index: Manifest, wanted: Platform, *, subject: str) -> Descriptor:
    """The first index entry whose platform matches `wanted` (image-index.md)."""
    entries = index.data.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"{subject}: index has no 'manifests' list")
    offered: list[str] = []
    for raw in entries:
        if not isinstance(raw, dict):
            continue
        candidate = descriptor_platform(raw)
        offered.append(str(candidate))
        if matches(wanted, candidate) and raw.get("mediaType", OCI_MANIFEST) in MANIFEST_TYPES:
            return parse_descriptor(raw, subject)
    raise RegistryError(
        f"{subject}: no manifest for platform {wanted} (index offers: "
        f"{', '.join(offered) or 'nothing'})"
    )


def resolve_platform(
    top: Manifest, fetch: Callable[[str], Manifest], platform: Platform | str | None, *,
    subject: str,
) -> Manifest:
    """The image manifest for `platform` (default: this host's): `top` itself, or the index
    entry chosen by select_manifest, fetched (and digest-checked) by `fetch(digest)`."""
    if not top.is_index:
        return top
    wanted = parse_platform(platform) if isinstance(platform, str) else platform
    child = select_manifest(top, wanted or host_platform(), subject=subject)
    manifest = fetch(child.digest)
    if manifest.is_index:
        raise RegistryError(f"{subject}@{child.digest}: nested indexes are not supported")
    return manifest


def select_layer(
    manifest: Manifest, *, layer: int | None = None, blob: str | None = None, subject: str
) -> Descriptor:
    """Choose a layer by position (negative counts from the end) or by blob digest; the only
    layer when neither is given. Refuse anything but gzip layers."""
    raw_layers = manifest.data.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"{subject}: manifest has no 'layers' list")
    layers = [parse_descriptor(raw, subject) for raw in raw_layers]
    count = len(layers)
    if blob is not None:
        validate_digest(blob, subject=subject)
        found = [n for n, d in enumerate(layers) if d.digest == blob]
        if not found:
            raise RegistryError(f"{subject}: blob {blob} is not one of the image's {count} layers")
        position = found[0]
    elif layer is not None:
        if not -count <= layer < count:
            raise RegistryError(
                f"{subject}: layer {layer} is out of range: the image has {count} layers"
            )
        position = layer % count
    elif count == 1:
        position = 0
    else:
        raise RegistryError(
            f"{subject}: the image has {count} layers; choose one with layer=N or blob=DIGEST"
        )
    chosen = layers[position]
    if chosen.media_type not in GZIP_LAYER_TYPES:
        kind = (
            "zstd-compressed" if "zstd" in chosen.media_type
            else "uncompressed" if chosen.media_type.endswith(".tar") else "not a gzip tar"
        )
        raise RegistryError(
            f"{subject}: layer {position} is {kind} (media type {chosen.media_type!r}); "
            "only gzip layers are supported"
        )
    return chosen


def warm_up() -> None:
    """Do now what a process's first registry request would wait for: import httpcore
    (httpx imports it when its first client is made: 20-100 ms) and build the shared TLS
    context (about 28 ms). A long-running daemon calls it in a thread as it starts, so the
    first pull after a start (a node's boot) does not pay for it. Never raises: what fails
    here fails again, reported, when a client is made."""
    try:
        import httpcore  # noqa: F401  (its import is the point)

        default_ssl_context()
    except Exception as exc:
        log.debug("registry warm-up: %s", exc)


class RegistryClient:
    """Talks to one repository of one registry over a single pooled httpx.Client. Thread-safe.

    Args:
        reference: image reference (string or Reference).
        transport: httpx transport seam (tests pass httpx.MockTransport); default a pooled one.
        auth: an httpx.Auth; default RegistryAuth(credentials) for the registry origin.
        credentials: used by the default auth; default anonymous.
        insecure: allow plain HTTP to a non-loopback registry (loopback hosts always use HTTP).
        timeout_s: connect/read/write timeout per request.
    """

    def __init__(
        self,
        reference: Reference | str,
        *,
        transport: httpx.BaseTransport | None = None,
        auth: httpx.Auth | None = None,
        credentials: Credentials | None = None,
        insecure: bool = False,
        timeout_s: float = 30.0,
        max_connections: int = 16,
    ) -> None:
        install_log_redaction()  # httpx logs URLs; presigned query strings are credentials
        self.reference = parse_reference(reference) if isinstance(reference, str) else reference
        scheme = "http" if insecure else self.reference.scheme
        self.base_url = f"{scheme}://{self.reference.api_host}"
        self.auth = auth if auth is not None else RegistryAuth(self.base_url, credentials)
        self.timeout_s = timeout_s
        self.default_transport = transport is None  # httpx's own connections, no test double
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        # One TLS context for every client of the process (default_ssl_context): each
        # client's own would load the CA bundle again, 28 ms of CPU per layer resolved.
        self.http = httpx.Client(
            transport=transport, auth=self.auth, timeout=httpx.Timeout(timeout_s),
            limits=limits, follow_redirects=False, headers={"User-Agent": USER_AGENT},
            verify=default_ssl_context(),
        )

    def _url(self, kind: str, ref: str) -> httpx.URL:
        return httpx.URL(f"{self.base_url}/v2/{self.reference.repository}/{kind}/{ref}")

    def blob_url(self, digest: str) -> httpx.URL:
        return self._url("blobs", digest)

    def get_manifest(self, ref: str | None = None, *, expected_digest: str | None = None) -> Manifest:
        """GET /v2/<name>/manifests/<ref> with the Accept list; verify it (see parse_manifest)."""
        ref = ref or self.reference.manifest_ref
        if expected_digest is None and ":" in ref:
            expected_digest = ref
        url = self._url("manifests", ref)
        subject = f"GET {url}"
        found = self._get_document(url, MANIFEST_ACCEPT, subject, missing=frozenset())
        assert found is not None  # no status counts as missing
        body, content_type = found
        return parse_manifest(body, content_type, subject=subject,
                              expected_digest=expected_digest)

    def _get_document(
        self, url: httpx.URL, accept: tuple[str, ...], subject: str, *, missing: frozenset[int],
    ) -> tuple[bytes, str | None] | None:
        """GET a manifest-sized JSON document: (body, Content-Type), None for a `missing` status."""
        headers = {"Accept": ", ".join(accept)}
        try:
            # Registries MAY redirect any request (DS:825); httpx drops Authorization when the
            # origin changes, and RegistryAuth never adds it off the registry's origin.
            with self.http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                if response.status_code in missing:
                    return None
                _check_status(response, subject)
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_MANIFEST_SIZE:
                        raise RegistryError(f"{subject}: manifest larger than {MAX_MANIFEST_SIZE} bytes")
                content_type = response.headers.get("content-type")
        except httpx.TransportError as exc:
            raise RegistryError(f"{subject}: {type(exc).__name__}: {exc}", transient=True) from exc
        return bytes(body), content_type

    def resolve(self, platform: Platform | str | None = None) -> Manifest:
        """The image manifest for `platform` (default: this host's), via the index if any."""
        return resolve_platform(
            self.get_manifest(), lambda digest: self.get_manifest(digest, expected_digest=digest),
            platform, subject=str(self.reference))

    def fetch_blob(self, descriptor: Descriptor, *, max_size: int = MAX_MANIFEST_SIZE) -> bytes:
        """GET a small blob (an image config) whole; check its size and digest (DS:192)."""
        url = self.blob_url(descriptor.digest)
        subject = f"GET {url}"
        if descriptor.size > max_size:
            raise RegistryError(f"{subject}: blob of {descriptor.size} bytes is larger than "
                                f"{max_size} bytes")
        try:
            with self.http.stream("GET", url, follow_redirects=True) as response:
                _check_status(response, subject, what="blob")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > descriptor.size:
                        break
        except httpx.TransportError as exc:
            raise RegistryError(f"{subject}: {type(exc).__name__}: {exc}", transient=True) from exc
        return verify_blob(bytes(body), descriptor)

    def layer_descriptor(
        self, *, layer: int | None = None, blob: str | None = None,
        platform: Platform | str | None = None,
    ) -> Descriptor:
        """Resolve the reference to one gzip layer's descriptor (media type, digest, size)."""
        manifest = self.resolve(platform)
        return select_layer(manifest, layer=layer, blob=blob,
                            subject=f"{self.reference.registry}/{self.reference.repository}"
                                    f"@{manifest.digest}")

    # -- push and referrers (distribution-spec "Push", "Listing Referrers") --------------------
    def get_manifest_if_present(self, ref: str) -> Manifest | None:
        """As get_manifest, but None when the registry answers 404 (an unknown tag)."""
        url = self._url("manifests", ref)
        subject = f"GET {url}"
        found = self._get_document(url, MANIFEST_ACCEPT, subject, missing=frozenset({404}))
        if found is None:
            return None
        expected = ref if ":" in ref else None
        return parse_manifest(found[0], found[1], subject=subject, expected_digest=expected)

    def head_blob(self, digest: str) -> bool:
        """HEAD /v2/<name>/blobs/<digest>: whether the registry has the blob. A redirect counts
        as present (it is only sent for stored blobs; storage hosts may refuse HEAD)."""
        url = self.blob_url(digest)
        response = self._send(self.http.build_request("HEAD", url), f"HEAD {url}")
        if response.status_code == 404:
            return False
        if response.status_code in _REDIRECT_STATUS:
            return True
        _check_status(response, f"HEAD {url}", what="blob")
        return True

    def head_manifest(self, ref: str) -> bool:
        """HEAD /v2/<name>/manifests/<ref> with the Accept list: whether it exists."""
        url = self._url("manifests", ref)
        request = self.http.build_request("HEAD", url,
                                          headers={"Accept": ", ".join(MANIFEST_ACCEPT)})
        response = self._send(request, f"HEAD {url}")
        if response.status_code == 404:
            return False
        _check_status(response, f"HEAD {url}")
        return True

    def upload_blob(self, descriptor: Descriptor, data: bytes | Path) -> None:
        """Push one blob: POST an upload session, then PUT all bytes to its Location with
        `digest=` (DS "Pushing a blob monolithically"). A file is streamed from disk and read
        again if the request must be re-sent. Credentials never go to a Location on another
        origin."""
        start = self._url("blobs", "uploads/")
        response = self._send(self.http.build_request("POST", start,
                                                      headers={"Content-Length": "0"}),
                              f"POST {start}")
        if response.status_code != 202:
            _check_push_status(response, f"POST {start}", ok=(202,))
        location = response.headers.get("location")
        if not location:
            raise RegistryError(f"POST {start}: HTTP 202 without a Location header")
        # Location may be relative and may carry query parameters the registry needs (2.8:
        # _state=): keep them verbatim and append digest with "&" or "?".
        target = response.url.join(location)
        separator = "&" if target.query else "?"
        url = httpx.URL(f"{target}{separator}digest={quote(descriptor.digest, safe='')}")
        subject = f"PUT {public_url(url)} (blob {descriptor.digest})"
        content: bytes | _FileStream = data if isinstance(data, bytes) else _FileStream(data)
        request = self.http.build_request(
            "PUT", url, content=content,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(descriptor.size)})
        same_origin = origin(url) == origin(httpx.URL(self.base_url))
        response = self._send(request, subject, authorize=same_origin)
        _check_push_status(response, subject, ok=(201,))

    def put_manifest(self, ref: str, body: bytes, *, media_type: str) -> httpx.Headers:
        """PUT /v2/<name>/manifests/<ref> (a digest or tag) with Content-Type `media_type`;
        the response headers (a registry that indexed a `subject` sends OCI-Subject)."""
        url = self._url("manifests", ref)
        request = self.http.build_request("PUT", url, content=body,
                                          headers={"Content-Type": media_type})
        response = self._send(request, f"PUT {url}")
        _check_push_status(response, f"PUT {url}", ok=(200, 201))
        return response.headers

    def get_referrers(self, digest: str, *, artifact_type: str | None = None) -> Manifest | None:
        """GET /v2/<name>/referrers/<digest>[?artifactType=] (DS:612-632): the OCI index of
        manifests whose subject is `digest`; None when the registry lacks the API (404, and as
        ggcr 400, 406 or a non-index answer), so the caller falls back to the referrers tag."""
        url = self._url("referrers", digest)
        if artifact_type is not None:
            url = url.copy_add_param("artifactType", artifact_type)
        subject = f"GET {url}"
        found = self._get_document(url, (OCI_INDEX,), subject,
                                   missing=frozenset({400, 404, 406}))
        if found is None:
            return None
        body, content_type = found
        if (content_type or "").split(";")[0].strip().lower() != OCI_INDEX:
            return None
        return parse_manifest(body, content_type, subject=subject)

    def stream_blob(self, descriptor: Descriptor, *, max_size: int) -> Generator[bytes, None, None]:
        """GET a blob in chunks; size and digest are checked while streaming and a mismatch
        is raised (RegistryError naming the digest) before the iterator ends. Close the
        iterator when stopping early."""
        url = self.blob_url(descriptor.digest)
        subject = f"GET {url}"
        if descriptor.size > max_size:
            raise RegistryError(f"{subject}: blob of {descriptor.size} bytes is larger than "
                                f"{max_size} bytes")
        hasher = hashlib.new(descriptor.digest.partition(":")[0])
        received = 0
        try:
            with self.http.stream("GET", url, follow_redirects=True) as response:
                _check_status(response, subject, what="blob")
                for chunk in response.iter_bytes(_CHUNK):
                    received += len(chunk)
                    if received > descriptor.size:
                        raise RegistryError(f"{descriptor.digest}: blob size mismatch: expected "
                                            f"{descriptor.size} bytes, got {received} or more")
                    hasher.update(chunk)
                    yield chunk
        except httpx.TransportError as exc:
            raise RegistryError(f"{subject}: {type(exc).__name__}: {exc}", transient=True) from exc
        if received != descriptor.size:
            raise RegistryError(f"{descriptor.digest}: blob size mismatch: expected "
                                f"{descriptor.size} bytes, got {received}")
        actual = f"{hasher.name}:{hasher.hexdigest()}"
        if actual != descriptor.digest:
            raise RegistryError(f"{descriptor.digest}: blob digest mismatch: the "
                                f"{received} bytes hash to {actual}")

    def _send(self, request: httpx.Request, subject: str, *,
              authorize: bool = True) -> httpx.Response:
        """Send without following redirects (authorize=False: with no auth at all); transport
        failures become transient errors."""
        try:
            response = (self.http.send(request) if authorize
                        else self.http.send(request, auth=None))
        except httpx.TransportError as exc:
            raise RegistryError(f"{subject}: {type(exc).__name__}: {exc}", transient=True) from exc
        return response

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def verify_blob(body: bytes, descriptor: Descriptor) -> bytes:
    """`body` if it has the descriptor's size and digest, else RegistryError naming the digest."""
    if len(body) != descriptor.size:
        more = " or more" if len(body) > descriptor.size else ""
        raise RegistryError(f"{descriptor.digest}: blob size mismatch: expected "
                            f"{descriptor.size} bytes, got {len(body)}{more}")
    actual = compute_digest(body, descriptor.digest.partition(":")[0])
    if actual != descriptor.digest:
        raise RegistryError(f"{descriptor.digest}: blob digest mismatch: the "
                            f"{len(body)} bytes hash to {actual}")
    return body


def _check_status(response: httpx.Response, subject: str, *, what: str = "manifest") -> None:
    status = response.status_code
    if status == 200:
        return
    if status in (401, 403):
        raise AuthError(f"{subject}: HTTP {status}: authentication required or access denied")
    if status == 404:
        raise RegistryError(f"{subject}: HTTP 404: {what} unknown")
    raise RegistryError(f"{subject}: HTTP {status}",
                        transient=status in (408, 429) or status >= 500)


def public_url(url: httpx.URL) -> str:
    """A URL for messages: no user info, query or fragment (upload states, signatures)."""
    return str(url.copy_with(query=None, fragment=None, username=None, password=None))


def _check_push_status(response: httpx.Response, subject: str, *, ok: tuple[int, ...]) -> None:
    """Raise for a write answered with anything but `ok`, naming the OCI error codes."""
    status = response.status_code
    if status in ok:
        return
    codes = _error_codes(response)
    detail = f"HTTP {status}" + (f" ({', '.join(codes)})" if codes else "")
    if status in (401, 403):
        raise AuthError(f"{subject}: {detail}: authentication required or push access denied")
    raise RegistryError(f"{subject}: {detail}",
                        transient=status in (408, 429) or status >= 500)


def _error_codes(response: httpx.Response) -> list[str]:
    """The `code`s of an OCI error body (DS "Error Codes"); [] when there is none."""
    try:
        errors = json.loads(response.content).get("errors")
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        return []
    if not isinstance(errors, list):
        return []
    return [str(e["code"])[:64] for e in errors[:4] if isinstance(e, dict) and "code" in e]


class _FileStream(httpx.SyncByteStream):
    """A request body read from a file in chunks; iterating again re-reads it (auth retries)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __iter__(self) -> Iterator[bytes]:
        try:
            with open(self._path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    yield chunk
        except OSError as exc:
            raise InvalidInput(f"{self._path}: cannot read: {exc.strerror}") from exc
