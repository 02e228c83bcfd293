"""The verifier against archives written by others: every Go archive/tar test archive (sparse
ones, 60 GB ones included) and every tar of the project's corpus that `index` accepts is
verified against the meta built from it, with no problem; a meta built from another archive
is not."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_erofs.errors import HybridErofsError
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.trust.verifier import LayerIndexFiles, verify_layer
from tests.conftest import ci_required
from tests.tar_oracle import GO_TESTDATA, missing_prerequisites

pytestmark = pytest.mark.integration


def _archives(corpus: Path) -> list[Path]:
    if missing_prerequisites():
        ci_required(f"Go's test archives need: apt-get install {' '.join(missing_prerequisites())}")
    return sorted(GO_TESTDATA.glob("*.tar")) + sorted(corpus.glob("*.tar"))


def test_every_archive_index_accepts_verifies(corpus: Path, tmp_path: Path) -> None:
    verified: list[str] = []
    metas: list[Path] = []
    for tar in _archives(corpus):
        meta = tmp_path / f"{tar.parent.name}-{tar.name}.erofs"
        try:
            index_layer(str(tar), zinfo=None, meta=meta)
        except HybridErofsError:
            continue  # refused in one line (test_tar_parity checks how)
        with open(tar, "rb") as handle:
            result = verify_layer(handle, LayerIndexFiles(meta), name=tar.name)
        assert result.ok, result.problems
        verified.append(tar.name)
        metas.append(meta)
    assert {"sparse-formats.tar", "pax-sparse-big.tar", "gnu-sparse-big.tar"} <= set(verified)
    assert len(verified) >= 40
    # another archive's meta under this tar: refused (it names another blob) or different
    first, second = _archives(corpus)[0], metas[1]
    with open(first, "rb") as handle:
        assert not verify_layer(handle, LayerIndexFiles(second)).ok
