"""A profiled layer mounted before its zinfo is here (gzindex/lazy.py), against Debian's
docker-registry and the kernel's EROFS over FUSE: the node fetches the bound profile zinfo
instead of the zinfo, reads of the profile's files need nothing more, the zinfo comes after
the profile's spans (the registry's request log), a read outside the profile gets right bytes,
a tampered zinfo fails the layer with EIO and says so, a profile zinfo that is not bound
with its profile is not used, and an image published before profile zinfos mounts as before.
A daemon killed (SIGKILL) before the zinfo came is restored lazily by `mount --reattach` and
the snapshotter's restore (every file compared with the layer's tar), using cached index files
only with their bound digests.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.device import RegistryOptions
from hybrid_erofs.fetching.background import FetchPolicy, fetch_status
from hybrid_erofs.gzindex.format import parse_index
from hybrid_erofs.mounting.discovery import resolve_layer_index
from hybrid_erofs.oci.client import RegistryClient
from hybrid_erofs.oci.reference import parse_reference
from hybrid_erofs.snapshotter.remote import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
    DiscoveryFinder,
    LayerRequest,
    LazyLayers,
    TrustPolicy,
)
from hybrid_erofs.sources.cachedir import decoded_files
from hybrid_erofs.trust.bound import (
    PREFETCH_DIGEST,
    PREFETCH_SIZE,
    PREFETCH_ZINFO_DIGEST,
    PREFIX,
)
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for
from tests.registry_rig import Rig

pytestmark = [pytest.mark.integration, pytest.mark.root]

CLI = [sys.executable, "-m", "hybrid_erofs"]
REPO = "lab/lazyzinfo"
# The profile: the small file and 8 KiB from the middle of the big one (64 KiB spans).
COMMAND = ["sh", "-c", 'cat "$ROOTFS/etc/hello.txt" >/dev/null && dd status=none '
           'if="$ROOTFS/data/random.bin" bs=4096 skip=400 count=2 of=/dev/null']


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def published(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The rig's amd64 image in a repository of its own, indexed (64 KiB spans), profiled
    and published bound (profile and profile zinfo in the manifest's annotations)."""
    require_fuse_and_erofs()
    host = rig.hosts["plain"]
    ref = f"{host}/{REPO}:1"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{rig.workdir / 'layout'}:amd64", f"docker://{ref}"], check=True,
                   capture_output=True)
    index_dir = tmp_path_factory.mktemp("lazy-index")
    common = ["--all-layers", "--min-layer-size", "0", "--span", "64KiB", "-o", str(index_dir)]
    _cli("index", ref, *common)
    _cli("profile", ref, "--index-dir", str(index_dir), "--cache-dir",
         str(tmp_path_factory.mktemp("lazy-profile-cache")), "--", *COMMAND)
    summary = json.loads(_cli("index", ref, *common, "--push", "--json").stdout)
    pull_ref = str(summary["pull_ref"])
    [layer] = json.loads((index_dir / "index.json").read_text())["images"][0]["layers"]
    files = layer["files"]
    assert set(files) == {"zinfo", "sidecar", "meta", "prefetch", "prefetch_zinfo"}
    profile = json.loads((index_dir / files["prefetch"]["name"]).read_text())
    times = profile["first_read_ms"]  # when each span was first read, first read first
    assert len(times) == len(profile["spans"]) and times[0] == 0 and times == sorted(times)
    manifest_digest = pull_ref.rsplit("@", 1)[1]
    with RegistryClient(parse_reference(pull_ref)) as client:
        manifest = client.get_manifest(manifest_digest, expected_digest=manifest_digest)
        original = client.get_manifest("1").digest  # the tag: its index only attached
    [descriptor] = manifest.data["layers"]
    annotations = dict(descriptor["annotations"])
    assert annotations[PREFETCH_ZINFO_DIGEST] == files["prefetch_zinfo"]["digest"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(rig.images["amd64"].layer))) as tar:
        contents = {name: tar.extractfile(name).read()  # type: ignore[union-attr]
                    for name in ("etc/hello.txt", "data/random.bin")}
    return {"ref": ref, "manifest": manifest_digest, "original": original,
            "blob": descriptor["digest"],
            "annotations": annotations, "spans": profile["spans"], "files": files,
            "contents": contents, "log": rig.workdir / "registry-plain.log", "rig": rig}


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The daemons' runtime directory of this test (they inherit the environment)."""
    directory = tmp_path / "run"
    monkeypatch.setenv("HYBRID_EROFS_RUNTIME_DIR", str(directory))
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(directory)}
    yield env
    for pid in daemons_for(directory):  # a failed test must not leave its daemon
        subprocess.run([*CLI, "status", "--prune"], env=env, capture_output=True)
        os.kill(pid, 9)


