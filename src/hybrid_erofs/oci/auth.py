"""Registry authentication as an httpx.Auth: anonymous, Basic, and Bearer tokens from
WWW-Authenticate challenges (distribution token.md / oauth.md, RFC 6750 §3).

Authorization is only ever attached to the registry's own origin (DS:825); never logged.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from ..errors import AuthError
from .credentials import Credentials

log = logging.getLogger(__name__)

CLIENT_ID = "hybrid-erofs"
_MAX_TOKEN_BODY = 64 << 10  # as ggcr bearer.go: token responses are small
_DEFAULT_EXPIRES_S = 60  # token.md: "expires_in ... defaults to 60 seconds"
_REPO_PATH = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/")
_PUSH_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CHALLENGE_PARAM = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    """One WWW-Authenticate challenge: scheme (lower case) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Parse WWW-Authenticate header values (RFC 9110 §11.6.1); quoted values may hold commas,
    as in `scope="repository:a/b:pull,push"`."""
    challenges: list[Challenge] = []
    for value in values:
        text = value.strip()
        while text:
            scheme, _, text = text.partition(" ")
            params: dict[str, str] = {}
            while True:
                match = _CHALLENGE_PARAM.match(text)
                if not match:
                    break
                name, quoted, bare = match.groups()
                params[name.lower()] = (
                    re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
                )
                text = text[match.end() :]
            challenges.append(Challenge(scheme.strip(",").lower(), params))
            text = text.lstrip(", ")
    return challenges


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with default ports made explicit, for same-origin checks."""
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host.lower(), port


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    expires_at: float  # on the injected monotonic clock


