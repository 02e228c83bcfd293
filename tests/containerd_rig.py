"""containerd 1.6 (Debian), runc and a plain `docker-registry` started for one test module with
private root, state, sockets and ports; the snapshotter as a child process; a CRI PullImage
client with hand-encoded messages; images of a real Debian root filesystem for `ctr run`."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.registry_rig import GZIP_LAYER, OCI_MANIFEST, Layout, _wait_ready, free_port

PROGRAMS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "docker-registry", "skopeo",
            "pigz", "zstd")
SNAPSHOTTER = "hybrid-erofs"
NAMESPACE = "k8s.io"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


def missing_prerequisites() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


# --- CRI PullImage, hand-encoded (k8s.io/cri-api runtime/v1 api.proto) -------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_pull_image_request(image: str) -> bytes:
    """PullImageRequest{image: ImageSpec{image: IMAGE}} (field 1 in both)."""
    return _field(1, _field(1, image.encode()))


def decode_pull_image_response(data: bytes) -> str:
    """PullImageResponse.image_ref (field 1, a string)."""
    offset, ref = 0, ""
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        assert key & 7 == 2, f"unexpected wire type in PullImageResponse: {key}"
        length, offset = _read_varint(data, offset)
        if key >> 3 == 1:
            ref = data[offset:offset + length].decode()
        offset += length
    return ref


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


# --- images ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RunImage:
    """An OCI layout tag `tag` in `layout` whose layers are gzip tars, bottom first."""

    layout: Path
    tag: str
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]

    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


MARKER = b"hello from the top layer\n"
# What the top layer of the debootstrap image deletes, and the directory it makes opaque.
DELETED = ("etc/issue.net", "usr/share/doc/apt")
OPAQUE_DIR = "usr/share/doc/bash"


def _gzip_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        subprocess.run(["pigz", "-6", "-n", "-c"], stdin=fin, stdout=fout, check=True)


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return raw.getvalue()


def _entry(name: str, data: bytes | None = None, *, mode: int = 0o644,
           kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
    if data is not None:
        info.size = len(data)
    return info, data


def top_layer_tar() -> bytes:
    """Deletions (whiteouts), an opaque directory with a new file, and a marker file."""
    entries = [
        _entry("etc/", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("etc/hybrid-erofs-test", MARKER),
        _entry("etc/.wh.issue.net", b""),
        _entry("usr/", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("usr/share/", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("usr/share/doc/", kind=tarfile.DIRTYPE, mode=0o755),
        _entry("usr/share/doc/.wh.apt", b""),
        _entry(f"{OPAQUE_DIR}/", kind=tarfile.DIRTYPE, mode=0o755),
        _entry(f"{OPAQUE_DIR}/.wh..wh..opq", b""),
        _entry(f"{OPAQUE_DIR}/only-this", b"the opaque directory's one file\n"),
    ]
    return _tar(entries)


def build_run_image(root: Path, rootfs_tar: Path, *, tag: str = "debian",
                    base_layers: tuple[bytes, ...] = (),
                    extra_layers: tuple[bytes | Path, ...] = (top_layer_tar(),),
                    zstd_layers: tuple[bytes, ...] = (),
                    cmd: tuple[str, ...] = ("/bin/cat", "/etc/hybrid-erofs-test")) -> RunImage:
    """A linux/amd64 image: `base_layers`, the rootfs tar (gzip, pigz), then `extra_layers`
    (tars, in memory or files: a file is compressed with pigz and its .gz kept beside it),
    then `zstd_layers` (zstd-compressed: layers that cannot be mounted lazily).
    Base layers give the same rootfs other chain IDs (another image to containerd)."""
    layout = Layout(root) if not (root / "oci-layout").exists() else _reopen(root)
    descriptors: list[dict[str, object]] = []
    diff_ids: list[str] = []
    for tar in (*base_layers, rootfs_tar, *extra_layers):
        if isinstance(tar, bytes):
            descriptors.append(layout.blob(gzip.compress(tar, mtime=0), GZIP_LAYER))
            diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
            continue
        gz = root / f"{tar.name}.gz" if tar == rootfs_tar else tar.with_name(tar.name + ".gz")
        if not gz.exists():
            _gzip_file(tar, gz.with_name(gz.name + ".part"))
            gz.with_name(gz.name + ".part").rename(gz)
        with open(tar, "rb") as f:
            diff_ids.append("sha256:" + hashlib.file_digest(f, "sha256").hexdigest())
        with open(gz, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        blob = root / "blobs" / "sha256" / digest
        if not blob.exists():
            os.link(gz, blob)
        descriptors.append({"mediaType": GZIP_LAYER, "digest": f"sha256:{digest}",
                            "size": gz.stat().st_size})
    for tar in zstd_layers:
        compressed = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True,
                                    check=True).stdout
        descriptors.append(layout.blob(compressed, ZSTD_LAYER))
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                         "Cmd": list(cmd)},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": layout.blob(json.dumps(config).encode(), OCI_CONFIG),
                "layers": descriptors}
    layout.tag(tag, layout.blob(json.dumps(manifest).encode(), OCI_MANIFEST))
    return RunImage(root, tag, tuple(str(d["digest"]) for d in descriptors), tuple(diff_ids))


def _reopen(root: Path) -> Layout:
    layout = Layout.__new__(Layout)
    layout.root = root
    layout.refs = json.loads((root / "index.json").read_text())["manifests"]
    return layout


# --- the processes -----------------------------------------------------------------------------

def _stop(proc: subprocess.Popen[bytes], *, timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, *,
              timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear (exit {proc.poll()}): "
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


@dataclass
class Registry:
    """A plain-HTTP docker-registry on 127.0.0.1 whose access log the test reads."""

    workdir: Path
    host: str = ""
    log: Path = field(default_factory=Path)
    proc: subprocess.Popen[bytes] | None = None
    address: str = "127.0.0.1"
    netns: str | None = None  # run inside this network namespace (the benchmark's)
    storage: Path | None = None  # kept between runs when given

    def start(self) -> None:
        port = free_port() if self.netns is None else 5000
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "registry.yml"
        config.write_text(f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {self.storage or self.workdir / 'storage'}
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {self.address}:{port}
  secret: snapshotter-test-not-a-secret
""")
        self.log = self.workdir / "registry.log"
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*prefix, "docker-registry", "serve", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT)
        self.host = f"{self.address}:{port}"
        _wait_ready(f"http://{self.host}/v2/")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def blob_gets(self, digest: str, *, since: int = 0) -> list[tuple[int, int]]:
        """(status, bytes written) of the GETs of blob `digest` in the access log (combined
        format) from line `since` on."""
        found = []
        for line in self.log_lines()[since:]:
            match = re.search(r'"GET /v2/\S+/blobs/(\S+) HTTP/[\d.]+" (\d+) (\d+)', line)
            if match and match[1] == digest:
                found.append((int(match[2]), int(match[3])))
        return found


