"""The test image builder (tests/oci_images.py): deterministic bytes, correct digests and diff_ids,
the whiteout entries in the layers, broken variants, and tree_view on a plain directory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from hybrid_erofs.errors import RegistryError
from hybrid_erofs.oci.image import inspect_image
from hybrid_erofs.oci.layout import LayoutClient
from tests.oci_images import (
    BIG_LAYER,
    BIG_SIZE,
    LONG_NAME,
    TINY_LAYER,
    UNICODE_NAME,
    TestImage,
    build_broken_images,
    build_test_image,
    tree_view,
)
from tests.registry_rig import GZIP_LAYER, OCI_INDEX, OCI_MANIFEST


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_test_image(tmp_path_factory.mktemp("oci-images") / "layout")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _members(image: TestImage, tag: str, layer: int) -> list[tarfile.TarInfo]:
    blob = image.blob_path(image.platforms[tag].layer_digests[layer]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return tar.getmembers()


def test_layout_is_deterministic(image: TestImage, tmp_path: Path) -> None:
    again = build_test_image(tmp_path / "again")
    assert _files(again.layout) == _files(image.layout)
    assert again.index_digest == image.index_digest
    assert again.platforms == image.platforms


def test_index_json_tags(image: TestImage) -> None:
    entries = json.loads((image.layout / "index.json").read_text())["manifests"]
    tags = {e["annotations"]["org.opencontainers.image.ref.name"]: e for e in entries}
    assert tags["multi"]["mediaType"] == OCI_INDEX
    assert tags["multi"]["digest"] == image.index_digest
    for tag in ("amd64", "arm64"):
        assert tags[tag]["mediaType"] == OCI_MANIFEST
        assert tags[tag]["digest"] == image.platforms[tag].manifest_digest
    index = json.loads(image.index)
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"}]


@pytest.mark.parametrize("tag", ["amd64", "arm64"])
def test_digests_and_diff_ids(image: TestImage, tag: str) -> None:
    platform = image.platforms[tag]
    assert _sha256(image.blob_path(platform.manifest_digest).read_bytes()) \
        == platform.manifest_digest
    manifest = json.loads(platform.manifest)
    assert manifest["config"]["digest"] == platform.config_digest
    assert [d["digest"] for d in manifest["layers"]] == list(platform.layer_digests)
    assert [d["size"] for d in manifest["layers"]] == list(platform.layer_sizes)
    assert {d["mediaType"] for d in manifest["layers"]} == {GZIP_LAYER}
    config = json.loads(image.blob_path(platform.config_digest).read_bytes())
    assert config["rootfs"] == {"type": "layers", "diff_ids": list(platform.diff_ids)}
    assert (config["os"], config["architecture"], config.get("variant", "")) \
        == (platform.os, platform.architecture, platform.variant)
    for digest, diff_id in zip(platform.layer_digests, platform.diff_ids, strict=True):
        blob = image.blob_path(digest).read_bytes()
        assert _sha256(blob) == digest
        assert blob[4:8] == b"\0\0\0\0"  # gzip MTIME
        assert _sha256(gzip.decompress(blob)) == diff_id


def test_platforms_share_only_the_bottom_layer(image: TestImage) -> None:
    amd64, arm64 = image.platforms["amd64"], image.platforms["arm64"]
    assert len(amd64.layer_digests) == len(arm64.layer_digests) == 4
    assert amd64.layer_digests[0] == arm64.layer_digests[0]
    assert not set(amd64.layer_digests[1:]) & set(arm64.layer_digests[1:])
    assert amd64.config_digest != arm64.config_digest


def test_layer_sizes_exercise_spans_and_min_layer_size(image: TestImage) -> None:
    for platform in image.platforms.values():
        assert platform.layer_sizes[BIG_LAYER] > BIG_SIZE
        assert platform.layer_sizes[TINY_LAYER] < 4096


def test_config_fields_through_inspect(image: TestImage) -> None:
    for tag, platform in image.platforms.items():
        with LayoutClient(image.ref("multi")) as client:
            info = inspect_image(client, image.ref("multi"), platform.platform)
        assert info.manifest_digest == platform.manifest_digest, tag
        c, e = info.config, image.expected
        assert (c.entrypoint, c.cmd, c.env, c.working_dir, c.user, c.labels) \
            == (e.entrypoint, e.cmd, e.env, e.working_dir, e.user, e.labels)
        assert (c.os, c.architecture, c.variant) \
            == (platform.os, platform.architecture, platform.variant)
        assert c.diff_ids == platform.diff_ids


def test_layers_hold_the_whiteouts_in_order(image: TestImage) -> None:
    names = [[m.name for m in _members(image, "arm64", i)] for i in range(4)]
    assert {".wh.gone", "etc/.wh.old.conf", "etc/.wh.readded.conf", "linkpair/.wh.a"} \
        <= set(names[1])
    opaque = names[2].index("opq/.wh..wh..opq")
    assert names[2][opaque - 1] == "opq" and "opq/new.txt" in names[2][opaque:]
    assert "etc/.wh.dangling" in names[3] and "etc/readded.conf" in names[3]
    assert not any(".wh." in name for name in names[0])
    base = {m.name: m for m in _members(image, "arm64", 0)}
    assert base["bin/tool-hardlink"].islnk() and base["bin/tool-hardlink"].linkname == "bin/tool"
    assert base["bin/su"].mode == 0o4755 and base["home/user"].mode == 0o700
    assert (base["home/user/secret.txt"].uid, base["home/user/secret.txt"].gid) == (1000, 1001)
    assert base["dev/null"].ischr() and base["run/fifo"].isfifo()
    assert len(LONG_NAME) > 100 and LONG_NAME in base and UNICODE_NAME in base
    assert base["usr/share/xattr.txt"].pax_headers["SCHILY.xattr.user.comment"] == "hybrid-erofs"
    assert base["f2d"].isfile() and base["d2f"].isdir()
    upper = {m.name: m for m in _members(image, "arm64", 1)}
    assert upper["f2d"].isdir() and upper["d2f"].isfile()


def test_broken_images(tmp_path: Path) -> None:
    refs = build_broken_images(tmp_path / "broken")
    assert set(refs) == {"bad-config-media-type", "bad-rootfs-type", "bad-diff-id-count",
                         "corrupt-layer"}
    for name, match in (("bad-config-media-type", "not an image config"),
                        ("bad-rootfs-type", "rootfs.type is 'foo'"),
                        ("bad-diff-id-count", "lists 1 diff_ids but manifest")):
        with LayoutClient(refs[name]) as client, pytest.raises(RegistryError, match=match):
            inspect_image(client, refs[name])
    with LayoutClient(refs["corrupt-layer"]) as client:
        info = inspect_image(client, refs["corrupt-layer"])
        blob = client.blob_path(info.layers[1].digest).read_bytes()
    assert info.config.diff_ids[0] == _sha256(gzip.decompress(
        client.blob_path(info.layers[0].digest).read_bytes()))
    assert info.config.diff_ids[1] != _sha256(gzip.decompress(blob))


def test_tree_view(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d").chmod(0o700)
    (root / "d" / "a").write_bytes(b"abc")
    os.link(root / "d" / "a", root / "b")
    (root / "c").write_bytes(b"")
    (root / "c").chmod(0o4755)
    os.symlink("d/a", root / "s")
    view = tree_view(root, mtimes=True)
    assert sorted(view) == ["b", "c", "d", "d/a", "s"]
    assert view["d"]["type"] == "dir" and view["d"]["mode"] == 0o700
    assert "size" not in view["d"] and "mtime_ns" not in view["d"]
    assert view["b"]["link"] == view["d/a"]["link"] == "b"
    assert view["d/a"]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert view["c"]["mode"] == 0o4755 and "link" not in view["c"]
    assert view["s"]["target"] == "d/a" and view["s"]["size"] == 3
    assert "mtime_ns" not in tree_view(root)["b"]
    try:
        os.setxattr(root / "c", "user.k", b"v")
    except OSError:
        return  # no user xattrs on this filesystem
    assert tree_view(root)["c"]["xattrs"] == {"user.k": b"v"}
