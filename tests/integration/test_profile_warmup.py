"""fetching/warmup.py against a real registry (distribution 2.8): the snapshotter's warm-up of
a prefetch profile fills the chunk cache with exactly the profile's spans (compressed bytes),
so the daemon's reads of them fetch nothing; a profile of another zinfo warms nothing; the
spans of two layers are requested in the order the profiles' first_read_ms give."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.device import RegistryOptions, open_registry_layer_blob
from hybrid_erofs.fetching.background import FetchPolicy
from hybrid_erofs.fetching.profile import PrefetchProfile, dump_profile
from hybrid_erofs.fetching.warmup import ImageWarmup, profile_warm_spans, registry_target
from hybrid_erofs.gzindex.sidecar import load_sidecar
from hybrid_erofs.indexing.imageindex import layer_file_names
from hybrid_erofs.snapshotter.remote import LazyLayers, RemoteLayer
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from hybrid_erofs.trust.policy import TrustPolicy
from tests.oci_images import BIG_LAYER, TestImage, build_test_image, push_image
from tests.registry_rig import Rig

pytestmark = pytest.mark.integration

REPO = "lab/warmup"


@pytest.fixture(scope="module")
def layer(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The test image's big layer in the registry, indexed with 1 MiB spans."""
    image: TestImage = build_test_image(tmp_path_factory.mktemp("warm") / "layout")
    ref = f"{rig.hosts['plain']}/{REPO}:1.0"
    push_image(image.ref("amd64"), ref, all_platforms=False)
    out = tmp_path_factory.mktemp("index")
    result = CliRunner().invoke(main, ["index", ref, "--all-layers", "--min-layer-size", "0",
                                       "--span", "1MiB", "-o", str(out)])
    assert result.exit_code == 0, result.output
    blob = image.platforms["amd64"].layer_digests[BIG_LAYER]
    names = layer_file_names(blob)
    spans = load_sidecar(out / names["sidecar"]).spans
    assert len(spans) >= 3
    other = image.platforms["amd64"].layer_digests[0]
    return {"ref": ref, "blob": blob, "zinfo": out / names["zinfo"], "spans": spans,
            "other": {"ref": ref, "blob": other,
                      "zinfo": out / layer_file_names(other)["zinfo"]},
            "log": rig.workdir / "registry-plain.log"}


def _profile(path: Path, layer: dict[str, Any], spans: tuple[int, ...],
             zinfo_sha256: str | None = None,
             first_read_ms: tuple[int, ...] | None = None) -> Path:
    digest = zinfo_sha256 or hashlib.sha256(layer["zinfo"].read_bytes()).hexdigest()
    path.write_bytes(dump_profile(PrefetchProfile(layer["blob"], digest, spans,
                                                  first_read_ms=first_read_ms)))
    return path


def _warm(layer: dict[str, Any], prefetch: Path, options: RegistryOptions, *,
          warmup: ImageWarmup | None = None) -> ImageWarmup:
    warmup = warmup or ImageWarmup()
    warmup.add(layer["blob"], profile_warm_spans(layer["blob"], zinfo=layer["zinfo"],
                                                 prefetch=prefetch),
               registry_target(layer["ref"], layer["blob"], options))
    return warmup


def _cache(layer: dict[str, Any], options: RegistryOptions) -> ChunkCacheSource:
    cache, _digest = open_registry_layer_blob(
        layer["ref"], RegistryOptions(blob=layer["blob"], cache_dir=options.cache_dir))
    assert isinstance(cache, ChunkCacheSource)
    return cache


