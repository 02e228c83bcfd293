"""`index REF --all-layers`: every layer of an OCI layout image, index.json, determinism, resume,
--min-layer-size, the diff_id check, and the meta bound to its zinfo."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.device import open_device
from hybrid_erofs.errors import BindingError, HybridErofsError, InvalidInput
from hybrid_erofs.indexing.image import existing_outputs, index_image, meta_uuid
from hybrid_erofs.indexing.imageindex import (
    INDEXED,
    SKIPPED_SMALL,
    layer_file_names,
    load_image_index,
    verify_layer_files,
)
from hybrid_erofs.indexing.layer import index_layer
from tests.oci_images import TestImage, build_test_image


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_test_image(tmp_path_factory.mktemp("image") / "layout")


def _ref(image: TestImage, tag: str) -> str:
    return f"oci:{image.layout}:{tag}"


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_all_platforms_index_every_layer_once(image: TestImage, tmp_path: Path) -> None:
    report = index_image(_ref(image, "multi"), tmp_path / "out", all_platforms=True,
                         min_layer_size=0, jobs=2)
    index = load_image_index(tmp_path / "out")
    assert [e.platform for e in index.images] == ["linux/amd64", "linux/arm64/v8"]
    digests = {d for p in image.platforms.values() for d in p.layer_digests}
    # the bottom layer is shared by both platforms: indexed once
    assert len(digests) == 7 and set(report.indexed) == digests
    for entry in index.images:
        platform = next(p for p in image.platforms.values() if p.platform == entry.platform)
        assert entry.manifest == platform.manifest_digest
        assert [layer.digest for layer in entry.layers] == list(platform.layer_digests)
        assert [layer.diff_id for layer in entry.layers] == list(platform.diff_ids)
        for layer in entry.layers:
            assert layer.status == INDEXED
            verify_layer_files(tmp_path / "out", layer)
            meta = (tmp_path / "out" / layer_file_names(layer.digest)["meta"]).read_bytes()
            assert meta[1024 + 48:1024 + 64] == meta_uuid(layer.digest)  # sb.uuid


def test_outputs_are_deterministic_and_jobs_do_not_matter(image: TestImage,
                                                          tmp_path: Path) -> None:
    index_image(_ref(image, "multi"), tmp_path / "a", all_platforms=True, min_layer_size=0,
                jobs=1)
    index_image(_ref(image, "multi"), tmp_path / "b", all_platforms=True, min_layer_size=0,
                jobs=3)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_meta_equals_single_layer_index_with_same_settings(image: TestImage,
                                                           tmp_path: Path) -> None:
    """--all-layers is `index --aufs` with a derived UUID, build time 0 and root 0:0."""
    index_image(_ref(image, "amd64"), tmp_path / "out", min_layer_size=0, jobs=1)
    platform = image.platforms["amd64"]
    digest = platform.layer_digests[2]
    blob = image.layout / "blobs" / "sha256" / digest.split(":")[1]
    index_layer(str(blob), zinfo=tmp_path / "one.zinfo", meta=tmp_path / "one.meta", aufs=True,
                uuid=meta_uuid(digest), build_time=0, root_owner=(0, 0))
    names = layer_file_names(digest)
    assert (tmp_path / "one.meta").read_bytes() == (tmp_path / "out" / names["meta"]).read_bytes()
    assert (tmp_path / "one.zinfo").read_bytes() == (tmp_path / "out" / names["zinfo"]).read_bytes()


def test_resume_keeps_complete_layers_and_redoes_damaged_ones(image: TestImage,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = index_image(_ref(image, "amd64"), out, min_layer_size=0, jobs=1)
    before = _tree(out)
    again = index_image(_ref(image, "amd64"), out, min_layer_size=0, jobs=1)
    assert again.indexed == () and set(again.reused) == set(first.indexed)
    digests = image.platforms["amd64"].layer_digests
    names = [layer_file_names(d) for d in digests]
    (out / names[0]["meta"]).write_bytes(b"\0" * 512)  # damaged meta
    (out / names[1]["zinfo"]).unlink()  # missing zinfo
    (out / names[2]["sidecar"]).unlink()  # interrupted before the sidecar (written last)
    third = index_image(_ref(image, "amd64"), out, min_layer_size=0, jobs=2)
    assert set(third.indexed) == set(digests[:3]) and third.reused == (digests[3],)
    assert _tree(out) == before


def test_existing_outputs_refuse_another_span(image: TestImage, tmp_path: Path) -> None:
    index_image(_ref(image, "amd64"), tmp_path, min_layer_size=0, jobs=1)
    digest = image.platforms["amd64"].layer_digests[1]
    assert existing_outputs(tmp_path, digest, span=4 << 20) is not None
    assert existing_outputs(tmp_path, digest, span=1 << 20) is None


def test_min_layer_size_skips_small_layers(image: TestImage, tmp_path: Path) -> None:
    report = index_image(_ref(image, "amd64"), tmp_path, min_layer_size=1 << 20, jobs=1)
    platform = image.platforms["amd64"]
    big = [d for d, s in zip(platform.layer_digests, platform.layer_sizes, strict=True)
           if s >= 1 << 20]
    assert list(report.indexed) == big
    entry = load_image_index(tmp_path).images[0]
    for layer in entry.layers:
        assert layer.status == (INDEXED if layer.digest in big else SKIPPED_SMALL)
        assert (layer.meta is None) == (layer.status == SKIPPED_SMALL)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "index.json") == sorted(
        n for d in big for n in layer_file_names(d).values())


def test_wrong_diff_id_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    data = b"x" * 10000
    blob = tmp_path / "l.tar.gz"
    import io
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("a")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob.write_bytes(gzip.compress(raw.getvalue()))
    good = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    index_layer(str(blob), zinfo=tmp_path / "ok.zinfo", meta=tmp_path / "ok.meta", diff_id=good)
    bad = "sha256:" + "0" * 64
    with pytest.raises(InvalidInput, match=r"corrupt or mislabelled layer.*diff_id is sha256:0+"):
        index_layer(str(blob), zinfo=tmp_path / "z", meta=tmp_path / "m", diff_id=bad)
    assert not (tmp_path / "z").exists() and not (tmp_path / "m").exists()
    assert not (tmp_path / "z.json").exists()


def test_meta_of_another_layer_is_refused(image: TestImage, tmp_path: Path) -> None:
    index_image(_ref(image, "amd64"), tmp_path, min_layer_size=0, jobs=1)
    digests = image.platforms["amd64"].layer_digests
    a, b = (layer_file_names(d) for d in digests[1:3])
    blob = image.layout / "blobs" / "sha256" / digests[1].split(":")[1]
    device = open_device(str(blob), meta=tmp_path / a["meta"], zinfo=tmp_path / a["zinfo"])
    device.close()
    with pytest.raises(BindingError, match=rf"this meta was built for another layer \(blob "
                                               rf"{digests[2]}\); .* is for blob {digests[1]}"):
        open_device(str(blob), meta=tmp_path / b["meta"], zinfo=tmp_path / a["zinfo"])


def test_cli_all_layers_summary_and_json(image: TestImage, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["index", _ref(image, "multi"), "--all-layers",
                                  "--all-platforms", "--min-layer-size", "1MiB", "-o",
                                  str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["indexed"]) == 2  # the two 3 MiB layers
    assert {s["status"] for s in data["skipped"]} == {SKIPPED_SMALL}
    assert data["index"] == json.loads((tmp_path / "out" / "index.json").read_text())
    result = runner.invoke(main, ["index", _ref(image, "amd64"), "--all-layers", "-o",
                                  str(tmp_path / "out2"), "--min-layer-size", "0"])
    assert result.exit_code == 0, result.output
    assert "4 layers indexed" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--all-layers"], "--all-layers needs -o DIR"),
    (["--all-layers", "-o", "D", "--meta", "m"], "--meta does not apply to --all-layers"),
    (["--all-layers", "-o", "D", "--layer", "1"], "--layer does not apply to --all-layers"),
    (["-o", "x.zinfo", "--push"], "--push needs --all-layers"),
    (["-o", "x.zinfo", "--jobs", "2"], "--jobs needs --all-layers"),
])
def test_cli_usage_errors(image: TestImage, tmp_path: Path, args: list[str],
                          message: str) -> None:
    os.chdir(tmp_path)
    result = CliRunner().invoke(main, ["index", _ref(image, "amd64"), *args])
    assert result.exit_code == 2 and message in result.output


def test_cli_all_layers_of_a_local_file_is_a_usage_error(tmp_path: Path) -> None:
    layer = tmp_path / "l.tar.gz"
    layer.write_bytes(gzip.compress(b"\0" * 1024))
    result = CliRunner().invoke(main, ["index", str(layer), "--all-layers", "-o",
                                       str(tmp_path / "d")])
    assert result.exit_code == 2 and "needs an image reference" in result.output


def test_push_from_a_layout_is_refused_after_indexing(image: TestImage, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["index", _ref(image, "amd64"), "--all-layers", "-o",
                                       str(tmp_path), "--min-layer-size", "0", "--push"])
    assert result.exit_code == 1
    assert "needs a registry reference" in result.output
    assert result.output.count("\n") <= 6 and "Traceback" not in result.output


def test_output_path_that_is_a_file(image: TestImage, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(HybridErofsError, match="is not a directory"):
        index_image(_ref(image, "amd64"), tmp_path / "f")
