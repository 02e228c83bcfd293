"""Issue 7 end to end against real registries (distribution 2.8: no Referrers API, so the
`sha256-<hex>` fallback tag is used): index a multi-layer, multi-platform image with deletions
and replaced directories, push the indexes, push again (a no-op), then mount it on a "node"
with a clean cache — a whole image through overlayfs, or one layer — with nothing but REF,
and compare with what `umoci unpack` makes of the same image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.oci.artifact import referrers_tag
from tests.integration.conftest import (
    no_leaked_loop_devices,  # noqa: F401 - fixture
    require_fuse_and_erofs,
)
from tests.oci_images import TestImage, build_test_image, push_image, tree_view, umoci_unpack
from tests.registry_rig import USER, Rig

pytestmark = pytest.mark.integration

REPO = "lab/app"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_test_image(tmp_path_factory.mktemp("app") / "layout")


@pytest.fixture(scope="module")
def pushed(rig: Rig, image: TestImage) -> dict[str, str]:
    """The test image in the plain and the token registry; host -> REF."""
    refs = {}
    for host in ("plain", "token"):
        ref = f"{rig.hosts[host]}/{REPO}:1.0"
        push_image(image.ref("multi"), ref, creds=None if host == "plain" else ":".join(USER))
        refs[host] = ref
    return refs


def _index(args: list[str], password: str | None = None) -> dict[str, object]:
    result = CliRunner().invoke(main, ["index", *args, "--json"],
                                input=None if password is None else password + "\n")
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _tags(rig: Rig, host: str) -> list[str]:
    auth = None if host == "plain" else USER
    response = httpx.get(f"http://{rig.hosts[host]}/v2/{REPO}/tags/list", auth=auth)
    if response.status_code == 401:  # token registry: the rig's token server
        return []
    tags: list[str] = response.json()["tags"]
    return tags


@pytest.fixture(scope="module")
def published(pushed: dict[str, str], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, object]:
    """`index --all-layers --all-platforms --push` once, in CI: the first run's JSON."""
    out = tmp_path_factory.mktemp("ci") / "index"
    return _index([pushed["plain"], "--all-layers", "--all-platforms", "--min-layer-size",
                   "1MiB", "-o", str(out), "--push"])


def test_push_publishes_the_image_with_its_index_bound(
        rig: Rig, image: TestImage, pushed: dict[str, str], published: dict[str, object]) -> None:
    """pull_ref: the multi-platform index again, each platform's manifest re-published with
    every indexed layer descriptor naming its sidecar; layers and config unchanged."""
    from hybrid_erofs.trust.bound import SIDECAR_DIGEST

    pull_ref = str(published["pull_ref"])
    assert pull_ref.startswith(f"{rig.hosts['plain']}/{REPO}@sha256:")
    digest = pull_ref.split("@")[1]
    top = httpx.get(f"http://{rig.hosts['plain']}/v2/{REPO}/manifests/{digest}",
                    headers={"Accept": "application/vnd.oci.image.index.v1+json"}).json()
    assert len(top["manifests"]) == len(image.platforms)
    indexed = {entry["digest"] for entry in published["indexed"]}  # type: ignore[attr-defined]
    for entry in top["manifests"]:
        assert entry["digest"] not in {p.manifest_digest for p in image.platforms.values()}
        manifest = httpx.get(f"http://{rig.hosts['plain']}/v2/{REPO}/manifests/"
                             f"{entry['digest']}",
                             headers={"Accept": entry["mediaType"]}).json()
        original = next(p for p in image.platforms.values()
                        if p.platform.startswith(f"{entry['platform']['os']}/"
                                                 f"{entry['platform']['architecture']}"))
        assert [layer["digest"] for layer in manifest["layers"]] == list(original.layer_digests)
        assert manifest["config"]["digest"] == original.config_digest
        annotated = {layer["digest"] for layer in manifest["layers"]
                     if SIDECAR_DIGEST in layer.get("annotations", {})}
        assert annotated == indexed & set(original.layer_digests)


