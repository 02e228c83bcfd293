"""The README's offline whole-image flow with its defaults and its relative paths, as root:
`index oci:./layout:TAG --all-layers -o app-index/` (every layer of the test image is under
--min-layer-size, so none is indexed there), then `mount-image --index-dir app-index/
oci:./layout:TAG mnt` from the same directory: the small layers are indexed on the node, every
relative path reaches the daemon resolved, and the merged tree equals `umoci unpack`'s."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_erofs.indexing.imageindex import SKIPPED_SMALL
from tests.conftest import ci_required
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for
from tests.oci_images import TestImage, build_test_image, tree_view, umoci_unpack

pytestmark = [pytest.mark.integration, pytest.mark.root]
CLI = [sys.executable, "-m", "hybrid_erofs"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    if shutil.which("umoci") is None:
        ci_required("the whole-image oracle needs umoci (apt-get install umoci)")
    return build_test_image(tmp_path_factory.mktemp("offline") / "layout")


def test_offline_flow_with_defaults_and_relative_paths(image: TestImage, tmp_path: Path) -> None:
    require_fuse_and_erofs()
    work = image.layout.parent
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": "run"}  # relative too

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)

    indexed = cli("index", "oci:./layout:amd64", "--all-layers", "-o", "app-index/")
    assert indexed.returncode == 0, indexed.stderr
    index = json.loads((work / "app-index" / "index.json").read_text())
    statuses = [layer["status"] for image in index["images"] for layer in image["layers"]]
    assert statuses and set(statuses) == {SKIPPED_SMALL}  # nothing indexed in "CI"

    (work / "mnt").mkdir()
    mounted = cli("mount-image", "--index-dir", "app-index/", "--cache-dir", "cache",
                  "oci:./layout:amd64", "mnt")
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert mounted.stderr.count("indexed on this node") == len(statuses)
        expected = tree_view(umoci_unpack(image.layout, "amd64", tmp_path / "bundle"))
        assert tree_view(work / "mnt") == expected
        for path, data in image.platforms["amd64"].contents.items():
            assert (work / "mnt" / path).read_bytes() == data
        assert list((work / "cache" / "indexes" / "layers").glob("*.zinfo"))
    finally:
        unmounted = cli("umount", "mnt")
    assert unmounted.returncode == 0, unmounted.stderr
    assert not os.path.ismount(work / "mnt")
    assert daemons_for(work / "run") == []
