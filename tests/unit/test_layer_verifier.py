"""trust/verifier.py: the index recomputed from the whole blob equals the one in use, and the
forgeries of issue 14 item 1 (a meta from a doctored tar, a zinfo with a checkpoint moved to 0,
a checkpoint window replaced, each with a re-written sidecar) are found, named in one line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.gzindex.format import Checkpoint, GzipIndex, dump_index, parse_index
from hybrid_erofs.gzindex.sidecar import sha256_digest, sidecar_path
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.source import FileSource
from hybrid_erofs.trust.verifier import LayerIndexFiles, verify_layer
from tests.forgery import EVIL_LINK, EVIL_TARGET, forge_index, forge_zinfo


def _noise(seed: str, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{len(out)}".encode()).digest()
    return bytes(out[:size])


def _tar() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in (("usr/bin/tool", _noise("t", 400_000), 0o755),
                                 ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644),
                                 ("usr/lib/big", _noise("b", 300_000), 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid = len(data), mode, 1700000000, 1000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("usr/bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "tool"
        tar.addfile(link)
        wh = tarfile.TarInfo("etc/.wh.old")
        tar.addfile(wh)
        dev = tarfile.TarInfo("dev/null")
        dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tar.addfile(dev)
    return raw.getvalue()


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(_tar(), mtime=0))
    return path


def _verify(blob: Path, meta: Path, zinfo: Path | None, **kwargs: object):  # type: ignore[no-untyped-def]
    with open(blob, "rb") as handle:
        return verify_layer(handle, LayerIndexFiles(meta, zinfo), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("aufs", [False, True])
def test_the_genuine_index_verifies(layer: Path, tmp_path: Path, aufs: bool) -> None:
    zinfo, meta = tmp_path / "l.zinfo", tmp_path / "m.erofs"
    index_layer(str(layer), zinfo=zinfo, meta=meta, span=64 << 10, aufs=aufs)
    result = _verify(layer, meta, zinfo, blob_digest=sha256_digest(layer.read_bytes()),
                     diff_id=sha256_digest(gzip.decompress(layer.read_bytes())))
    assert result.ok, result.problems
    assert result.checkpoints > 3 and result.entries >= 8
    assert "verified against blob" in result.summary()
    # the same through a ByteSource (a blob in the chunk cache, for the background fetch)
    source = FileSource(layer)
    try:
        assert verify_layer(source, LayerIndexFiles(meta, zinfo)).ok
    finally:
        source.close()


def test_a_plain_tar_layer_verifies(tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_tar())
    index_layer(str(tar), zinfo=None, meta=tmp_path / "m.erofs")
    assert _verify(tar, tmp_path / "m.erofs", None).ok


def test_the_forged_meta_of_item_1_fails(layer: Path, tmp_path: Path) -> None:
    forged = forge_index(layer, _tar(), tmp_path / "forged")
    result = _verify(layer, forged.meta, forged.zinfo)
    assert not result.ok
    text = "\n".join(result.problems)
    assert f"/{forged.setuid_file}: mode -rwsr-xr-x in the meta, -rwxr-xr-x in the layer" in text
    assert f"/{forged.setuid_file}: owner 0:0 in the meta, 1000:0 in the layer" in text
    assert f"/{EVIL_LINK}: in the meta but not in the layer (symlink -> {EVIL_TARGET}" in text
    # `hybrid-erofs verify` said OK to this meta before (issue 14 item 1): now exit 1.
    result = CliRunner().invoke(main, ["verify", "--meta", str(forged.meta), "--zinfo",
                                       str(forged.zinfo), str(layer)])
    assert result.exit_code == 1, result.output
    assert f"problem: /{EVIL_LINK}: in the meta but not in the layer" in result.output


def test_the_forged_zinfo_of_item_1_fails(layer: Path, tmp_path: Path) -> None:
    zinfo, meta = tmp_path / "l.zinfo", tmp_path / "m.erofs"
    index_layer(str(layer), zinfo=zinfo, meta=meta, span=64 << 10)
    forge_zinfo(zinfo)
    result = _verify(layer, meta, zinfo)
    assert not result.ok
    assert "checkpoint 1: uncompressed offset does not increase" in result.problems[0]
    for command in (["read", str(layer), "--zinfo", str(zinfo), "--length", "100"],
                    ["cat", "--meta", str(meta), "--zinfo", str(zinfo), str(layer),
                     "/etc/passwd"]):
        refused = CliRunner().invoke(main, command)
        assert refused.exit_code == 1 and refused.stdout_bytes == b""
        assert "uncompressed offset does not increase (0 -> 0)" in refused.output


def test_a_forged_window_at_plausible_offsets_fails(layer: Path, tmp_path: Path) -> None:
    # Offsets pass every sanity check: only binding or verification can catch this.
    zinfo, meta = tmp_path / "l.zinfo", tmp_path / "m.erofs"
    index_layer(str(layer), zinfo=zinfo, meta=meta, span=64 << 10)
    index = parse_index(zinfo.read_bytes())
    cps = list(index.checkpoints)
    cps[2] = Checkpoint(cps[2].in_offset, cps[2].out_offset, cps[2].bits, bytes(32768))
    data = dump_index(GzipIndex(index.span, tuple(cps)))
    zinfo.write_bytes(data)
    side = json.loads(sidecar_path(zinfo).read_text())
    side["zinfo"].update(digest=sha256_digest(data), size=len(data))
    sidecar_path(zinfo).write_text(json.dumps(side))
    result = _verify(layer, meta, zinfo)
    assert result.problems == (f"{zinfo}: checkpoint 2: the window is not the 32768 bytes of "
                               f"layer data before uncompressed offset {cps[2].out_offset}",)


def test_a_layer_that_is_not_the_manifests_fails(layer: Path, tmp_path: Path) -> None:
    zinfo, meta = tmp_path / "l.zinfo", tmp_path / "m.erofs"
    index_layer(str(layer), zinfo=zinfo, meta=meta)
    wrong = "sha256:" + "1" * 64
    result = _verify(layer, meta, zinfo, blob_digest=wrong, diff_id=wrong)
    assert [p.split(":", 1)[0] for p in result.problems] == ["blob", "layer data"]
