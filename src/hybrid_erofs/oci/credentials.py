"""Registry credentials: explicit, containers auth.json, Docker config.json, credential helpers.

Lookup order: explicit > $REGISTRY_AUTH_FILE or $XDG_RUNTIME_DIR/containers/auth.json >
$DOCKER_CONFIG/config.json or ~/.docker/config.json (containers-auth.json(5), docker config).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AuthError
from .reference import DOCKER_HUB, Reference

log = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"  # docker's legacy key and helper URL
_HUB_KEYS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HELPER_TIMEOUT_S = 30.0
_TOKEN_USER = "<token>"  # docker-credential-helpers: Secret is an identity token


@dataclass(frozen=True, slots=True)
class Credentials:
    """Username/password and/or an OAuth2 identity (refresh) token; all None = anonymous.

    Secrets are excluded from repr; `origin` says where they came from (safe to log).
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    origin: str = "anonymous"

    def any(self) -> bool:
        return bool(self.username or self.password or self.identity_token)

    def basic_header(self) -> str | None:
        """`Basic base64(user:password)` (RFC 7617), or None without a username+password."""
        if not self.username or self.password is None:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def resolve_credentials(
    reference: Reference,
    *,
    username: str | None = None,
    password: str | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Credentials:
    """Find credentials for `reference`'s registry; anonymous when nothing matches.

    Args:
        username, password: explicit credentials (both or neither); they win over files.
        env: environment to read REGISTRY_AUTH_FILE, XDG_RUNTIME_DIR, DOCKER_CONFIG and PATH
            (for credential helpers) from; default os.environ.
        home: home directory for ~/.docker/config.json; default Path.home().
    """
    if username is not None or password is not None:
        if not username or password is None:
            raise AuthError(f"{reference.registry}: give both a username and a password")
        return Credentials(username, password, origin="explicit")
    env = os.environ if env is None else env
    for path in _auth_files(env, home):
        found = _from_file(path, reference, env)
        if found is not None:
            log.debug("%s: credentials from %s", reference.registry, found.origin)
            return found
    return Credentials()


def _auth_files(env: Mapping[str, str], home: Path | None) -> list[Path]:
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    elif env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    if env.get("DOCKER_CONFIG"):
        files.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    else:
        files.append((home or Path.home()) / ".docker" / "config.json")
    return files


def normalize_key(key: str) -> str:
    """An auths/credHelpers key as a registry[/namespace] (containers/image normalizeAuthFileKey):
    a URL-form key keeps only its host; Docker Hub aliases become docker.io."""
    if key.startswith(("http://", "https://")):
        key = key.split("://", 1)[1].split("/", 1)[0]
    host, slash, rest = key.partition("/")
    if host in _HUB_KEYS:
        host = DOCKER_HUB
    return host + slash + rest


def _from_file(path: Path, reference: Reference, env: Mapping[str, str]) -> Credentials | None:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: cannot read registry credentials: {type(exc).__name__}") from exc
    if not isinstance(config, dict):
        raise AuthError(f"{path}: not a JSON object")
    registry = reference.registry
    helpers = {normalize_key(k): v for k, v in (config.get("credHelpers") or {}).items()}
    if isinstance(helpers.get(registry), str):
        return _from_helper(helpers[registry], reference, env)
    auths = {normalize_key(k): v for k, v in (config.get("auths") or {}).items()}
    # Most specific namespace first: registry/a/b, registry/a, registry (containers-auth.json(5)).
    parts = [registry, *reference.repository.split("/")]
    for n in range(len(parts), 0, -1):
        entry = auths.get("/".join(parts[:n]))
        if isinstance(entry, dict) and (entry.get("auth") or entry.get("identitytoken")):
            return _from_entry(entry, f"{path} ({'/'.join(parts[:n])})")
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, reference, env)
    return None


def _from_entry(entry: dict[str, object], origin: str) -> Credentials:
    username: str | None = None
    password: str | None = None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            username, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthError(f"{origin}: 'auth' is not base64 of user:password") from exc
        if not sep:
            raise AuthError(f"{origin}: 'auth' is not base64 of user:password")
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(username or None, None, token, origin=origin)
    return Credentials(username, password, origin=origin)


def _from_helper(name: str, reference: Reference, env: Mapping[str, str]) -> Credentials | None:
    """docker-credential-helpers protocol: `docker-credential-NAME get`, server URL on stdin,
    JSON {ServerURL, Username, Secret} on stdout."""
    program = f"docker-credential-{name}"
    executable = shutil.which(program, path=env.get("PATH"))
    if executable is None:
        raise AuthError(f"{reference.registry}: credential helper {program} not found on PATH")
    server = DOCKER_HUB_AUTH_KEY if reference.registry == DOCKER_HUB else reference.registry
    try:
        done = subprocess.run(
            [executable, "get"], input=server.encode(), capture_output=True,
            timeout=_HELPER_TIMEOUT_S, env=dict(env), check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthError(f"{reference.registry}: {program} get: {type(exc).__name__}") from exc
    if done.returncode != 0:
        if b"credentials not found" in done.stdout.lower():
            return None
        # The helper's output is not shown: it may echo secrets.
        raise AuthError(f"{reference.registry}: {program} get: exit status {done.returncode}")
    try:
        data = json.loads(done.stdout)
        username, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthError(f"{reference.registry}: {program} get: output is not the helper JSON") from exc
    if not isinstance(username, str) or not isinstance(secret, str):
        raise AuthError(f"{reference.registry}: {program} get: output is not the helper JSON")
    if username == _TOKEN_USER:
        return Credentials(None, None, secret, origin=program)
    return Credentials(username, secret, origin=program)
