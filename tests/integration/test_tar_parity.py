"""The mounted tree is what containerd would unpack: for every archive of Go's archive/tar test
data, CPython's testtar.tar, our corpus and archives written by bsdtar, GNU tar, a Go writer
that is never closed, umoci and buildah, the kernel view of meta || tar equals the tree
containerd 1.6's archive.Apply makes, and an archive containerd refuses is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_erofs.erofs.writer import MetaBuilder
from hybrid_erofs.errors import TarFormatError
from tests.conftest import _load_tool, ci_required
from tests.integration.conftest import require_kernel_erofs
from tests.mounting import concat, kernel_mount, walk_tree
from tests.tar_oracle import (
    CPYTHON_TESTTAR,
    GO_TESTDATA,
    comparable,
    containerd_apply,
    differences,
    explicit_paths,
    missing_prerequisites,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

BUILD_TIME = 1_700_000_000
# Go's test archives that are sparse (issue 13 handles them) or too big to unpack here.
SPARSE = {"gnu-nil-sparse-data.tar", "gnu-nil-sparse-hole.tar", "gnu-sparse-big.tar",
          "pax-nil-sparse-data.tar", "pax-nil-sparse-hole.tar", "pax-sparse-big.tar",
          "sparse-formats.tar"}
GO_ARCHIVES = sorted(p.name for p in GO_TESTDATA.glob("*.tar")) if GO_TESTDATA.exists() else []
CORPUS_NAMES = sorted(_load_tool("make_tar_corpus").corpus())


@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_kernel_erofs()
    missing = missing_prerequisites()
    if missing:
        ci_required(f"the containerd oracle needs: apt-get install {' '.join(missing)}")


def build_meta(tar: Path, meta: Path) -> None:
    builder = MetaBuilder(aufs=True, build_time=BUILD_TIME)
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            builder.feed(memoryview(chunk))
    meta.write_bytes(builder.finish())


def check_parity(tar: Path, work: Path) -> str:
    """Compare our mount with containerd's unpack of `tar`: "applied" or "refused"."""
    refusal = containerd_apply(tar, work / "oracle")
    meta = work / "m.erofs"
    if refusal is not None:
        with pytest.raises(TarFormatError) as caught:
            build_meta(tar, meta)
        message = str(caught.value)
        assert "\n" not in message and message.isprintable(), message
        return "refused"
    build_meta(tar, meta)
    device = concat(meta, tar, work / "device.img")
    with kernel_mount(device, work / "mnt") as mnt:
        ours = walk_tree(mnt)
    explicit = explicit_paths(tar)
    want = comparable(walk_tree(work / "oracle"), explicit)
    got = comparable(ours, explicit)
    assert got == want, differences(got, want)
    return "applied"


@pytest.mark.parametrize("name", [n for n in GO_ARCHIVES if n not in SPARSE])
def test_go_testdata(prerequisites: None, tmp_path: Path, name: str) -> None:
    check_parity(GO_TESTDATA / name, tmp_path)


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus(prerequisites: None, tmp_path: Path, name: str, corpus: Path) -> None:
    outcome = check_parity(corpus / name, tmp_path)
    assert outcome == ("refused" if name.startswith("refused-") else "applied")


def test_cpython_testtar_is_refused_like_containerd(prerequisites: None, tmp_path: Path) -> None:
    # testtar.tar holds a contiguous file (type '7'): containerd refuses the whole archive.
    assert check_parity(CPYTHON_TESTTAR, tmp_path) == "refused"
