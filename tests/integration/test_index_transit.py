"""Index files compressed in transit, against a real registry (distribution 2.8): `index --push`
publishes the zinfo and the meta as gzip blobs (bound by the image's annotations, listed by the
artifact), nodes keep them uncompressed; what the previous version published (plain blobs, no
gzip annotations) still mounts; a bound gzip blob that is a bomb, truncated or another file is
one clear error and the snapshotter falls back, as for any other bad index."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.device import RegistryOptions
from hybrid_erofs.errors import LayerFallback
from hybrid_erofs.indexing.imageindex import (
    INDEXED,
    META_GZIP_MEDIA_TYPE,
    ZINFO_GZIP_MEDIA_TYPE,
    ImageEntry,
    layer_file_names,
    load_image_index,
)
from hybrid_erofs.indexing.publish import _bound_manifest, artifact_files
from hybrid_erofs.mounting.discovery import _candidate, _manifest_entry, discover_image_plan
from hybrid_erofs.oci.artifact import ArtifactFile, find_artifacts, push_artifact
from hybrid_erofs.oci.client import Descriptor, RegistryClient
from hybrid_erofs.oci.image import inspect_manifest
from hybrid_erofs.oci.reference import parse_reference
from hybrid_erofs.snapshotter.remote import DiscoveryFinder, LayerRequest
from hybrid_erofs.trust.bound import PREFIX, SIDECAR_DIGEST
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import one_error_line
from tests.oci_images import TestImage, build_test_image, push_image
from tests.registry_rig import Rig

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "hybrid_erofs"]
NEW, OLD = "lab/transit", "lab/transit-old"
GZIP_KEYS = {f"{PREFIX}{kind}.gzip.{part}" for kind in ("zinfo", "meta")
             for part in ("digest", "size")}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_test_image(tmp_path_factory.mktemp("transit") / "layout")


@pytest.fixture(scope="module")
def ci(rig: Rig, image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The amd64 image in NEW, indexed and pushed by this version (`index --push --json`)."""
    ref = f"{rig.hosts['plain']}/{NEW}:1.0"
    push_image(image.ref("amd64"), ref, all_platforms=False)
    out = tmp_path_factory.mktemp("ci") / "index"
    result = CliRunner().invoke(main, ["index", ref, "--all-layers", "--platform", "linux/amd64",
                                       "--min-layer-size", "0", "--span", "1MiB", "-o",
                                       str(out), "--push", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    index = load_image_index(out)
    return {"ref": ref, "dir": out, "pull_ref": report["pull_ref"], "entry": index.images[0],
            "artifact": report["pushed"][0]["artifact"]["digest"]}


def _client(rig: Rig, repo: str) -> RegistryClient:
    return RegistryClient(parse_reference(f"{rig.hosts['plain']}/{repo}"))


def _indexed(entry: ImageEntry) -> list[Any]:
    return [layer for layer in entry.layers if layer.status == INDEXED]


@pytest.fixture(scope="module")
def old(rig: Rig, image: TestImage, ci: dict[str, Any]) -> dict[str, str]:
    """What the previous version published for the same image in OLD: the zinfo and the meta
    as plain blobs, an artifact of the plain media types, a bound manifest without the gzip
    annotations. Returns its pull_ref and its artifact's digest."""
    ref = f"{rig.hosts['plain']}/{OLD}:1.0"
    push_image(image.ref("amd64"), ref, all_platforms=False)
    entry: ImageEntry = ci["entry"]
    files = [ArtifactFile(f.name, f.media_type.removesuffix("+gzip"), ci["dir"] / f.name)
             for f in artifact_files(ci["dir"], entry, load_image_index(ci["dir"]))]
    with _client(rig, OLD) as client:
        subject = Descriptor(entry.manifest_media_type, entry.manifest, entry.manifest_size)
        artifact = push_artifact(client, subject, files).manifest_digest
        for layer in _indexed(entry):  # the plain blobs a bound manifest named
            for ref_ in (layer.zinfo, layer.meta):
                client.upload_blob(Descriptor("x", ref_.digest, ref_.size),
                                   ci["dir"] / ref_.name)
        original = client.get_manifest(entry.manifest, expected_digest=entry.manifest)
        body = _bound_manifest(original, entry)  # no transit: no gzip annotations
        assert body is not None and b".gzip." not in body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        client.put_manifest(digest, body, media_type=original.media_type)
    return {"pull_ref": f"{rig.hosts['plain']}/{OLD}@{digest}", "artifact": artifact}


def _manifest(rig: Rig, repo: str, digest: str) -> dict[str, Any]:
    with _client(rig, repo) as client:
        data: dict[str, Any] = client.get_manifest(digest, expected_digest=digest).data
    return data


def test_push_sends_zinfo_and_meta_as_gzip_blobs(rig: Rig, ci: dict[str, Any]) -> None:
    entry: ImageEntry = ci["entry"]
    bound = _manifest(rig, NEW, ci["pull_ref"].split("@")[1])
    by_digest = {layer["digest"]: layer.get("annotations", {}) for layer in bound["layers"]}
    artifact = _manifest(rig, NEW, ci["artifact"])
    titled = {layer["annotations"]["org.opencontainers.image.title"]: layer
              for layer in artifact["layers"]}
    with _client(rig, NEW) as client:
        for layer in _indexed(entry):
            annotations = by_digest[layer.digest]
            assert annotations.keys() >= GZIP_KEYS and SIDECAR_DIGEST in annotations
            for kind, ref in (("zinfo", layer.zinfo), ("meta", layer.meta)):
                digest = annotations[f"{PREFIX}{kind}.gzip.digest"]
                blob = b"".join(client.stream_blob(
                    Descriptor("x", digest, int(annotations[f"{PREFIX}{kind}.gzip.size"])),
                    max_size=1 << 30))
                plain = (ci["dir"] / ref.name).read_bytes()
                assert gzip.decompress(blob) == plain and len(blob) < len(plain)
                # the artifact lists the same blob under the plain file's name
                listed = titled[ref.name]
                assert listed["digest"] == digest
                assert listed["mediaType"] == {"zinfo": ZINFO_GZIP_MEDIA_TYPE,
                                               "meta": META_GZIP_MEDIA_TYPE}[kind]
                assert not client.head_blob(ref.digest)  # the plain file is not uploaded


def _same_files(found: dict[str, Path], ci: dict[str, Any]) -> None:
    for layer in _indexed(ci["entry"]):
        for ref in (layer.zinfo, layer.meta):
            assert found[ref.name].read_bytes() == (ci["dir"] / ref.name).read_bytes()


def _plan_files(ref: str, cache: Path) -> dict[str, Path]:
    plan = discover_image_plan(ref, registry=RegistryOptions(cache_dir=cache))
    found = {}
    for layer in plan.layers:
        found[layer.meta.name], found[layer.zinfo.name] = layer.meta, layer.zinfo
    return found


def _candidate_files(rig: Rig, repo: str, artifact: str, ci: dict[str, Any],
                     directory: Path) -> dict[str, Path]:
    """The artifact path (attached index, signed or unbound): fetched as discovery does."""
    entry: ImageEntry = ci["entry"]
    with _client(rig, repo) as client:
        referrer = next(r for r in find_artifacts(client, entry.manifest)
                        if r.digest == artifact)
        manifest = client.get_manifest(entry.manifest, expected_digest=entry.manifest)
        mine = _manifest_entry(manifest, inspect_manifest(client, manifest, repo))
        candidate = _candidate(client, referrer, directory, manifest, mine)
    return {ref.name: candidate.directory / ref.name for layer in candidate.image.layers
            for ref in layer.files.values()}


def _no_leftovers(directory: Path) -> None:
    names = [p.name for p in directory.rglob("*")]
    assert not [n for n in names if n.endswith((".gz", ".tmp"))], names


def test_nodes_keep_the_files_uncompressed(rig: Rig, ci: dict[str, Any],
                                           tmp_path: Path) -> None:
    bound = _plan_files(ci["pull_ref"], tmp_path / "cache")
    _same_files(bound, ci)
    attached = _candidate_files(rig, NEW, ci["artifact"], ci, tmp_path / "attached")
    _same_files(attached, ci)
    _no_leftovers(tmp_path)


def test_what_the_previous_version_published_still_works(
        rig: Rig, ci: dict[str, Any], old: dict[str, str], tmp_path: Path) -> None:
    _same_files(_plan_files(old["pull_ref"], tmp_path / "cache"), ci)
    _same_files(_candidate_files(rig, OLD, old["artifact"], ci, tmp_path / "attached"), ci)


@pytest.mark.root
def test_an_old_bound_image_still_mounts(image: TestImage, old: dict[str, str],
                                         tmp_path: Path) -> None:
    require_fuse_and_erofs()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    proc = subprocess.run([*CLI, "mount-image", "--cache-dir", str(tmp_path / "cache"),
                           old["pull_ref"], str(mountpoint)],
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    try:
        for path, data in image.platforms["amd64"].contents.items():
            assert (mountpoint / path).read_bytes() == data
    finally:
        subprocess.run([*CLI, "umount", str(mountpoint)], capture_output=True, timeout=60,
                       env=_env(tmp_path))


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(tmp_path / "run")}


BAD = ["bomb", "truncated", "tampered"]


def _bad_blob(case: str, meta: bytes) -> bytes:
    """A bomb; the genuine meta's gzip cut in half; a gzip of the meta with one byte
    changed (same size: only its digest tells)."""
    if case == "bomb":
        return gzip.compress(bytes(64 << 20), mtime=0)
    if case == "truncated":
        packed = gzip.compress(meta, mtime=0)
        return packed[:len(packed) // 2]
    middle = len(meta) // 2
    return gzip.compress(meta[:middle] + bytes([meta[middle] ^ 4]) + meta[middle + 1:],
                         mtime=0)


@pytest.fixture(scope="module")
def forged(rig: Rig, ci: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per BAD case: the base layer's bound meta gzip swapped for a bad blob (in NEW), as a
    bound manifest (its pull_ref) and as the labels containerd would pass."""
    entry: ImageEntry = ci["entry"]
    base = _indexed(entry)[0]
    bound = _manifest(rig, NEW, ci["pull_ref"].split("@")[1])
    labels = next(layer["annotations"] for layer in bound["layers"]
                  if layer["digest"] == base.digest)
    cases = {}
    with _client(rig, NEW) as client:
        original = client.get_manifest(entry.manifest, expected_digest=entry.manifest)
        for case in BAD:
            blob = _bad_blob(case, (ci["dir"] / base.meta.name).read_bytes())
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            client.upload_blob(Descriptor(META_GZIP_MEDIA_TYPE, digest, len(blob)), blob)
            mine = {**labels, f"{PREFIX}meta.gzip.digest": digest,
                    f"{PREFIX}meta.gzip.size": str(len(blob))}
            document = json.loads(original.body)
            for layer in document["layers"]:
                if layer["digest"] == base.digest:
                    layer["annotations"] = mine
            body = json.dumps(document, separators=(",", ":")).encode()
            manifest = "sha256:" + hashlib.sha256(body).hexdigest()
            client.put_manifest(manifest, body, media_type=original.media_type)
            cases[case] = {"labels": mine, "manifest": manifest, "layer": base.digest,
                           "pull_ref": f"{rig.hosts['plain']}/{NEW}@{manifest}"}
    return cases


MESSAGES = {"bomb": "inflates to more than the", "truncated": "truncated gzip stream",
            "tampered": "bytes hashing to sha256:"}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_bound_gzip_blob_makes_the_snapshotter_fall_back(
        ci: dict[str, Any], forged: dict[str, dict[str, Any]], case: str,
        tmp_path: Path) -> None:
    bad = forged[case]
    finder = DiscoveryFinder(RegistryOptions(cache_dir=tmp_path / "cache"))
    request = LayerRequest("chain", ci["ref"], bad["manifest"], bad["layer"], bad["labels"])
    with pytest.raises(LayerFallback) as caught:
        finder.find(request)
    assert caught.value.reason == "index-error"
    message = str(caught.value)
    assert MESSAGES[case] in message and "\n" not in message
    assert layer_file_names(bad["layer"])["meta"] in message
    bound = tmp_path / "cache" / "indexes" / "bound"
    assert not (bound / layer_file_names(bad["layer"])["meta"]).exists()  # never partial
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("case", BAD)
def test_a_bad_bound_gzip_blob_is_one_error_line(forged: dict[str, dict[str, Any]], case: str,
                                                 tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    proc = subprocess.run([*CLI, "mount-image", "--cache-dir", str(tmp_path / "cache"),
                           forged[case]["pull_ref"], str(mountpoint)],
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    line = one_error_line(proc)
    assert MESSAGES[case] in line
    assert not any(mountpoint.iterdir())
    _no_leftovers(tmp_path)