@dataclass
class SnapshotterProcess:
    """`python -m hybrid_erofs snapshotter` as a child, logging to `log`."""

    address: Path
    root: Path
    log: Path
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.address.parent.mkdir(parents=True, exist_ok=True)
        self.address.unlink(missing_ok=True)  # a killed instance's socket
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hybrid_erofs", "-v", "snapshotter", "--address",
                 str(self.address), "--root", str(self.root), *self.extra_args],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env})
        _wait_for(self.address, self.proc, self.log)

    def stop_layer_daemons(self) -> None:
        """`hybrid-erofs umount --lazy` every layer mount the snapshotter left running."""
        env = {**os.environ, **self.env}
        status = subprocess.run([sys.executable, "-m", "hybrid_erofs", "status", "--json"],
                                capture_output=True, text=True, env=env)
        for entry in json.loads(status.stdout or "[]"):
            subprocess.run([sys.executable, "-m", "hybrid_erofs", "umount", "--lazy",
                            entry["mountpoint"]], capture_output=True, env=env)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
            self.proc.wait()
        else:
            _stop(self.proc)


@dataclass
class Containerd:
    """containerd with a private root, state and sockets, the proxy plugin `hybrid-erofs`
    at `snapshotter_address`, CRI pulling through it with the remote-snapshot labels, and the
    registry `registry_host` as a plain-HTTP mirror of itself."""

    workdir: Path
    snapshotter_address: Path
    registry_host: str
    cri_snapshotter: str = SNAPSHOTTER
    aliases: tuple[str, ...] = ()  # registry names CRI pulls from `registry_host` (mirrors)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Path:
        return self.workdir / "containerd.sock"

    def start(self) -> None:
        w = self.workdir
        for sub in ("root", "state", "cni-conf", "cni-bin", "opt"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        config = w / "config.toml"
        config.write_text(f"""version = 2
root = "{w / 'root'}"
state = "{w / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{w / 'containerd.sock.ttrpc'}"
[debug]
  address = ""
[metrics]
  address = ""

[proxy_plugins]
  [proxy_plugins.{SNAPSHOTTER}]
    type = "snapshot"
    address = "{self.snapshotter_address}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{w / 'opt'}"
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{self.cri_snapshotter}"
      disable_snapshot_annotations = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{w / 'cni-bin'}"
      conf_dir = "{w / 'cni-conf'}"
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{self.registry_host}"]
      endpoint = ["http://{self.registry_host}"]
""" + "".join(f"""    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{alias}"]
      endpoint = ["http://{self.registry_host}"]
""" for alias in self.aliases))
        log = w / "containerd.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(self.address, self.proc, log)
        self.ctr("version")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def ctr(self, *args: str, timeout_s: float = 300,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ctr", "--address", str(self.address), "--namespace", NAMESPACE,
                               *args], capture_output=True, text=True, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: exit {proc.returncode}: "
                               f"{proc.stderr.strip()}")
        return proc

    def cri_pull(self, image: str, *, timeout_s: float = 600) -> str:
        """CRI PullImage, as the kubelet does; returns the image_ref containerd answers."""
        with grpc.insecure_channel(f"unix://{self.address}") as channel:
            pull = channel.unary_unary("/runtime.v1.ImageService/PullImage",
                                       request_serializer=None, response_deserializer=None)
            answer = pull(encode_pull_image_request(image), timeout=timeout_s)
        return decode_pull_image_response(answer)

    def wait_for_snapshotter(self, timeout_s: float = 30) -> None:
        """containerd redials a proxy plugin with back-off (at most 3 s in 1.6): wait until
        a call reaches the snapshotter (`snapshots ls` does not: containerd answers it from
        its own metadata; a Prepare does)."""
        deadline = time.monotonic() + timeout_s
        probe = f"wait-probe-{time.monotonic_ns()}"
        while self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", probe,
                       check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("containerd does not reach the snapshotter again")
            time.sleep(0.5)
        self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", probe)

    def remove_container(self, name: str) -> None:
        """Kill its task, wait until the task can be deleted, delete the container."""
        self.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
        for _ in range(50):
            if self.ctr("tasks", "delete", name, check=False).returncode == 0:
                break
            time.sleep(0.2)
        self.ctr("containers", "delete", name, check=False)

    def remove_all(self) -> None:
        """Delete every task, container and image of the namespace (best effort)."""
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.remove_container(task)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)
        images = self.ctr("images", "ls", "-q", check=False).stdout.split()
        if images:
            self.ctr("images", "rm", "--sync", *images, check=False)


def mounts_below(path: Path) -> list[str]:
    """Mount points below `path`, deepest first (from /proc/self/mountinfo)."""
    found = []
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_below(path: Path) -> None:
    for point in mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True)


def chain_ids(diff_ids: tuple[str, ...]) -> list[str]:
    """OCI image-spec ChainID of each layer: ChainID(L0) = DiffID(L0), then
    sha256(ChainID(n-1) + " " + DiffID(n))."""
    chain = [diff_ids[0]]
    for diff in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff}".encode()).hexdigest())
    return chain


def mount_view(containerd: Containerd, snapshotter: str, key: str, parent: str,
               dest: Path) -> None:
    """`ctr snapshots view --mounts` of `parent`, mounted on `dest` as containerd would."""
    answer = containerd.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key,
                            parent).stdout
    (mount,) = json.loads(answer)
    dest.mkdir(parents=True, exist_ok=True)
    if mount["Type"] == "bind":
        subprocess.run(["mount", "--rbind", mount["Source"], str(dest)], check=True)
    else:
        subprocess.run(["mount", "-t", mount["Type"], "-o", ",".join(mount["Options"]),
                        mount["Source"], str(dest)], check=True)