class RegistryAuth(httpx.Auth):
    """httpx.Auth for one registry origin. Thread-safe (token cache under a lock).

    Requests to any other origin (blob storage, CDN, token realm) pass through with no
    Authorization (DS:825). After the first challenge the scheme is remembered, so later
    requests carry credentials up front; Bearer tokens are cached per (realm, service, scope)
    and fetched again shortly before they expire. A 401 is retried once with a fresh token.

    Args:
        registry_url: scheme://host[:port] of the registry API.
        credentials: username/password and/or identity (OAuth2 refresh) token; None = anonymous.
        clock: monotonic seconds, injectable for tests.
        wall_clock: seconds since the epoch, for `issued_at`.
    """

    def __init__(
        self,
        registry_url: str,
        credentials: Credentials | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._origin = origin(httpx.URL(registry_url))
        self._secure = self._origin[0] == "https"
        self._credentials = credentials or Credentials()
        self._refresh_token = self._credentials.identity_token
        self._clock, self._wall_clock = clock, wall_clock
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self.token_requests = 0  # upstream count, for tests and stats

    # -- httpx.Auth ------------------------------------------------------------------------
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin(request.url) != self._origin:
            request.headers.pop("Authorization", None)
            yield request
            return
        scope = _scope_for(request.url.path, request.method)
        with self._lock:
            challenge = self._challenge
        if challenge is not None:
            header = yield from self._authorization(challenge, scope, fresh=False)
            if header:
                request.headers["Authorization"] = header
        response = yield request
        if response.status_code != 401:
            return
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None:
            return
        with self._lock:
            self._challenge = chosen
        # error="insufficient_scope" may name the scope needed; put it first (ggcr bearer.go).
        wanted = chosen.params.get("scope") or scope
        header = yield from self._authorization(chosen, wanted, fresh=True)
        if header is None or header == request.headers.get("Authorization"):
            return
        request.headers["Authorization"] = header
        yield request

    # -- helpers ---------------------------------------------------------------------------
    def _authorization(
        self, challenge: Challenge, scope: str, *, fresh: bool
    ) -> Generator[httpx.Request, httpx.Response, str | None]:
        if challenge.scheme == "basic":
            return self._credentials.basic_header()
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        key = (realm, service, scope)
        now = self._clock()
        with self._lock:
            token = self._tokens.get(key)
        if token is not None and not fresh and now < token.expires_at:
            return f"Bearer {token.value}"
        token = yield from self._fetch_token(realm, service, scope)
        with self._lock:
            self._tokens[key] = token
        return f"Bearer {token.value}"

    def _fetch_token(
        self, realm: str, service: str, scope: str
    ) -> Generator[httpx.Request, httpx.Response, _Token]:
        realm_url = self._check_realm(realm)
        scopes = [s for s in scope.split(" ") if s]
        response: httpx.Response | None = None
        if self._refresh_token:
            # oauth.md: POST grant_type=refresh_token; "if ... returns 404 using POST, use GET".
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh_token,
                    "service": service, "client_id": CLIENT_ID, "scope": " ".join(scopes)}
            response = yield httpx.Request("POST", realm_url, data=form)
            self.token_requests += 1
            if response.status_code == 404:
                response = None
        if response is None:
            params: list[tuple[str, str | int | float | bool | None]] = [("service", service)] if service else []
            params += [("scope", s) for s in scopes]
            headers = {}
            basic = self._credentials.basic_header()
            if basic:
                headers["Authorization"] = basic
                params.append(("account", self._credentials.username or ""))
            response = yield httpx.Request(
                "GET", realm_url.copy_merge_params(params), headers=headers
            )
            self.token_requests += 1
        return self._parse_token(response, realm_url, scope)

    def _check_realm(self, realm: str) -> httpx.URL:
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise AuthError(f"token realm {realm!r}: not a URL") from exc
        if url.scheme not in ("http", "https") or (self._secure and url.scheme != "https"):
            raise AuthError(
                f"token realm {_no_query(url)}: refusing a {url.scheme} realm for an "
                f"{self._origin[0]} registry"
            )
        return url

    def _parse_token(self, response: httpx.Response, realm: httpx.URL, scope: str) -> _Token:
        subject = f"token server {_no_query(realm)}"
        if response.status_code in (401, 403):
            who = "credentials for" if self._credentials.any() else "anonymous access to"
            raise AuthError(
                f"{subject}: HTTP {response.status_code}: {who} scope {scope!r} refused"
            )
        if response.status_code != 200:
            raise AuthError(
                f"{subject}: HTTP {response.status_code} for scope {scope!r}",
                transient=response.status_code in (408, 429) or response.status_code >= 500,
            )
        body = response.read()
        if len(body) > _MAX_TOKEN_BODY:
            raise AuthError(f"{subject}: token response of {len(body)} bytes is too large")
        try:
            data = json.loads(body)
            value = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError) as exc:
            raise AuthError(f"{subject}: token response is not a JSON object") from exc
        if not isinstance(value, str) or not value:
            raise AuthError(f"{subject}: token response has no 'token' or 'access_token'")
        refresh = data.get("refresh_token")
        if isinstance(refresh, str) and refresh and self._refresh_token:
            self._refresh_token = refresh  # ggcr: a returned refresh token replaces the old one
        expires_in = data.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 0.0
        lifetime = max(lifetime, _DEFAULT_EXPIRES_S) if lifetime <= 0 else lifetime
        age = _age_s(data.get("issued_at"), self._wall_clock())
        remaining = lifetime - min(max(age, 0.0), lifetime)
        # Refresh early: a token must not expire between being sent and being checked.
        margin = min(30.0, remaining / 4)
        log.debug("%s: token for scope %r valid for %.0f s", subject, scope, remaining)
        return _Token(value, self._clock() + remaining - margin)


def _scope_for(path: str, method: str = "GET") -> str:
    """The scope a /v2/<name>/... request needs (scope.md); "" for /v2/ itself. Writes need
    pull,push, as distribution's appendAccessRecords grants them for POST, PUT and PATCH."""
    match = _REPO_PATH.match(path)
    if not match:
        return ""
    actions = "pull,push" if method.upper() in _PUSH_METHODS else "pull"
    return f"repository:{match.group(1)}:{actions}"


def _age_s(issued_at: object, now: float) -> float:
    """Seconds since an RFC 3339 `issued_at`; 0 when absent or unparseable."""
    if not isinstance(issued_at, str):
        return 0.0
    try:
        return now - datetime.fromisoformat(issued_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _no_query(url: httpx.URL) -> str:
    """A URL for messages: no user info, no query string (it may carry credentials)."""
    return str(url.copy_with(query=None, fragment=None, username=None, password=None))

