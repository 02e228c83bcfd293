"""A profiled layer mounted before its zinfo is here (gzindex/lazy.py), against Debian's
docker-registry and the kernel's EROFS over FUSE: the node fetches the bound profile zinfo
instead of the zinfo, reads of the profile's files need nothing more, the zinfo comes after
the profile's spans (the registry's request log), a read outside the profile gets right bytes,
a tampered zinfo fails the layer with EIO and says so, a profile zinfo that is not bound
with its profile is not used, and an image published before profile zinfos mounts as before.
"""

from __future__ import annotations

import errno
import gzip
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
