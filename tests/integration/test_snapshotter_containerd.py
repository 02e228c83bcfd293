"""Issue 16 end to end with Debian's containerd 1.6 and runc: the snapshotter registered as the
proxy plugin `hybrid-erofs`, images of a real Debian root filesystem pushed with skopeo to
`docker-registry`, pulled through CRI PullImage (with the remote-snapshot labels) and run with
`ctr run --snapshotter hybrid-erofs`; the container's tree compared with the overlayfs
snapshotter's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hybrid_erofs.fetching.background import fetch_status
from tests.conftest import ci_required
from tests.containerd_rig import (
    DELETED,
    MARKER,
    OPAQUE_DIR,
    SNAPSHOTTER,
    Containerd,
    Registry,
    RunImage,
    SnapshotterProcess,
    _entry,
    _tar,
    build_run_image,
    chain_ids,
    missing_prerequisites,
    mount_view,
    unmount_below,
)
from tests.oci_images import push_image, tree_view

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]
MIRRORED = "registry.invalid"  # a registry name that resolves nowhere (RFC 2606)


def _prerequisites() -> Path:
    if os.geteuid() != 0:
        ci_required("containerd and overlay mounts need root")
    missing = missing_prerequisites()
    if missing:
        ci_required(f"missing: {', '.join(missing)} (apt-get install containerd runc ...)")
    rootfs = os.environ.get("HYBRID_EROFS_ROOTFS_TAR")
    if not rootfs or not Path(rootfs).is_file():
        ci_required("HYBRID_EROFS_ROOTFS_TAR is not set (a tar of a real root filesystem)")
    return Path(rootfs)


class Node:
    """A registry, the snapshotter (lazy layers on, unbound indexes accepted: the referrers
    index is the only kind there is until images carry a bound one) and containerd, all
    private to one test module."""

    def __init__(self, workdir: Path, *, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.registry = Registry(workdir / "registry")
        self.snapshotter = SnapshotterProcess(
            workdir / "run" / "sn.sock", workdir / "sn-root", workdir / "snapshotter.log",
            extra_args=("--accept-unbound-indexes", "--cache-dir", str(workdir / "cache"),
                        "--metrics-address", "127.0.0.1:0", *extra_args),
            env={"HYBRID_EROFS_RUNTIME_DIR": str(workdir / "runtime")})
        self.containerd: Containerd | None = None

    @property
    def ctrd(self) -> Containerd:
        assert self.containerd is not None
        return self.containerd

    def start(self) -> None:
        self.registry.start()
        # MIRRORED exists only as a name: containerd and the snapshotter both reach it through
        # the registry above (CRI's mirrors; our --hosts-dir in containerd's hosts.toml shape)
        hosts = self.workdir / "hosts" / MIRRORED
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(f'server = "https://{MIRRORED}"\n\n'
                                          f'[host."http://{self.registry.host}"]\n'
                                          f'  capabilities = ["pull", "resolve"]\n')
        self.snapshotter.extra_args += ("--hosts-dir", str(self.workdir / "hosts"))
        self.snapshotter.start()
        self.containerd = Containerd(self.workdir / "containerd", self.snapshotter.address,
                                     self.registry.host, aliases=(MIRRORED,))
        self.containerd.start()

    def stop(self) -> None:
        if self.containerd is not None:
            self.containerd.remove_all()
            self.containerd.stop()
        self.snapshotter.stop()
        self.snapshotter.stop_layer_daemons()
        self.registry.stop()
        unmount_below(self.workdir)

    def log(self) -> str:
        return self.snapshotter.log.read_text(errors="replace")

    def metrics(self) -> str:
        """The running snapshotter's /metrics (its address is in its log)."""
        (url, *_rest) = re.findall(r"metrics at (http://\S+/metrics)", self.log())[::-1]
        return httpx.get(url, timeout=10).text


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    _prerequisites()
    node = Node(tmp_path_factory.mktemp("node"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> RunImage:
    rootfs = _prerequisites()
    return build_run_image(tmp_path_factory.mktemp("images") / "layout", rootfs)


def _push(node: Node, image: RunImage, repo: str) -> str:
    ref = f"{node.registry.host}/{repo}:1"
    push_image(image.ref(), ref, all_platforms=False)
    return ref


@pytest.fixture(scope="module")
def indexed(node: Node, debian: RunImage, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image pushed, then indexed and its index pushed as CI would; its REF."""
    ref = _push(node, debian, "lab/lazy")
    proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", "index", ref, "--all-layers",
                           "--min-layer-size", "0", "--push", "-o",
                           str(tmp_path_factory.mktemp("ci") / "index"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    return str(summary.get("pull_ref") or ref)


def _run(node: Node, ref: str, name: str, *argv: str) -> str:
    return node.ctrd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, ref, name, *argv).stdout


def _labels(node: Node, chain: str) -> dict[str, str]:
    info = json.loads(node.ctrd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info",
                                    chain).stdout)
    return dict(info.get("Labels") or {})


def _same_tree_as_overlayfs(node: Node, ref: str, top_chain: str, workdir: Path,
                            name: str) -> None:
    """The container's root tree (a view of the top layer) equals the overlayfs
    snapshotter's for the same image (containerd pulls it whole for that one)."""
    node.ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    ours, theirs = workdir / "ours", workdir / "theirs"
    try:
        mount_view(node.ctrd, SNAPSHOTTER, f"{name}-ours", top_chain, ours)
        mount_view(node.ctrd, "overlayfs", f"{name}-theirs", top_chain, theirs)
        expected = tree_view(theirs)
        assert len(expected) > 5000  # a whole Debian root filesystem
        assert tree_view(ours) == expected
    finally:
        for path in (ours, theirs):
            subprocess.run(["umount", "-R", str(path)], capture_output=True)
        node.ctrd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", f"{name}-ours",
                      check=False)
        node.ctrd.ctr("snapshots", "--snapshotter", "overlayfs", "rm", f"{name}-theirs",
                      check=False)


def _check_deletions(node: Node, ref: str, name: str) -> None:
    out = _run(node, ref, name, "/bin/sh", "-c",
               f"ls -A /{OPAQUE_DIR}; for p in {' '.join(DELETED)}; do test -e /$p && echo $p; "
               "done; cat /etc/debian_version")
    assert out.splitlines()[0] == "only-this" and len(out.splitlines()) == 2, out


def test_indexed_layers_are_prepared_remotely(node: Node, debian: RunImage, indexed: str,
                                              tmp_path: Path) -> None:
    since = len(node.registry.log_lines())
    assert node.ctrd.cri_pull(indexed).startswith("sha256:")
    chains = chain_ids(debian.diff_ids)
    for chain in chains:  # every layer is a remote snapshot
        labels = _labels(node, chain)
        assert labels.get("containerd.io/snapshot/remote") == "remote snapshot", labels
        # pulled by pull_ref: the index is bound to the image, so nothing is restricted
        assert "containerd.io/snapshot/hybrid-erofs.restricted" not in labels, labels
    assert "mounted lazily as" in node.log() and "fallback" not in node.log()
    # bound: each layer's index is fetched by the digests its labels name, no referrers lookup
    assert node.log().count("/manifests/sha256-") == 0
    assert "hybrid_erofs_snapshotter_layers_lazy_total 2.0" in node.metrics()
    assert _run(node, indexed, "lazy-cat", "/bin/cat", "/etc/hybrid-erofs-test") == \
        MARKER.decode()
    # the pull and a container's run fetched no layer whole (the registry's log): ranges only,
    # and only part of the big layer (its tree is in the meta: listing needs no layer data)
    gets = {digest: node.registry.blob_gets(digest, since=since)
            for digest in debian.layer_digests}
    assert all(status == 206 for found in gets.values() for status, _ in found), gets
    assert any(gets.values()), gets
    big = debian.layer_digests[0]
    size = (debian.layout / "blobs" / "sha256" / big.removeprefix("sha256:")).stat().st_size
    assert sum(length for _, length in gets[big]) < size // 4, (gets[big], size)
    _check_deletions(node, indexed, "lazy-ls")
    _same_tree_as_overlayfs(node, indexed, chains[-1], tmp_path, "lazy")


def test_image_without_index_runs_through_the_fallback(node: Node, debian: RunImage,
                                                       tmp_path: Path) -> None:
    """No hybrid-erofs index: containerd downloads and applies every layer into ordinary
    snapshots of ours (the fallback, logged), and the container runs. (A base layer below
    the rootfs makes every chain ID differ from the indexed image's.)"""
    base = _tar([_entry("base-layer", b"another image\n")])
    plain = build_run_image(debian.layout, Path(os.environ["HYBRID_EROFS_ROOTFS_TAR"]),
                            tag="plain", base_layers=(base,))
    ref = _push(node, plain, "lab/plain")
    since, fallbacks = len(node.registry.log_lines()), node.log().count("(fallback, no-index)")
    assert node.ctrd.cri_pull(ref).startswith("sha256:")
    chains = chain_ids(plain.diff_ids)
    for chain in chains:
        assert "containerd.io/snapshot/remote" not in _labels(node, chain)
    assert node.log().count("(fallback, no-index)") == fallbacks + len(chains)
    assert re.search(r'hybrid_erofs_snapshotter_fallbacks_total\{reason="no-index"\} '
                     rf"{fallbacks + len(chains)}\.0", node.metrics())
    # applied by containerd: the new base layer's blob was fetched whole (the others were in
    # its content store already, from the overlayfs pull of the previous test)
    base_blob = plain.layout / "blobs" / "sha256" / plain.layer_digests[0].removeprefix("sha256:")
    assert node.registry.blob_gets(plain.layer_digests[0], since=since) == [
        (200, base_blob.stat().st_size)]
    assert _run(node, ref, "plain-cat", "/bin/cat", "/etc/hybrid-erofs-test") == MARKER.decode()
    _check_deletions(node, ref, "plain-ls")
    _same_tree_as_overlayfs(node, ref, chains[-1], tmp_path, "plain")
    del debian


def test_zstd_layer_falls_back_and_the_gzip_ones_stay_lazy(
        node: Node, debian: RunImage, tmp_path: Path) -> None:
    """One image, gzip layers indexed and a zstd layer that cannot be: the gzip layers are
    mounted lazily, the zstd one is applied by containerd (fallback `unsupported`), and the
    container sees all of them."""
    base = _tar([_entry("zstd-image", b"base of the zstd image\n")])
    top = _tar([_entry("etc/", kind=tarfile.DIRTYPE, mode=0o755),
                _entry("etc/from-zstd", b"a zstd layer\n")])
    image = build_run_image(debian.layout, Path(os.environ["HYBRID_EROFS_ROOTFS_TAR"]),
                            tag="zstd", base_layers=(base,), zstd_layers=(top,))
    ref = _push(node, image, "lab/zstd")
    proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", "index", ref, "--all-layers",
                           "--min-layer-size", "0", "--push", "-o", str(tmp_path / "index")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lazy, unsupported = node.log().count("mounted lazily as"), node.log().count("unsupported)")
    node.ctrd.cri_pull(ref)
    chains = chain_ids(image.diff_ids)
    remote = ["containerd.io/snapshot/remote" in _labels(node, chain) for chain in chains]
    assert remote == [True, True, True, False]
    assert node.log().count("mounted lazily as") == lazy + 3
    assert node.log().count("(fallback, unsupported)") == unsupported + 1
    out = _run(node, ref, "zstd-cat", "/bin/cat", "/etc/from-zstd", "/zstd-image",
               "/etc/hybrid-erofs-test")
    assert out == "a zstd layer\nbase of the zstd image\n" + MARKER.decode()


def test_a_mirror_from_hosts_toml_serves_index_and_layers(
        node: Node, debian: RunImage, tmp_path: Path) -> None:
    """The image is pulled as registry.invalid/..., a name only hosts.toml (ours) and CRI's
    mirror table (containerd's) map to the plain-HTTP registry: its layers are lazy."""
    base = _tar([_entry("mirror-image", b"pulled through a mirror\n")])
    image = build_run_image(debian.layout, Path(os.environ["HYBRID_EROFS_ROOTFS_TAR"]),
                            tag="mirror", base_layers=(base,))
    real = _push(node, image, "lab/mirror")
    proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", "index", real, "--all-layers",
                           "--min-layer-size", "0", "--push", "-o", str(tmp_path / "index")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lazy = node.log().count("mounted lazily as")
    ref = f"{MIRRORED}/lab/mirror:1"
    node.ctrd.cri_pull(ref)
    assert node.log().count("mounted lazily as") == lazy + 3
    for chain in chain_ids(image.diff_ids):
        assert "containerd.io/snapshot/remote" in _labels(node, chain)
    assert _run(node, ref, "mirror-cat", "/bin/cat", "/mirror-image") == \
        "pulled through a mirror\n"


def test_containers_survive_a_snapshotter_restart(node: Node, debian: RunImage,
                                                  indexed: str) -> None:
    """kill -9 of the snapshotter while a container runs: the layer daemons live on (their
    own sessions), so the container keeps reading files never read before; a new snapshotter
    restores its view and new containers start."""
    node.ctrd.cri_pull(indexed)
    node.ctrd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, indexed, "survivor", "/bin/sleep",
                  "600")
    try:
        node.snapshotter.stop(kill=True)
        _evict(node, "usr/bin/dpkg")  # earlier tests read it: make the next read reach a daemon
        served = _bytes_served(node)
        proc = node.ctrd.ctr("tasks", "exec", "--exec-id", "r1", "survivor", "/bin/sh", "-c",
                             "sha256sum /usr/bin/dpkg | cut -c1-64")
        assert proc.stdout.strip() == _sha256_in_layer(debian, "usr/bin/dpkg")
        deadline = time.monotonic() + 20  # the daemons write their stats every 2 s
        while _bytes_served(node) <= served:
            assert time.monotonic() < deadline, "no layer daemon served the read"
            time.sleep(0.5)
        node.snapshotter.start()
        node.ctrd.wait_for_snapshotter()
        assert _run(node, indexed, "after-restart", "/bin/cat", "/etc/hybrid-erofs-test") == \
            MARKER.decode()
        proc = node.ctrd.ctr("tasks", "exec", "--exec-id", "r2", "survivor", "/bin/cat",
                             "/etc/hybrid-erofs-test")
        assert proc.stdout == MARKER.decode()
    finally:
        node.ctrd.remove_container("survivor")


def _status(node: Node) -> list[dict[str, Any]]:
    env = {**os.environ, **node.snapshotter.env}
    proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", "status", "--json"],
                          capture_output=True, text=True, env=env, check=True)
    found: list[dict[str, Any]] = json.loads(proc.stdout)
    return found


