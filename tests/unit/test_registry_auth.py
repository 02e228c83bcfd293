"""RegistryAuth flows over httpx.MockTransport (challenges, token cache/expiry, 401 retry, OAuth2
refresh) and credential lookup (auth files, credential helpers); secrets never leak."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import httpx
import pytest

from hybrid_erofs.errors import AuthError
from hybrid_erofs.oci.auth import RegistryAuth, parse_challenges
from hybrid_erofs.oci.client import RegistryClient
from hybrid_erofs.oci.credentials import Credentials, normalize_key, resolve_credentials
from hybrid_erofs.oci.reference import parse_reference
from tests.registry_doubles import REALM, REGISTRY, REPO, FakeRegistry, manifest_for

SECRET = "s3cr3t-PASSWORD"
SECRET_B64 = base64.b64encode(f"ocilab:{SECRET}".encode()).decode()
LAYER = b"layer"
MANIFEST = manifest_for([("application/vnd.oci.image.layer.v1.tar+gzip", LAYER)])


def test_parse_challenges_quoted_commas_and_several() -> None:
    got = parse_challenges([
        'Bearer realm="https://auth.test/token",service="reg",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"',
        'Basic realm="x", Bearer realm="https://r/t" , service=s',
    ])
    assert [c.scheme for c in got] == ["bearer", "basic", "bearer"]
    assert got[0].params == {"realm": "https://auth.test/token", "service": "reg",
                             "scope": "repository:a/b:pull,push repository:c:pull",
                             "error": "insufficient_scope"}
    assert got[1].params == {"realm": "x"}
    assert got[2].params == {"realm": "https://r/t", "service": "s"}
    assert parse_challenges(['Bearer realm="a\\"b"'])[0].params["realm"] == 'a"b'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _client(fake: FakeRegistry, credentials: Credentials | None = None,
            clock: Clock | None = None) -> tuple[RegistryClient, RegistryAuth]:
    auth = RegistryAuth(REGISTRY, credentials, clock=clock or Clock())
    client = RegistryClient(f"127.0.0.1:5000/{REPO}:t", transport=fake.transport(), auth=auth)
    return client, auth


def _fake(**kw: object) -> FakeRegistry:
    fake = FakeRegistry(**kw)  # type: ignore[arg-type]
    fake.manifests["t"] = ("application/vnd.oci.image.manifest.v1+json", MANIFEST)
    return fake


def test_bearer_token_cached_then_refreshed_before_expiry() -> None:
    clock = Clock()
    fake = _fake(auth="bearer", token_ttl_s=120)
    client, auth = _client(fake, clock=clock)
    for _ in range(3):
        client.get_manifest()
    assert auth.token_requests == 1
    # 1 challenge + 1 token + 3 manifest GETs carrying the token up front
    assert len(fake.requests) == 5
    token_get = fake.requests[1]
    assert token_get.url.params.get_list("scope") == [f"repository:{REPO}:pull"]
    assert token_get.url.params["service"] == "fake" and "authorization" not in token_get.headers
    clock.now += 89  # still valid: refreshed only within min(30, 120/4) s of expiry
    client.get_manifest()
    assert auth.token_requests == 1
    clock.now += 2
    client.get_manifest()
    assert auth.token_requests == 2


def test_bearer_401_with_cached_token_is_retried_once() -> None:
    fake = _fake(auth="bearer")
    client, auth = _client(fake)
    client.get_manifest()
    revoked = {"tok-1"}
    original = fake.fault

    def fault(request: httpx.Request) -> httpx.Response | None:
        if request.headers.get("authorization", "").removeprefix("Bearer ") in revoked:
            return httpx.Response(401, headers={
                "WWW-Authenticate": f'Bearer realm="{REALM}",service="fake"'})
        return original(request) if original else None

    fake.fault = fault
    client.get_manifest()
    assert auth.token_requests == 2
    revoked.add("tok-2")
    revoked.add("tok-3")
    with pytest.raises(AuthError, match="HTTP 401"):
        client.get_manifest()  # fresh token refused too: one retry only, then fail
    assert auth.token_requests == 3


def test_basic_and_bearer_with_credentials_never_leak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    creds = Credentials("ocilab", SECRET, origin="explicit")
    messages: list[str] = [repr(creds)]
    for kind in ("basic", "bearer"):
        fake = _fake(auth=kind)
        client, _ = _client(fake, creds)
        client.get_manifest()
        sent = [r.headers.get("authorization", "") for r in fake.requests]
        assert f"Basic {SECRET_B64}" in sent
        bad, _ = _client(_fake(auth=kind), Credentials("ocilab", "wrong-" + SECRET))
        with pytest.raises(AuthError) as info:
            bad.get_manifest()
        messages += [str(info.value), repr(info.value)]
    text = caplog.text + "\n".join(messages)
    assert SECRET not in text and SECRET_B64 not in text
    assert "refused" in messages[-2] or "HTTP 401" in messages[-2]


def test_identity_token_uses_oauth2_post_and_falls_back_to_get() -> None:
    fake = _fake(auth="bearer")
    client, _ = _client(fake, Credentials(identity_token="idtok"))
    client.get_manifest()
    post = next(r for r in fake.requests if r.method == "POST")
    form = dict(httpx.QueryParams(post.content.decode()))
    assert form == {"grant_type": "refresh_token", "refresh_token": "idtok", "service": "fake",
                    "client_id": "hybrid-erofs", "scope": f"repository:{REPO}:pull"}

    fake = _fake(auth="bearer", fault=lambda r: httpx.Response(404) if r.method == "POST" else None)
    client, auth = _client(fake, Credentials(identity_token="idtok"))
    client.get_manifest()
    assert [r.method for r in fake.requests if str(r.url).startswith(REALM)] == ["POST", "GET"]


def test_http_realm_refused_for_https_registry() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={
            "WWW-Authenticate": 'Bearer realm="http://evil.test/token",service="x"'})

    client = RegistryClient("ghcr.io/o/r:t", transport=httpx.MockTransport(handler))
    with pytest.raises(AuthError, match="refusing a http realm for an https registry"):
        client.get_manifest()


def test_authorization_only_on_registry_origin() -> None:
    fake = _fake(auth="basic")
    auth = RegistryAuth(REGISTRY, Credentials("ocilab", SECRET))
    with httpx.Client(transport=fake.transport(), auth=auth) as http:
        http.get(f"{REGISTRY}/v2/")
        for other in ("http://127.0.0.1:5001/x", "https://127.0.0.1:5000/v2/",
                      "http://localhost:5000/v2/"):
            http.get(other, headers={"Authorization": "Basic leaked"})
    assert [("authorization" in r.headers) for r in fake.requests] == [False, True, False,
                                                                      False, False]


# -- credential lookup ------------------------------------------------------------------------
REF = parse_reference("127.0.0.1:5000/lab/img:t")
HUB = parse_reference("alpine")


def _write(path: Path, config: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_explicit_credentials_win(tmp_path: Path) -> None:
    env = {"REGISTRY_AUTH_FILE": str(_write(tmp_path / "a.json", {
        "auths": {"127.0.0.1:5000": {"auth": _auth("file", "x")}}}))}
    got = resolve_credentials(REF, username="me", password=SECRET, env=env, home=tmp_path)
    assert (got.username, got.password, got.origin) == ("me", SECRET, "explicit")
    assert SECRET not in repr(got)
    with pytest.raises(AuthError, match="both a username and a password"):
        resolve_credentials(REF, username="me", env=env, home=tmp_path)


def test_auth_file_order_and_namespaces(tmp_path: Path) -> None:
    docker = _write(tmp_path / ".docker" / "config.json", {
        "auths": {"127.0.0.1:5000": {"auth": _auth("docker", "d")},
                  "https://index.docker.io/v1/": {"auth": _auth("hub", "h")}}})
    assert resolve_credentials(REF, env={}, home=tmp_path).username == "docker"
    assert resolve_credentials(HUB, env={}, home=tmp_path).username == "hub"
    xdg = tmp_path / "run"
    _write(xdg / "containers" / "auth.json", {"auths": {
        "127.0.0.1:5000": {"auth": _auth("xdg", "x")},
        "127.0.0.1:5000/lab": {"auth": _auth("lab-ns", "n")},
        "127.0.0.1:5000/lab/other": {"auth": _auth("other", "o")}}})
    got = resolve_credentials(REF, env={"XDG_RUNTIME_DIR": str(xdg)}, home=tmp_path)
    assert (got.username, got.password) == ("lab-ns", "n")
    explicit = _write(tmp_path / "explicit.json", {"auths": {
        "http://127.0.0.1:5000/v2/": {"auth": _auth("reg", "r")}}})
    env = {"XDG_RUNTIME_DIR": str(xdg), "REGISTRY_AUTH_FILE": str(explicit)}
    assert resolve_credentials(REF, env=env, home=tmp_path).username == "reg"
    env = {"DOCKER_CONFIG": str(tmp_path / "none")}
    assert resolve_credentials(REF, env=env, home=tmp_path) == Credentials()
    assert docker.exists()


def test_identity_token_and_markers(tmp_path: Path) -> None:
    _write(tmp_path / ".docker" / "config.json", {"auths": {
        "127.0.0.1:5000": {"auth": _auth("u", ""), "identitytoken": "idtok"},
        "docker.io": {}}})
    got = resolve_credentials(REF, env={}, home=tmp_path)
    assert (got.username, got.password, got.identity_token) == ("u", None, "idtok")
    assert resolve_credentials(HUB, env={}, home=tmp_path) == Credentials()
    _write(tmp_path / ".docker" / "config.json", {"auths": {"127.0.0.1:5000": {"auth": "!!"}}})
    with pytest.raises(AuthError, match="not base64"):
        resolve_credentials(REF, env={}, home=tmp_path)


def _helper(bindir: Path, name: str, script: str) -> None:
    bindir.mkdir(exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_credential_helpers(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    # Echo what was asked on stdin into the user name, to check the protocol.
    _helper(bindir, "fake", '[ "$1" = get ] || exit 3\nread -r server\n'
            'printf \'{"ServerURL":"%s","Username":"u@%s","Secret":"' + SECRET + '"}\' '
            '"$server" "$server"\n')
    _helper(bindir, "tok", 'printf \'{"Username":"<token>","Secret":"idtok"}\'\n')
    _helper(bindir, "none", 'echo "credentials not found in native keychain"; exit 1\n')
    _helper(bindir, "broken", f'echo "{SECRET}" >&2; echo "{SECRET}"; exit 2\n')
    env = {"PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    config = tmp_path / ".docker" / "config.json"

    _write(config, {"credsStore": "fake", "auths": {"127.0.0.1:5000": {}}})
    got = resolve_credentials(REF, env=env, home=tmp_path)
    assert (got.username, got.password, got.origin) == ("u@127.0.0.1:5000", SECRET,
                                                        "docker-credential-fake")
    assert resolve_credentials(HUB, env=env, home=tmp_path).username == (
        "u@https://index.docker.io/v1/")
    _write(config, {"credsStore": "fake", "credHelpers": {"127.0.0.1:5000": "tok"}})
    assert resolve_credentials(REF, env=env, home=tmp_path).identity_token == "idtok"
    _write(config, {"credHelpers": {"127.0.0.1:5000": "none"}})
    assert resolve_credentials(REF, env=env, home=tmp_path) == Credentials()
    _write(config, {"credHelpers": {"127.0.0.1:5000": "broken"}})
    with pytest.raises(AuthError, match="exit status 2") as info:
        resolve_credentials(REF, env=env, home=tmp_path)
    assert SECRET not in str(info.value)
    _write(config, {"credHelpers": {"127.0.0.1:5000": "missing"}})
    with pytest.raises(AuthError, match="docker-credential-missing not found on PATH"):
        resolve_credentials(REF, env=env, home=tmp_path)


@pytest.mark.parametrize(("key", "normal"), [
    ("https://index.docker.io/v1/", "docker.io"), ("registry-1.docker.io", "docker.io"),
    ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"), ("quay.io/org/repo", "quay.io/org/repo"),
    ("index.docker.io/library/x", "docker.io/library/x"),
], ids=lambda v: str(v))
def test_normalize_key(key: str, normal: str) -> None:
    assert normalize_key(key) == normal