@pytest.mark.parametrize("chosen", [(2, 0), (0, 1)], ids=["backward", "forward"])
def test_warmup_fetches_exactly_the_profile_spans(layer: dict[str, Any], tmp_path: Path,
                                                  chosen: tuple[int, int]) -> None:
    options = RegistryOptions(cache_dir=tmp_path / "cache")
    warmup = _warm(layer, _profile(tmp_path / "p.json", layer, chosen), options)
    warmup.join(60)
    assert warmup.fetched == 2
    cache = _cache(layer, options)
    try:
        spans = layer["spans"]
        for number in chosen:  # what the daemon reads of them comes from disk
            span = spans[number]
            with cache.exact_reads():
                cache.pread(span.length, span.offset)
        assert cache.stats.inner_reads == 0 and cache.stats.misses == 0
        # and nothing else was fetched (no readahead past a span): of the other span, only
        # a chunk shared with a profile span is there
        other = spans[({0, 1, 2} - set(chosen)).pop()]
        size = cache.chunk_size
        first, last = other.offset // size, (other.offset + other.length - 1) // size
        shared = {n for number in chosen for n in range(
            spans[number].offset // size,
            (spans[number].offset + spans[number].length - 1) // size + 1)}
        with cache.exact_reads():
            cache.pread(other.length, other.offset)
        assert cache.stats.misses == len(set(range(first, last + 1)) - shared) > 0
    finally:
        cache.close()


def test_a_profile_of_another_zinfo_warms_nothing(layer: dict[str, Any],
                                                  tmp_path: Path) -> None:
    options = RegistryOptions(cache_dir=tmp_path / "cache")
    warmup = _warm(layer, _profile(tmp_path / "p.json", layer, (0, 1), "0" * 64), options)
    warmup.join(60)
    assert warmup.fetched == 0 and warmup.order == []
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("data"))


def test_the_snapshotter_warms_only_bound_profiles_with_background_fetch(
        layer: dict[str, Any], tmp_path: Path) -> None:
    profile = str(_profile(tmp_path / "p.json", layer, (0,)))
    base = RemoteLayer(source=layer["ref"], blob=layer["blob"], meta="m",
                       zinfo=str(layer["zinfo"]), index="i", restricted=False, prefetch=profile)
    options = RegistryOptions(cache_dir=tmp_path / "cache")
    lazy = LazyLayers(registry=options, policy=TrustPolicy())
    off = LazyLayers(registry=options, policy=TrustPolicy(), fetch=None)
    image = "sha256:" + "1" * 64
    assert off._warm_up(base, image) is None
    assert lazy._warm_up(replace(base, prefetch=None), image) is None
    assert lazy._warm_up(replace(base, restricted=True), image) is None
    warmup = lazy._warm_up(base, image)
    assert warmup is not None and warmup.workers == FetchPolicy().workers
    warmup.join(60)
    assert warmup.fetched == 1
    assert lazy._warm_up(base, image) is warmup  # one per image: its layers share it


def _blob_gets(log: Path, since: int) -> list[str]:
    """Digests of the blob GETs in the registry's access log from line `since` on, in order,
    repeats of the same blob in a row taken as one (a span may take several requests)."""
    found: list[str] = []
    for line in log.read_text(errors="replace").splitlines()[since:]:
        match = re.search(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP', line)
        if match and (not found or found[-1] != match[1]):
            found.append(match[1])
    return found


def test_two_layers_spans_are_requested_in_first_read_order(layer: dict[str, Any],
                                                              tmp_path: Path) -> None:
    options = RegistryOptions(cache_dir=tmp_path / "cache")
    other = layer["other"]
    big = _profile(tmp_path / "big.json", layer, (2, 0, 1), first_read_ms=(0, 300, 310))
    small = _profile(tmp_path / "small.json", other, (0,), first_read_ms=(120,))
    since = len(layer["log"].read_text(errors="replace").splitlines())
    warmup = ImageWarmup(workers=1)
    spans = profile_warm_spans(other["blob"], zinfo=other["zinfo"], prefetch=small)
    _warm(layer, big, options, warmup=warmup)
    # added while the big layer's first span is on its way: its span comes next
    warmup.add(other["blob"], spans, registry_target(other["ref"], other["blob"], options))
    warmup.join(60)
    assert warmup.fetched == 4
    assert [span.layer for span in warmup.order] == [layer["blob"], other["blob"],
                                                      layer["blob"], layer["blob"]]
    time.sleep(0.5)  # the registry writes its access log line after the response
    gets = [d for d in _blob_gets(layer["log"], since) if d in (layer["blob"], other["blob"])]
    assert gets == [layer["blob"], other["blob"], layer["blob"]], gets