def _bytes_served(node: Node) -> int:
    return sum(int(entry["stats"].get("bytes_served") or 0) for entry in _status(node))


def _evict(node: Node, name: str) -> None:
    """Drop the page cache of `name` in every layer mount and of the daemons' FUSE disk
    files (posix_fadvise DONTNEED: this file only, not the machine's whole cache)."""
    paths = [Path(entry["mountpoint"]) / name for entry in _status(node)]
    for dirpath, _dirs, files in os.walk(node.workdir / "runtime"):  # errors (dead FUSE) skipped
        paths += [Path(dirpath, f) for f in files if f == "disk.img"]
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # a dead daemon's file: nothing cached can be read through it anyway
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sha256_in_layer(image: RunImage, name: str) -> str:
    rootfs = Path(os.environ["HYBRID_EROFS_ROOTFS_TAR"])
    with tarfile.open(rootfs) as tar:
        member = tar.extractfile(f"./{name}")
        assert member is not None
        return hashlib.sha256(member.read()).hexdigest()


def test_a_dead_layer_daemon_is_mounted_again_for_new_containers(node: Node, debian: RunImage,
                                                                 indexed: str) -> None:
    """kill -9 of a layer's mount daemon: a running container's reads of data not in the
    page cache fail with EIO (FUSE cannot resume; docs/containerd.md says so), and the next
    container's Prepare mounts the layer again, so new containers start."""
    node.ctrd.cri_pull(indexed)
    node.ctrd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, indexed, "orphan", "/bin/sleep",
                  "600")
    try:
        ours = [entry for entry in _status(node) if "/lab/lazy@" in entry["source"]]
        assert len(ours) == len(debian.layer_digests)
        for entry in ours:
            os.kill(entry["daemon_pid"], signal.SIGKILL)
        _evict(node, "usr/bin/apt")
        proc = node.ctrd.ctr("tasks", "exec", "--exec-id", "r1", "orphan", "/bin/cat",
                             "/usr/bin/apt", check=False)
        assert proc.returncode != 0, "read a file whose layer daemon is dead"
        assert _run(node, indexed, "new-after-death", "/bin/cat",
                    "/etc/hybrid-erofs-test") == MARKER.decode()
        assert "its mount daemon is gone; mounting it again" in node.log()
        assert all(entry["daemon_alive"] for entry in _status(node)
                   if "/lab/lazy@" in entry["source"]), _status(node)
    finally:
        node.ctrd.remove_container("orphan")


