"""What a file is (filekind.identify) on real files of every kind, and the one line a command
prints when it is given the wrong one ("m.erofs: is an EROFS image, not a zinfo file")."""

from __future__ import annotations

import lzma
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.filekind import identify, identify_file
from tests.conftest import ROOT

SMALL = ROOT / "fixtures" / "gzip" / "small.tar.gz"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped fixture indexed (m.erofs, layer.zinfo and its sidecar) and files of other
    kinds; everything under names that do not give the kind away."""
    work = tmp_path_factory.mktemp("kinds")
    layer = work / "layer.tar.gz"
    shutil.copy(SMALL, layer)
    result = CliRunner().invoke(main, ["index", str(layer), "-o", str(work / "layer.zinfo")])
    assert result.exit_code == 0, result.output
    tar = work / "plain"
    with tarfile.open(tar, "w") as archive:
        archive.add(ROOT / "README.md", arcname="README.md")
    zstd = work / "zstd-blob"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(64))
    xz = work / "xz-blob"
    xz.write_bytes(lzma.compress(b"hello"))
    garbage = work / "garbage"
    garbage.write_bytes(bytes(range(256)) * 20)
    empty = work / "empty"
    empty.write_bytes(b"")
    return {"meta": work / "m.erofs", "zinfo": work / "layer.zinfo",
            "sidecar": work / "layer.zinfo.json", "gzip": layer, "tar": tar, "zstd": zstd,
            "xz": xz, "garbage": garbage, "empty": empty,
            "v1": ROOT / "fixtures" / "gzip" / "compressible.v1.zinfo",
            "dir-image": ROOT / "fixtures" / "erofs" / "dir-4k.erofs"}


@pytest.mark.parametrize(("name", "kind"), [
    ("meta", "an EROFS image"), ("dir-image", "an EROFS image"), ("zinfo", "a zinfo file"),
    ("v1", "a zinfo file"), ("sidecar", "a zinfo sidecar (JSON)"), ("gzip", "a gzip file"),
    ("tar", "a tar archive"), ("zstd", "a zstd file"), ("xz", "an xz file"),
    ("garbage", None), ("empty", "an empty file"),
])
def test_identify(files: dict[str, Path], name: str, kind: str | None) -> None:
    assert identify_file(files[name]) == kind


def test_identify_an_image_index() -> None:
    head = b'{\n "format": "hybrid-erofs/image-index",\n "images": ['
    assert identify(head) == "an image index (index.json)"
    assert identify(b'{"a": 1}', 8) == "a JSON file"
    assert identify_file("/nonexistent/file") is None


def one_line(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code != 0, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_inspect_of_a_meta_or_a_layer_says_what_it_is(files: dict[str, Path]) -> None:
    assert one_line("inspect", str(files["meta"])) == (
        f"Error: {files['meta']}: is an EROFS image, not a zinfo file")
    assert one_line("inspect", str(files["gzip"])) == (
        f"Error: {files['gzip']}: is a gzip file, not a zinfo file")


def test_ls_of_a_zinfo_as_meta_says_what_it_is(files: dict[str, Path]) -> None:
    assert one_line("ls", "--meta", str(files["zinfo"])) == (
        f"Error: {files['zinfo']}: is a zinfo file, not an EROFS image")


def test_a_meta_of_unknown_bytes_is_named(files: dict[str, Path]) -> None:
    line = one_line("ls", "--meta", str(files["garbage"]))
    assert line.startswith(f"Error: {files['garbage']}: superblock at offset 1024: bad magic ")


def test_cat_with_the_wrong_zinfo(files: dict[str, Path]) -> None:
    base = ["cat", "--meta", str(files["meta"]), "--zinfo"]
    assert one_line(*base, str(files["meta"]), str(files["gzip"]), "/usr/bin/ucfr") == (
        f"Error: {files['meta']}: is an EROFS image, not a zinfo file")
    assert one_line(*base, str(files["sidecar"]), str(files["gzip"]), "/usr/bin/ucfr") == (
        f"Error: {files['sidecar']}: is a zinfo sidecar (JSON), not a zinfo file")


def test_a_meta_given_as_the_layer(files: dict[str, Path]) -> None:
    assert one_line("read", str(files["meta"]), "--zinfo", str(files["zinfo"])) == (
        f"Error: {files['meta']}: is an EROFS image, not a gzip or tar layer")
    out = files["meta"].parent / "out"
    assert one_line("index", str(files["meta"]), "-o", f"{out}.zinfo", "--meta", f"{out}.erofs") == (
        f"Error: {files['meta']}: is an EROFS image, not a gzip layer")
    assert not list(out.parent.glob("out.*"))