def _request(published: dict[str, Any], annotations: dict[str, str]) -> LayerRequest:
    labels = {key: value for key, value in annotations.items() if key.startswith(PREFIX)}
    labels.update({LABEL_SNAPSHOT_REF: "chain", LABEL_IMAGE_REF: published["ref"],
                   LABEL_MANIFEST_DIGEST: published["manifest"],
                   LABEL_LAYER_DIGEST: published["blob"]})
    return LayerRequest.from_labels(labels)


def _layers(tmp_path: Path) -> LazyLayers:
    # no background fetch beyond the profile for 10 minutes: what comes is the profile's
    # spans, the zinfo after them, and what reads need
    return LazyLayers(registry=RegistryOptions(cache_dir=tmp_path / "cache"),
                      policy=TrustPolicy(), via="fuse", fetch=FetchPolicy(delay_s=600))


def _blob_gets(log: Path, since: int) -> list[str]:
    """Digests of the blob GETs in the registry's access log from line `since` on, in order."""
    found = []
    for line in log.read_text(errors="replace").splitlines()[since:]:
        match = re.search(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP', line)
        if match:
            found.append(match[1])
    return found


def _lines(log: Path) -> int:
    return len(log.read_text(errors="replace").splitlines())


def _status(env: dict[str, str]) -> dict[str, Any]:
    [entry] = json.loads(_cli("status", "--json", env=env).stdout)
    return dict(entry)


def _wait_fetch(env: dict[str, str], done: Any, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        entry = _status(env)
        fetch = fetch_status(entry["stats"]["layers"][0]) or {}
        if done(entry, fetch):
            return entry
        assert time.monotonic() < deadline, (fetch, Path(entry["log_file"]).read_text()[-3000:])
        time.sleep(0.2)


def test_a_profiled_layer_starts_on_its_profile_zinfo_and_fetches_the_zinfo_later(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    since = _lines(published["log"])
    layer = layers.mount(_request(published, published["annotations"]), mnt)
    try:
        assert layer.later is not None and layer.prefetch is not None
        zinfo = Path(layer.zinfo)
        argv = Path(f"/proc/{_status(runtime)['daemon_pid']}/cmdline").read_text().split("\0")
        assert "--_profile-zinfo" in argv
        entry = _wait_fetch(runtime, lambda entry, fetch: fetch.get("state") == "waiting"
                            and fetch["spans_local"] >= len(published["spans"]))
        # the profile's files: read without the zinfo
        contents = published["contents"]
        assert (mnt / "etc/hello.txt").read_bytes() == contents["etc/hello.txt"]
        with open(mnt / "data/random.bin", "rb") as handle:
            handle.seek(400 * 4096)
            assert handle.read(8192) == contents["data/random.bin"][400 * 4096:402 * 4096]
        assert not zinfo.exists()
        profiled = _blob_gets(published["log"], since)
        # a read outside the profile: waits for the zinfo, right bytes
        assert (mnt / "data/random.bin").read_bytes() == contents["data/random.bin"]
        assert zinfo.is_file()
        assert "the full zinfo is here" in Path(entry["log_file"]).read_text()
        assert _status(runtime)["stats"]["trust"]["state"] != "failed"
        # the registry's request log: the profile zinfo before any span, the zinfo's blob
        # once, after every profile span (the warm-up's and the daemon's requests of them)
        gets = _blob_gets(published["log"], since)
        files = published["files"]
        index_blobs = [d for d in gets if d not in (published["blob"], files["sidecar"]["digest"],
                                                    files["prefetch"]["digest"])]
        assert len(index_blobs) == 3, gets  # meta, profile zinfo, zinfo (as gzip blobs)
        assert index_blobs[2] not in profiled and published["blob"] in profiled, profiled
        first_span = gets.index(published["blob"])
        assert all(gets.index(d) < first_span for d in index_blobs[:2]), gets
        assert gets.index(index_blobs[2]) >= len(profiled), gets
    finally:
        layers.unmount(layer, mnt)


def test_the_background_fetch_completes_and_verifies_a_profiled_layer(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    layers = LazyLayers(registry=RegistryOptions(cache_dir=tmp_path / "cache"),
                        policy=TrustPolicy(), via="fuse", fetch=FetchPolicy(delay_s=0.5))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer = layers.mount(_request(published, published["annotations"]), mnt)
    try:
        assert layer.later is not None
        _wait_fetch(runtime, lambda entry, fetch: fetch.get("state") == "verified")
        assert Path(layer.zinfo).is_file()
        assert (mnt / "data/random.bin").read_bytes() == published["contents"]["data/random.bin"]
    finally:
        layers.unmount(layer, mnt)


def _decoded(cache: Path) -> list[str]:
    """The layer stores' data files in a cache (one per blob and index)."""
    return [name for blob in cache.glob("chunks-v1/sha256/*") for name in decoded_files(blob)]


def test_a_profiled_layer_mounted_again_through_its_zinfo_decodes_nothing_again(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    """Started on its profile zinfo, fetched and verified in the background, unmounted, and
    mounted again with its zinfo here (a remount, a snapshotter's restore): the layer store
    the first mount filled is the zinfo's by then, so no span is decoded again, the kernel
    reads the stored layer itself (`via local`) and the layer is on disk once."""
    layers = LazyLayers(registry=RegistryOptions(cache_dir=tmp_path / "cache"),
                        policy=TrustPolicy(), via="fuse", fetch=FetchPolicy(delay_s=0.5))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    request = _request(published, published["annotations"])
    layer = layers.mount(request, mnt)
    try:
        assert layer.later is not None
        _wait_fetch(runtime, lambda entry, fetch: fetch.get("state") == "verified")
    finally:
        layers.unmount(layer, mnt)
    [store] = _decoded(tmp_path / "cache")
    again = layers.mount(request, mnt)
    try:
        assert again.later is None  # the zinfo is here now
        entry = _wait_fetch(runtime, lambda entry, fetch: fetch.get("state") == "verified",
                            timeout_s=20)
        assert entry["via"] == "local", Path(entry["log_file"]).read_text()[-3000:]
        assert (mnt / "data/random.bin").read_bytes() == published["contents"]["data/random.bin"]
        assert _status(runtime)["stats"]["layers"][0]["spans_decoded"] == 0
    finally:
        layers.unmount(again, mnt)
    assert _decoded(tmp_path / "cache") == [store]


def test_a_read_outside_the_profile_waits_for_the_zinfo(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    """A read outside the profile right after the mount (the profile's spans still coming
    in) fetches the zinfo itself, waits for it, and gets right bytes."""
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer = layers.mount(_request(published, published["annotations"]), mnt)
    try:
        data = (mnt / "data/random.bin").read_bytes()  # most of it is outside the profile
        assert data == published["contents"]["data/random.bin"]
        assert Path(layer.zinfo).is_file()
    finally:
        layers.unmount(layer, mnt)


def test_a_tampered_zinfo_fails_the_layer_with_eio(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    rig: Rig = published["rig"]
    transit = published["annotations"][PREFIX + "zinfo.gzip.digest"]
    stored = rig.blob_path("plain", transit)
    original = stored.read_bytes()
    forged = bytearray(original)
    forged[len(forged) // 2] ^= 0xFF
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    stored.write_bytes(bytes(forged))
    try:
        layer = layers.mount(_request(published, published["annotations"]), mnt)
        try:
            # a read outside the profile needs the zinfo: it comes tampered
            with pytest.raises(OSError) as failed:
                (mnt / "data/random.bin").read_bytes()
            assert failed.value.errno == errno.EIO
            entry = _wait_fetch(runtime, lambda entry, fetch: (
                entry["stats"].get("trust") or {}).get("state") == "failed")
            state = entry["stats"]["trust"]
            assert "the full zinfo is refused" in state["detail"], state
            assert "digest mismatch" in state["detail"], state
            assert not Path(layer.zinfo).exists()
            # the profile's spans stored through the profile zinfo: removed, not the zinfo's
            assert _decoded(tmp_path / "cache") == []
            for name in ("etc/hello.txt", "data/random.bin"):  # every read fails from now on
                with pytest.raises(OSError) as failed:
                    (mnt / name).read_bytes()
                assert failed.value.errno == errno.EIO
        finally:
            layers.unmount(layer, mnt)
    finally:
        stored.write_bytes(original)


def test_a_profile_zinfo_is_used_only_when_bound_with_its_profile(
        published: dict[str, Any], tmp_path: Path) -> None:
    annotations = published["annotations"]
    options = RegistryOptions(cache_dir=tmp_path / "cache")
    repository = published["ref"].rsplit(":", 1)[0]

    def resolve(labels: dict[str, str], cache: str) -> Any:
        return resolve_layer_index(repository, published["manifest"], published["blob"],
                                   labels, registry=replace(options,
                                                            cache_dir=tmp_path / cache))

    bound = resolve(annotations, "a")
    assert bound.later is not None and not bound.zinfo.exists()
    assert bound.later.profile_zinfo.is_file()
    # the profile zinfo without its profile (a profile not bound: bound, or not used)
    alone = {k: v for k, v in annotations.items() if k not in (PREFETCH_DIGEST, PREFETCH_SIZE)}
    found = resolve(alone, "b")
    assert found.later is None and found.prefetch is None and found.zinfo.is_file()
    assert not list((tmp_path / "b").rglob("prefetch-zinfo-*"))
    # the index found through the referrers (unbound): its profile and profile zinfo are
    # listed in the artifact, and neither is used
    request = replace(_request(published, {}), manifest_digest=published["original"])
    unbound = DiscoveryFinder(replace(options, cache_dir=tmp_path / "c")).find(request)
    assert not unbound.bound and unbound.later is None and unbound.prefetch is None
    assert unbound.zinfo.is_file()


def test_an_image_published_before_profile_zinfos_mounts_as_before(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    old = {k: v for k, v in published["annotations"].items()
           if not k.startswith(PREFIX + "prefetch.zinfo.")}
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer = layers.mount(_request(published, old), mnt)
    try:
        assert layer.later is None and layer.prefetch is not None
        assert Path(layer.zinfo).is_file()
        assert (mnt / "data/random.bin").read_bytes() == published["contents"]["data/random.bin"]
    finally:
        layers.unmount(layer, mnt)


def test_mount_ref_fetches_the_profile_its_image_binds_first(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    """`mount REF` (one layer, its index found in the registry) uses the prefetch profile the
    image binds, as mount-image and the snapshotter do: the profile's spans come in before any
    read while the rest waits for its quiet period; the tag, whose index is only attached, gets
    no profile."""
    repository = published["ref"].rsplit(":", 1)[0]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    since = _lines(published["log"])
    _cli("mount", "--via", "fuse", "--fetch-delay", "600", "--cache-dir", str(tmp_path / "c"),
         f"{repository}@{published['manifest']}", str(mnt), env=runtime)
    try:
        entry = _wait_fetch(runtime, lambda entry, fetch: fetch.get("spans_local", 0)
                            >= len(published["spans"]))
        assert "--_prefetch" in _daemon_argv(runtime)
        fetch = fetch_status(entry["stats"]["layers"][0]) or {}
        assert fetch["state"] == "waiting"  # the rest waits: only the profile came
        assert fetch["spans_local"] == len(published["spans"])
        assert _blob_gets(published["log"], since)  # fetched before any read of the tree
        assert (mnt / "data/random.bin").read_bytes() == published["contents"]["data/random.bin"]
    finally:
        _cli("umount", str(mnt), env=runtime)


# -- a daemon that died before the zinfo came: `mount --reattach` ------------------------------

def _layer_tree(published: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The oracle: every entry of the layer's tar (and the directories its names imply),
    name -> (kind, sha256 of the contents or the link target)."""
    rig: Rig = published["rig"]
    tree: dict[str, tuple[str, str]] = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(rig.images["amd64"].layer))) as tar:
        for member in tar:
            name = member.name.strip("/").removeprefix("./")
            parts = name.split("/")
            for depth in range(1, len(parts)):
                tree.setdefault("/".join(parts[:depth]), ("dir", ""))
            if member.isfile():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                tree[name] = ("file", hashlib.sha256(data).hexdigest())
            elif member.issym():
                tree[name] = ("symlink", member.linkname)
            elif member.isdir():
                tree[name] = ("dir", "")
    assert sum(kind == "file" for kind, _ in tree.values()) >= 2
    return tree


def _mounted_tree(mnt: Path) -> dict[str, tuple[str, str]]:
    """What the mount shows, as _layer_tree has it (every file read in full)."""
    tree: dict[str, tuple[str, str]] = {}
    for directory, dirs, files in os.walk(mnt):
        for name in dirs + files:
            path = Path(directory) / name
            relative = str(path.relative_to(mnt))
            if path.is_symlink():
                tree[relative] = ("symlink", os.readlink(path))
            elif path.is_dir():
                tree[relative] = ("dir", "")
            else:
                tree[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return tree


def _kill_daemon(env: dict[str, str]) -> int:
    """SIGKILL the mount's daemon, by the pid its state record names; wait until it is gone."""
    pid = int(_status(env)["daemon_pid"])
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "zombie" not in Path(
            f"/proc/{pid}/status").read_text(errors="replace").lower():
        assert time.monotonic() < deadline, f"daemon {pid} did not die"
        time.sleep(0.05)
    return pid


def _daemon_argv(env: dict[str, str]) -> list[str]:
    return Path(f"/proc/{_status(env)['daemon_pid']}/cmdline").read_text().split("\0")


@pytest.fixture
def killed(published: dict[str, Any], tmp_path: Path,
           runtime: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A profiled layer mounted as the snapshotter does (on its profile zinfo, its daemon
    following the image's warm-up), whose daemon got SIGKILL once the profile's spans were in
    and before the zinfo came (no background fetch beyond the profile for 10 minutes)."""
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer = layers.mount(_request(published, published["annotations"]), mnt)
    try:
        assert layer.later is not None
        assert "--_follow-warmup" in _daemon_argv(runtime)  # followed the snapshotter's warm-up
        entry = _wait_fetch(runtime, lambda entry, fetch: fetch.get("state") == "waiting"
                            and fetch["spans_local"] >= len(published["spans"]))
        dead = _kill_daemon(runtime)
        assert not Path(layer.zinfo).exists()
        yield {"layers": layers, "layer": layer, "mnt": mnt, "dead": dead,
               "zinfo": Path(layer.zinfo), "log": Path(entry["log_file"])}
    finally:
        layers.unmount(layer, mnt)


def _reattach(mnt: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([*CLI, "mount", "--reattach", str(mnt)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no warning, no traceback


@pytest.mark.parametrize("how", ["mount --reattach", "snapshotter restore"])
def test_a_layer_whose_daemon_died_before_its_zinfo_came_is_restored_lazily(
        published: dict[str, Any], killed: dict[str, Any], runtime: dict[str, str],
        how: str) -> None:
    """`mount --reattach` (and the snapshotter's restore) mounts the layer lazily again on
    the profile zinfo, without waiting for the warm-up that is gone, and every file reads
    back as the layer's tar has it: the new daemon fetches the zinfo by its bound digest,
    once, when reads need it."""
    mnt, zinfo = killed["mnt"], killed["zinfo"]
    since = _lines(published["log"])
    if how == "mount --reattach":
        _reattach(mnt, runtime)
    else:
        killed["layers"].restore(killed["layer"], mnt, {})
    entry = _status(runtime)
    assert entry["daemon_pid"] != killed["dead"] and entry["state"] == "mounted", entry
    argv = _daemon_argv(runtime)
    assert "--_profile-zinfo" in argv and "--_follow-warmup" not in argv, argv
    record = json.loads(Path(runtime["HYBRID_EROFS_RUNTIME_DIR"], "mounts",
                             Path(entry["log_file"]).name.removesuffix(".log") + ".json")
                        .read_text())
    assert "--_follow-warmup" not in record["fetch"] and record["later"], record
    # lazily again: the profile's files are read without the zinfo
    contents = published["contents"]
    assert (mnt / "etc/hello.txt").read_bytes() == contents["etc/hello.txt"]
    assert not zinfo.exists()
    # every file, compared with the layer's tar
    assert _mounted_tree(mnt) == _layer_tree(published)
    assert zinfo.is_file()
    zinfo_blob = published["annotations"][PREFIX + "zinfo.gzip.digest"]
    assert _blob_gets(published["log"], since).count(zinfo_blob) == 1
    assert _status(runtime)["stats"]["trust"]["state"] != "failed"


def test_a_reattach_uses_the_zinfo_that_came_before_the_daemon_died(
        published: dict[str, Any], tmp_path: Path, runtime: dict[str, str]) -> None:
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layer = layers.mount(_request(published, published["annotations"]), mnt)
    try:
        # a read outside the profile: the zinfo comes
        assert (mnt / "data/random.bin").read_bytes() == published["contents"]["data/random.bin"]
        assert Path(layer.zinfo).is_file()
        dead = _kill_daemon(runtime)
        since = _lines(published["log"])
        _reattach(mnt, runtime)
        entry = _status(runtime)
        assert entry["daemon_pid"] != dead and "--_follow-warmup" not in _daemon_argv(runtime)
        assert _mounted_tree(mnt) == _layer_tree(published)
        zinfo_blob = published["annotations"][PREFIX + "zinfo.gzip.digest"]
        assert zinfo_blob not in _blob_gets(published["log"], since)  # not fetched again
    finally:
        layers.unmount(layer, mnt)


@pytest.mark.parametrize("tampered", ["profile zinfo", "zinfo"])
def test_a_reattach_uses_only_index_files_with_their_bound_digests(
        published: dict[str, Any], killed: dict[str, Any], runtime: dict[str, str],
        tampered: str) -> None:
    """What the cache holds after the daemon died is checked as the first mount checked it:
    a profile zinfo that is not the bound one is not used (the zinfo is fetched first), a
    zinfo file that is not the one the sidecar names is fetched again; right bytes."""
    mnt, zinfo = killed["mnt"], killed["zinfo"]
    later = killed["layer"].later
    profile_zinfo = Path(str(later["profile_zinfo"]))
    good = profile_zinfo.read_bytes()
    if tampered == "profile zinfo":
        # a real window of one of the profile's spans, changed: it would decode wrong bytes
        index = parse_index(good, name="profile zinfo")
        window = next(cp.window for n, cp in enumerate(index.checkpoints)
                      if n in published["spans"] and cp.window.strip(b"\0"))
        at = good.index(window) + len(window) // 2
        forged = bytearray(good)
        forged[at] ^= 0xFF
        profile_zinfo.write_bytes(bytes(forged))
        said = "not the profile zinfo the image binds"
    else:
        # the profile zinfo's checkpoint table with zero windows, where the zinfo goes
        zinfo.write_bytes(good)
        said = "not the zinfo its sidecar names"
    try:
        _reattach(mnt, runtime)
        if tampered == "profile zinfo":
            assert zinfo.is_file()  # fetched first, before the mount answered
        assert _mounted_tree(mnt) == _layer_tree(published)
        assert hashlib.sha256(zinfo.read_bytes()).hexdigest() == str(
            later["plain"][1]).removeprefix("sha256:")
        assert said in Path(_status(runtime)["log_file"]).read_text()
        assert _status(runtime)["stats"]["trust"]["state"] != "failed"
    finally:
        profile_zinfo.write_bytes(good)
