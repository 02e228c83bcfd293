"""Real registries for integration tests: Debian's `docker-registry` (distribution 2.8) on free
loopback ports (plain, htpasswd Basic, token auth, token auth + redirect to a presigned-URL blob
store), and OCI images written by hand and pushed with `skopeo copy`. Stopped by PID in stop()."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

USER = ("rigtest", "rig-S3CRET-pw")
SERVICE, ISSUER = "hybrid-erofs-test", "hybrid-erofs-test-issuer"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PROGRAMS = ("docker-registry", "skopeo", "htpasswd")


def missing_prerequisites() -> list[str]:
    """What is missing to run the rig (Debian packages or the cryptography module)."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    try:
        import cryptography  # noqa: F401
    except ImportError:
        missing.append("python module cryptography")
    return missing


@dataclass
class Image:
    """One single-platform image: its platform, layer bytes and the manifest's digest."""

    platform: str
    layer: bytes
    manifest: bytes = b""

    @property
    def layer_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.layer).hexdigest()

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def _layer(seed: int, random_size: int) -> bytes:
    """A deterministic gzip tar: small text files plus incompressible random bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/hello.txt", b"hello from the rig\n"),
                           ("data/random.bin", random.Random(seed).randbytes(random_size))):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


class Layout:
    """An OCI image layout (image-spec image-layout.md) written with plain Python."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.refs: list[dict[str, object]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def image(self, image: Image, label: str = "") -> dict[str, object]:
        os_name, arch, *variant = image.platform.split("/")
        diff_id = "sha256:" + hashlib.sha256(gzip.decompress(image.layer)).hexdigest()
        config = {"architecture": arch, "os": os_name, "config": {"Labels": {"rig": label}},
                  "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        if variant:
            config["variant"] = variant[0]
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": self.blob(json.dumps(config).encode(),
                                        "application/vnd.oci.image.config.v1+json"),
                    "layers": [self.blob(image.layer, GZIP_LAYER)]}
        image.manifest = json.dumps(manifest, separators=(",", ":")).encode()
        descriptor = self.blob(image.manifest, OCI_MANIFEST)
        descriptor["platform"] = {"os": os_name, "architecture": arch,
                                  **({"variant": variant[0]} if variant else {})}
        return descriptor

    def tag(self, name: str, descriptor: dict[str, object]) -> None:
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.refs.append(entry)
        (self.root / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(name: str, port: int, storage: Path, extra: str) -> str:
    return f"""version: 0.1
log:
  level: info
  fields:
    service: {name}
storage:
  filesystem:
    rootdirectory: {storage}
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: test-{name}-not-a-secret
{extra}"""


@dataclass
class Rig:
    """Running registries. Hosts are `127.0.0.1:<port>`; `store` is the blob store."""

    workdir: Path
    hosts: dict[str, str] = field(default_factory=dict)
    images: dict[str, Image] = field(default_factory=dict)
    index_digest: str = ""
    storage: dict[str, Path] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    servers: list[object] = field(default_factory=list)

    def start(self) -> None:
        from tests.rig_servers import BlobStore, TokenServer

        run = self.workdir
        htpasswd = subprocess.run(["htpasswd", "-Bbn", *USER], check=True, capture_output=True)
        (run / "htpasswd").write_bytes(htpasswd.stdout)  # 2.8 accepts bcrypt only
        self.token = TokenServer(run / "tokenkeys", user=USER, service=SERVICE, issuer=ISSUER)
        self.servers.append(self.token)
        for name in ("plain", "basic", "token"):
            self.storage[name] = run / f"storage-{name}"
        self.store = BlobStore(self.storage["token"])
        self.servers.append(self.store)
        token_auth = f"""auth:
  token:
    realm: http://127.0.0.1:{self.token.port}/token
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {self.token.cert_path}
"""
        extras = {
            "plain": ("plain", ""),
            "basic": ("basic", f"auth:\n  htpasswd:\n    realm: test-basic\n"
                               f"    path: {run / 'htpasswd'}\n"),
            "token": ("token", token_auth),
            # Same storage as "token"; blobs answered with 307 to the blob store on another
            # host *name* (localhost vs 127.0.0.1), as a registry in front of S3 does.
            "redir": ("token", token_auth + "middleware:\n  storage:\n    - name: redirect\n"
                      f"      options:\n        baseurl: http://localhost:{self.store.port}\n"),
        }
        for name, (storage, extra) in extras.items():
            port = free_port()
            config = run / f"{name}.yml"
            config.write_text(_config(name, port, self.storage[storage], extra))
            log = open(run / f"registry-{name}.log", "wb")  # noqa: SIM115 - closed with the process
            self.processes.append(subprocess.Popen(
                ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT))
            log.close()
            self.hosts[name] = f"127.0.0.1:{port}"
        for host in self.hosts.values():
            _wait_ready(f"http://{host}/v2/")
        self._push()

    def _push(self) -> None:
        layout = Layout(self.workdir / "layout")
        index: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        for name, platform, seed in (("amd64", "linux/amd64", 1), ("arm64", "linux/arm64/v8", 2)):
            self.images[name] = Image(platform, _layer(seed, 3 << 20))
            descriptor = layout.image(self.images[name])
            layout.tag(name, descriptor)
            index["manifests"].append(descriptor)  # type: ignore[attr-defined]
        self.images["tamper"] = Image("linux/amd64", _layer(3, 64 << 10))
        layout.tag("tamper", layout.image(self.images["tamper"], label="tamper"))
        index_body = json.dumps(index).encode()
        layout.tag("multi", layout.blob(index_body, OCI_INDEX))
        self.index_digest = "sha256:" + hashlib.sha256(index_body).hexdigest()
        src = f"oci:{layout.root}"
        creds = ["--dest-creds", ":".join(USER)]
        for host, repo, tag, opts in (
            (self.hosts["plain"], "lab/img", "multi", ["--all"]),
            (self.hosts["plain"], "lab/img", "amd64", []),
            (self.hosts["plain"], "lab/img", "v2s2", ["--format", "v2s2"]),
            (self.hosts["plain"], "lab/tamper", "tamper", []),
            (self.hosts["basic"], "lab/img", "multi", ["--all", *creds]),
            (self.hosts["token"], "lab/img", "multi", ["--all", *creds]),
            (self.hosts["token"], "public/img", "multi", ["--all", *creds]),
        ):
            source = f"{src}:{'amd64' if tag == 'v2s2' else tag}"
            subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                            "--dest-tls-verify=false", *opts, source,
                            f"docker://{host}/{repo}:{tag}"], check=True, capture_output=True)

    def blob_path(self, registry: str, digest: str) -> Path:
        """The file where a registry's filesystem driver keeps a blob."""
        hexdigest = digest.split(":", 1)[1]
        return (self.storage[registry] / "docker/registry/v2/blobs/sha256"
                / hexdigest[:2] / hexdigest / "data")

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for server in self.servers:
            server.stop()  # type: ignore[attr-defined]


def _wait_ready(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code in (200, 401):
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: registry did not start within {timeout_s} s")
        time.sleep(0.1)
