"""indexing/publish.py and mounting/discovery.py without a registry: which files an artifact
carries, choosing a layer, and the errors a node gets for layers it cannot mount."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from hybrid_erofs.device import RegistryOptions
from hybrid_erofs.errors import IndexFormatError, InvalidInput
from hybrid_erofs.indexing.image import index_image
from hybrid_erofs.indexing.imageindex import (
    INDEX_MEDIA_TYPE,
    META_GZIP_MEDIA_TYPE,
    SIDECAR_MEDIA_TYPE,
    ZINFO_GZIP_MEDIA_TYPE,
    ImageIndex,
    LayerEntry,
    file_digest,
    load_image_index,
    parse_image_index,
)
from hybrid_erofs.indexing.publish import artifact_files, transit_copies
from hybrid_erofs.mounting.discovery import choose_layer
from tests.oci_images import TestImage, build_test_image


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestImage, Path]:
    image = build_test_image(tmp_path_factory.mktemp("img") / "layout")
    out = tmp_path_factory.mktemp("out")
    index_image(image.ref("multi"), out, all_platforms=True, min_layer_size=4096, jobs=1)
    return image, out


def test_artifact_files_carry_one_platform(indexed: tuple[TestImage, Path]) -> None:
    image, out = indexed
    index = load_image_index(out)
    entry = index.images[1]
    files = artifact_files(out, entry, index)
    assert files[0].name == "index.json" and files[0].media_type == INDEX_MEDIA_TYPE
    own = parse_image_index(files[0].path.read_bytes())
    assert [i.manifest for i in own.images] == [entry.manifest]
    indexed_layers = [layer for layer in entry.layers if layer.status == "indexed"]
    assert len(indexed_layers) == 2  # the two top layers are below 4 KiB
    assert [(f.name, f.media_type) for f in files[1:]] == [
        (ref.name, kind) for layer in indexed_layers for ref, kind in (
            (layer.zinfo, ZINFO_GZIP_MEDIA_TYPE), (layer.sidecar, SIDECAR_MEDIA_TYPE),
            (layer.meta, META_GZIP_MEDIA_TYPE)) if ref is not None]
    assert all(f.path.parent == out for f in files)
    # the zinfo and the meta travel as their gzip (DIR/NAME.gz), which inflates to the file
    for file in files[1:]:
        if file.media_type.endswith("+gzip"):
            assert file.path.name == file.name + ".gz"
            assert gzip.decompress(file.path.read_bytes()) == (out / file.name).read_bytes()
    again = artifact_files(out, entry, index)  # deterministic: the same blobs again
    assert [file_digest(f.path) for f in again] == [file_digest(f.path) for f in files]


def _with_meta(out: Path) -> tuple[ImageIndex, LayerEntry]:
    """The image index in `out` and the first of its layers that has a meta."""
    index = load_image_index(out)
    return index, next(layer for layer in index.images[0].layers if layer.meta is not None)


def test_transit_copies_are_made_again_when_stale(indexed: tuple[TestImage, Path],
                                                   tmp_path: Path) -> None:
    _image, out = indexed
    index, layer = _with_meta(out)
    assert layer.meta is not None
    copies = transit_copies(out, layer)
    stale = out / copies["meta"].name
    stale.write_bytes(gzip.compress(b"another meta"))
    assert transit_copies(out, layer) == copies
    assert gzip.decompress(stale.read_bytes()) == (out / layer.meta.name).read_bytes()


def test_artifact_files_refuse_a_changed_output(indexed: tuple[TestImage, Path],
                                                tmp_path: Path) -> None:
    _image, out = indexed
    index, layer = _with_meta(out)
    assert layer.meta is not None
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / layer.meta.name).write_bytes(b"\0" * layer.meta.size)
    with pytest.raises(IndexFormatError, match="does not match index.json"):
        artifact_files(copy, index.images[0], index)


def test_choose_layer(indexed: tuple[TestImage, Path]) -> None:
    image, out = indexed
    entry = load_image_index(out).images[0]
    digests = [layer.digest for layer in entry.layers]
    assert choose_layer(entry, RegistryOptions(layer=-1), reference="r").digest == digests[-1]
    assert choose_layer(entry, RegistryOptions(blob=digests[1]), reference="r").digest == \
        digests[1]
    with pytest.raises(InvalidInput, match="has 4 layers; choose one with --layer"):
        choose_layer(entry, RegistryOptions(), reference="r")
    with pytest.raises(InvalidInput, match="out of range"):
        choose_layer(entry, RegistryOptions(layer=4), reference="r")
    with pytest.raises(InvalidInput, match="is not one of the 4 layers"):
        choose_layer(entry, RegistryOptions(blob="sha256:" + "0" * 64), reference="r")
