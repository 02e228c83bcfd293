"""Issue 16 end to end with Debian's containerd 1.6 and runc: the snapshotter registered as the
proxy plugin `hybrid-erofs`, images of a real Debian root filesystem pushed with skopeo to
`docker-registry`, pulled through CRI PullImage (with the remote-snapshot labels) and run with
`ctr run --snapshotter hybrid-erofs`; the container's tree compared with the overlayfs
snapshotter's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    build_run_image,
    chain_ids,
    missing_prerequisites,
    mount_view,
    unmount_below,
)
from tests.oci_images import push_image, tree_view

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]


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
    """A registry, the snapshotter and containerd, all private to one test module."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.registry = Registry(workdir / "registry")
        self.snapshotter = SnapshotterProcess(workdir / "run" / "sn.sock", workdir / "sn-root",
                                              workdir / "snapshotter.log")
        self.containerd: Containerd | None = None

    def start(self) -> None:
        self.registry.start()
        self.snapshotter.start()
        self.containerd = Containerd(self.workdir / "containerd", self.snapshotter.address,
                                     self.registry.host)
        self.containerd.start()

    def stop(self) -> None:
        if self.containerd is not None:
            self.containerd.remove_all()
            self.containerd.stop()
        self.snapshotter.stop()
        self.registry.stop()
        unmount_below(self.workdir)


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


def _run(node: Node, ref: str, name: str, *argv: str) -> str:
    assert node.containerd is not None
    proc = node.containerd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, ref, name, *argv)
    return proc.stdout


def test_image_without_index_is_pulled_and_run_through_overlay(node: Node, debian: RunImage,
                                                               tmp_path: Path) -> None:
    """No hybrid-erofs index: containerd downloads and applies every layer into our
    snapshots (the fallback), and the container runs."""
    assert node.containerd is not None
    ref = _push(node, debian, "lab/plain")
    assert node.containerd.cri_pull(ref).startswith("sha256:")
    chains = chain_ids(debian.diff_ids)
    listed = node.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout
    for chain in chains:
        assert chain in listed
    for digest in debian.layer_digests:  # applied by containerd: whole blobs fetched
        assert node.registry.blob_gets(digest)
    assert _run(node, ref, "plain-cat", "/bin/cat", "/etc/hybrid-erofs-test") == MARKER.decode()
    out = _run(node, ref, "plain-ls", "/bin/sh", "-c",
               f"ls -A /{OPAQUE_DIR}; for p in {' '.join(DELETED)}; do test -e /$p && echo $p; "
               "done; cat /etc/debian_version")
    assert out.splitlines()[0] == "only-this" and len(out.splitlines()) == 2
    # the container's root tree equals the overlayfs snapshotter's
    node.containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    try:
        mount_view(node.containerd, SNAPSHOTTER, "cmp-ours", chains[-1], ours)
        mount_view(node.containerd, "overlayfs", "cmp-theirs", chains[-1], theirs)
        assert tree_view(ours) == tree_view(theirs)
    finally:
        for path in (ours, theirs):
            subprocess.run(["umount", "-R", str(path)], capture_output=True)
        node.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "cmp-ours",
                            check=False)
        node.containerd.ctr("snapshots", "--snapshotter", "overlayfs", "rm", "cmp-theirs",
                            check=False)
    shutil.rmtree(tmp_path, ignore_errors=True)