# -- prefetch profiles (issue 17) -----------------------------------------------------------------

# What the profiled container does: read perl's binary (and, as containerd does for every
# container, /etc/passwd and /etc/group). The profile records the same command.
PROFILED = "sha256sum /usr/bin/perl && cat /etc/passwd /etc/group >/dev/null"


def _daemon_argv(entry: dict[str, Any]) -> list[str]:
    return Path(f"/proc/{entry['daemon_pid']}/cmdline").read_text().split("\0")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "hybrid_erofs", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _span_sizes(zinfo: Path, blob_size: int) -> list[int]:
    from hybrid_erofs.gzindex.format import parse_index

    checkpoints = parse_index(zinfo.read_bytes(), name="zinfo", blob_size=blob_size).checkpoints
    ends = [cp.in_offset for cp in checkpoints[1:]] + [blob_size]
    return [end - cp.in_offset for cp, end in zip(checkpoints, ends, strict=True)]


def _blob_bytes(node: Node, digest: str, since: int) -> int:
    return sum(length for _status, length in node.registry.blob_gets(digest, since=since))


@pytest.fixture(scope="module")
def profiled_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node of its own (a cold chunk cache) whose layers fetch nothing in the background
    for 10 minutes: what its mounts fetch is the profile's and the reads'."""
    _prerequisites()
    node = Node(tmp_path_factory.mktemp("profiled"), extra_args=("--fetch-delay", "600"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


def test_a_bound_profile_is_fetched_at_prepare_and_an_unbound_one_is_not_used(
        profiled_node: Node, debian: RunImage, tmp_path: Path) -> None:
    node = profiled_node
    ref = _push(node, debian, "lab/profiled")
    index_dir = tmp_path / "index"
    _cli("index", ref, "--all-layers", "--min-layer-size", "0", "--push", "-o", str(index_dir))
    _cli("profile", ref, "--index-dir", str(index_dir), "--cache-dir", str(tmp_path / "cache"),
         "--", "sh", "-c", f'chroot "$ROOTFS" /bin/sh -c "{PROFILED}" >/dev/null')
    summary = json.loads(_cli("index", ref, "--all-layers", "--min-layer-size", "0", "--push",
                              "-o", str(index_dir), "--json").stdout)
    pull_ref = str(summary["pull_ref"])  # the image again, its index and profile bound in
    big = debian.layer_digests[0]
    hex_ = big.removeprefix("sha256:")
    profile = json.loads((index_dir / f"sha256-{hex_}.prefetch.json").read_text())
    blob_size = (debian.layout / "blobs" / "sha256" / hex_).stat().st_size
    sizes = _span_sizes(index_dir / f"sha256-{hex_}.zinfo", blob_size)
    spans = profile["spans"]
    assert 1 <= len(spans) < len(sizes) // 2, spans
    profile_bytes = sum(sizes[n] for n in spans)
    chains = chain_ids(debian.diff_ids)

    # pull_ref: the profile arrives as a label of the layer and is fetched by digest; the
    # mount fetches its spans at Prepare, before any container reads.
    since = len(node.registry.log_lines())
    node.ctrd.cri_pull(pull_ref)
    labels = _labels(node, chains[0])
    assert labels["containerd.io/snapshot/hybrid-erofs/prefetch.digest"].startswith("sha256:")
    assert "containerd.io/snapshot/hybrid-erofs.restricted" not in labels
    [entry] = [e for e in _status(node) if "/lab/profiled@" in e["source"]
               and big in _daemon_argv(e)]
    assert "--_prefetch" in _daemon_argv(entry)
    assert "--_profile-zinfo" in _daemon_argv(entry)  # its zinfo comes after the spans
    # the snapshotter's warm-up fetches the spans; the daemon decodes them as they arrive
    assert "--_follow-warmup" in _daemon_argv(entry)
    deadline = time.monotonic() + 120
    while True:
        [entry] = [e for e in _status(node) if e["daemon_pid"] == entry["daemon_pid"]]
        fetch = fetch_status(entry["stats"]["layers"][0]) or {}
        if fetch.get("state") == "waiting" and fetch["spans_local"] >= len(spans):
            break
        assert time.monotonic() < deadline, fetch
        time.sleep(0.5)
    # the registry's request log: the profile's spans (at least their compressed bytes) were
    # asked for during the pull, before the container ran ...
    assert _blob_bytes(node, big, since) >= profile_bytes
    before_run = len(node.registry.log_lines())
    out = _run(node, pull_ref, "profiled", "/bin/sh", "-c", PROFILED)
    assert out.split()[0] == _sha256_in_layer(debian, "usr/bin/perl")
    # ... and the container's reads of the big layer needed no request at all
    assert node.registry.blob_gets(big, since=before_run) == []
    node.ctrd.remove_all()  # containerd's GC removes the snapshots: the layers go
    deadline = time.monotonic() + 60
    while any("/lab/profiled@" in e["source"] for e in _status(node)):
        assert time.monotonic() < deadline, _status(node)
        time.sleep(0.5)

    # Then the tag: its index (and the profile in it) is found through the referrers, unbound.
    # The layers are mounted (nosuid,nodev) but the profile is not used.
    node.ctrd.cri_pull(ref)
    assert "hybrid-erofs.restricted" in json.dumps(_labels(node, chains[0]))
    unbound = [e for e in _status(node) if "/lab/profiled@" in e["source"]]
    assert len(unbound) == len(debian.layer_digests)
    # (no byte count here: an unbound index is verified by reading the whole blob at once)
    assert not any("--_prefetch" in _daemon_argv(e) or "--_follow-warmup" in _daemon_argv(e)
                   for e in unbound)
