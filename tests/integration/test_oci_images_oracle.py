"""The umoci oracle is itself tested: `umoci unpack` of each platform of the test image gives the
merged tree the layers describe (deletions, opaque directory, replacements, links, modes)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import ci_required
from tests.oci_images import (
    BIG_SIZE,
    LONG_NAME,
    MTIME,
    UNICODE_NAME,
    TestImage,
    build_test_image,
    tree_view,
    umoci_unpack,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

EXPECTED_PATHS = {
    "bin", "bin/newtool", "bin/newtool-link", "bin/sh", "bin/su", "bin/tool",
    "bin/tool-hardlink", "bin/wall", "d2f", "data", "data/random.bin", "dev", "dev/null", "etc",
    "etc/abs-link", "etc/arch", "etc/empty", "etc/hello.txt", "etc/motd", "etc/readded.conf",
    UNICODE_NAME, "f2d", "f2d/inner.txt", "home", "home/user", "home/user/.profile",
    "home/user/secret.txt", "linkpair", "linkpair/b", "opq", "opq/new.txt", "opq/olddir",
    "opq/olddir/z.txt", "run", "run/fifo", "secret", "secret/key", "tmp", "usr", "usr/lib",
    "usr/lib/libfoo.so", "usr/lib/libfoo.so.1", "usr/lib64", "usr/local", "usr/local/empty-new",
    "usr/share", "usr/share/doc", "usr/share/xattr.txt", LONG_NAME,
    *("/".join(LONG_NAME.split("/")[:i]) for i in range(4, LONG_NAME.count("/") + 1)),
}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    if os.geteuid() != 0:
        ci_required("umoci unpack without --rootless needs root")
    if shutil.which("umoci") is None:
        ci_required("umoci is not installed (apt-get install umoci)")
    return build_test_image(tmp_path_factory.mktemp("oracle") / "layout")


@pytest.mark.parametrize("tag", ["amd64", "arm64"])
def test_umoci_unpack_gives_the_merged_tree(image: TestImage, tag: str, tmp_path: Path) -> None:
    rootfs = umoci_unpack(image.layout, tag, tmp_path / "bundle")
    view = tree_view(rootfs, mtimes=True)
    assert set(view) == EXPECTED_PATHS
    assert not set(image.absent) & set(view)
    for path, data in image.platforms[tag].contents.items():
        assert (rootfs / path).read_bytes() == data, path
    assert {p for p in view if p.startswith("opq/")} == {"opq/new.txt", "opq/olddir",
                                                         "opq/olddir/z.txt"}
    assert (view["d2f"]["type"], view["f2d"]["type"]) == ("file", "dir")
    assert view["data/random.bin"]["size"] == BIG_SIZE
    assert (view["data/random.bin"]["uid"], view["data/random.bin"]["gid"]) == (33, 33)
    modes = {"bin/su": 0o4755, "bin/wall": 0o2755, "tmp": 0o1777, "home/user": 0o700,
             "opq/olddir": 0o700, "f2d": 0o750, "usr/local/empty-new": 0o444,
             "etc/readded.conf": 0o600}
    assert {p: view[p]["mode"] for p in modes} == modes
    assert (view["home/user"]["uid"], view["home/user/secret.txt"]["gid"]) == (1000, 1001)
    assert view["bin/wall"]["gid"] == 5
    assert {p: view[p]["target"] for p in ("bin/sh", "etc/abs-link", "usr/lib64")} == {
        "bin/sh": "tool", "etc/abs-link": "/etc/hello.txt", "usr/lib64": "lib"}
    assert (view["dev/null"]["type"], view["dev/null"]["rdev"]) == ("chr", (1, 3))
    assert view["run/fifo"]["type"] == "fifo"
    # Hard links: a new pair in layer 2; the pairs of layer 0 are broken by a replacement
    # (bin/tool) and a whiteout (linkpair/a).
    assert view["bin/newtool"]["link"] == view["bin/newtool-link"]["link"] == "bin/newtool"
    assert not {"bin/tool", "bin/tool-hardlink", "linkpair/b"} & {
        p for p, e in view.items() if "link" in e}
    assert view["usr/share/xattr.txt"]["xattrs"] == {"user.comment": b"hybrid-erofs",
                                                     "user.mime_type": b"text/plain"}
    assert view["etc/empty"]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert {e["mtime_ns"] for e in view.values() if "mtime_ns" in e} == {MTIME * 10**9}


def test_platforms_differ_above_the_shared_layer(image: TestImage, tmp_path: Path) -> None:
    amd64 = tree_view(umoci_unpack(image.layout, "amd64", tmp_path / "a"))
    arm64 = tree_view(umoci_unpack(image.layout, "arm64", tmp_path / "b"))
    differ = {p for p in amd64 if amd64[p] != arm64[p]}
    assert differ == {"bin/tool", "bin/newtool", "bin/newtool-link", "data/random.bin",
                      "etc/arch", "etc/motd", "opq/new.txt"}


def test_umoci_refuses_an_index_tag(image: TestImage, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="ambiguous"):
        umoci_unpack(image.layout, "multi", tmp_path / "bundle")