def test_push_attaches_one_artifact_per_platform(rig: Rig, image: TestImage,
                                                  published: dict[str, object]) -> None:
    pushed = published["pushed"]
    assert isinstance(pushed, list) and len(pushed) == 2
    subjects = {p.manifest_digest for p in image.platforms.values()}
    assert {entry["subject"]["digest"] for entry in pushed} == subjects
    for entry in pushed:
        assert entry["referrers"] == "tag" and entry["manifest_pushed"] and entry["tag_updated"]
    tags = _tags(rig, "plain")
    for subject in subjects:
        assert referrers_tag(subject) in tags
    # the big layers are indexed, the small ones left to the node
    assert len(published["indexed"]) == 2  # type: ignore[arg-type]


def _tag_digests(rig: Rig, image: TestImage) -> dict[str, str]:
    """The registry's digest of each platform's fallback tag index."""
    found = {}
    for platform in image.platforms.values():
        tag = referrers_tag(platform.manifest_digest)
        response = httpx.head(f"http://{rig.hosts['plain']}/v2/{REPO}/manifests/{tag}",
                              headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        assert response.status_code == 200, tag
        found[tag] = response.headers["Docker-Content-Digest"]
    return found


def test_second_push_changes_nothing(rig: Rig, image: TestImage, pushed: dict[str, str],
                                     published: dict[str, object], tmp_path: Path) -> None:
    before = _tag_digests(rig, image)
    again = _index([pushed["plain"], "--all-layers", "--all-platforms", "--min-layer-size",
                    "1MiB", "-o", str(tmp_path / "again"), "--push"])
    for entry in again["pushed"]:  # type: ignore[attr-defined]
        assert entry["blobs_uploaded"] == 0 and not entry["manifest_pushed"]
        assert not entry["tag_updated"] and entry["summary"] == "already there, nothing pushed"
    assert [e["artifact"]["digest"] for e in again["pushed"]] == [  # type: ignore[attr-defined]
        e["artifact"]["digest"] for e in published["pushed"]]  # type: ignore[attr-defined]
    assert _tag_digests(rig, image) == before


def test_push_with_token_auth_password_from_stdin(pushed: dict[str, str],
                                                  tmp_path: Path) -> None:
    data = _index([pushed["token"], "--all-layers", "--platform", "linux/arm64/v8",
                   "--min-layer-size", "0", "-o", str(tmp_path / "t"), "--push",
                   "--username", USER[0], "--password-stdin"], password=USER[1])
    assert len(data["pushed"]) == 1  # type: ignore[arg-type]
    assert USER[1] not in json.dumps(data)


def test_corrupt_layer_is_caught_when_indexing(tmp_path: Path) -> None:
    from tests.oci_images import build_broken_images

    refs = build_broken_images(tmp_path / "broken")
    result = CliRunner().invoke(main, ["index", refs["corrupt-layer"], "--all-layers",
                                       "--min-layer-size", "0", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "corrupt or mislabelled layer" in result.output and "diff_id" in result.output
    assert not (tmp_path / "o" / "index.json").exists()
    for name in ("bad-config-media-type", "bad-rootfs-type", "bad-diff-id-count"):
        result = CliRunner().invoke(main, ["index", refs[name], "--all-layers", "-o",
                                           str(tmp_path / name)])
        assert result.exit_code == 1 and result.output.startswith("Error: ")
        assert result.output.count("\n") == 1, result.output


# -- the node: mount with nothing but REF ------------------------------------------------------

def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "hybrid_erofs", *args], capture_output=True,
                            text=True, timeout=180)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        _cli("umount", "--lazy", str(path), check=False)


def test_mount_without_an_index_suggests_the_index_command(rig: Rig, image: TestImage,
                                                           tmp_path: Path,
                                                           mountpoint: Path) -> None:
    require_fuse_and_erofs()
    ref = f"{rig.hosts['plain']}/lab/unindexed:1.0"
    push_image(image.ref("amd64"), ref, all_platforms=False)
    cache = tmp_path / "cache"
    result = _cli("mount", "--cache-dir", str(cache), ref, str(mountpoint), check=False)
    assert result.returncode == 1
    assert "no hybrid-erofs index is attached" in result.stderr
    assert f"hybrid-erofs index {ref} --all-layers" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.ismount(mountpoint)
    # never a silent full pull: no blob was fetched into the cache
    assert not any(p.is_file() and p.stat().st_size for p in cache.rglob("*")
                   if "indexes" not in p.parts)


@pytest.mark.parametrize("tag", ["amd64", "arm64"])
def test_mount_image_equals_umoci_unpack(pushed: dict[str, str], published: dict[str, object],
                                         image: TestImage, tag: str, tmp_path: Path,
                                         mountpoint: Path) -> None:
    require_fuse_and_erofs()
    platform = image.platforms[tag].platform
    expected = tree_view(umoci_unpack(image.layout, tag, tmp_path / "bundle"))
    cache = tmp_path / "cache"  # a clean node
    # By pull_ref: the image published again with its index bound in (docs/security.md).
    _cli("mount-image", "--cache-dir", str(cache), "--platform", platform,
         str(published["pull_ref"]), str(mountpoint))
    try:
        assert tree_view(mountpoint) == expected
        for path in image.absent:
            assert not (mountpoint / path).exists() and not (mountpoint / path).is_symlink()
        for path, data in image.platforms[tag].contents.items():
            assert (mountpoint / path).read_bytes() == data
    finally:
        _cli("umount", str(mountpoint))
    assert not os.path.ismount(mountpoint)


def test_mount_one_layer_with_only_ref(pushed: dict[str, str], published: dict[str, object],
                                       image: TestImage, tmp_path: Path,
                                       mountpoint: Path) -> None:
    """A layer of the artifact (the big one) and a small one indexed on the node."""
    require_fuse_and_erofs()
    platform = image.platforms["amd64"]
    for layer in (1, 3):
        _cli("mount", "--cache-dir", str(tmp_path / "cache"), "--platform", platform.platform,
             "--layer", str(layer), str(published["pull_ref"]), str(mountpoint))
        try:
            assert set(os.listdir(mountpoint)) == _top_names(
                image.blob_path(platform.layer_digests[layer]))
            for member, data in _files_of(image.blob_path(platform.layer_digests[layer])):
                assert (mountpoint / member).read_bytes() == data
        finally:
            _cli("umount", str(mountpoint))


def _members(blob: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(blob, "r:gz") as tar:
        return tar.getmembers()


def _top_names(blob: Path) -> set[str]:
    """Top-level names of a layer as its meta shows them: whiteouts as overlay whiteouts
    (the name without `.wh.`), opaque markers gone."""
    names = set()
    for member in _members(blob):
        top = member.name.removeprefix("./").split("/")[0]
        if top and top != ".wh..wh..opq":
            names.add(top.removeprefix(".wh."))
    return names


def _files_of(blob: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(blob, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and ".wh." not in member.name:
                handle = tar.extractfile(member)
                assert handle is not None
                yield member.name, handle.read()


@pytest.mark.parametrize("tag", ["amd64", "arm64"])
def test_inspect_of_the_test_image_matches_skopeo(pushed: dict[str, str], image: TestImage,
                                                  tag: str) -> None:
    platform = image.platforms[tag]
    result = CliRunner().invoke(main, ["inspect", pushed["plain"], "--platform",
                                       platform.platform, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["manifest"]["digest"] == platform.manifest_digest
    assert [x["blob"]["digest"] for x in info["layers"]] == list(platform.layer_digests)
    override = ["--override-os", platform.os, "--override-arch", platform.architecture]
    if platform.variant:
        override += ["--override-variant", platform.variant]
    config = json.loads(subprocess.run(
        ["skopeo", *override, "inspect", "--config", "--tls-verify=false",
         f"docker://{pushed['plain']}"], check=True, capture_output=True, text=True).stdout)
    run = config["config"]
    assert (info["os"], info["architecture"], info["variant"]) == (
        config["os"], config["architecture"], config.get("variant", ""))
    assert info["entrypoint"] == run["Entrypoint"] and info["cmd"] == run["Cmd"]
    assert info["env"] == run["Env"] and info["working_dir"] == run["WorkingDir"]
    assert info["user"] == run["User"] and info["labels"] == run["Labels"]
    assert [x["layer"]["digest"] for x in info["layers"]] == config["rootfs"]["diff_ids"]


def test_inspect_refuses_broken_images_in_one_line(tmp_path: Path) -> None:
    from tests.oci_images import build_broken_images

    refs = build_broken_images(tmp_path / "broken")
    expected = {"bad-config-media-type": "not an image config",
                "bad-rootfs-type": "rootfs.type is 'foo'",
                "bad-diff-id-count": "diff_ids but"}
    for name, message in expected.items():
        result = CliRunner().invoke(main, ["inspect", refs[name]])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert message in result.output, result.output
