"""Prefetch profiles: format, refusal of bad files, use only for the zinfo they number, and
their place in index.json (listed with a digest, kept by a resumed `index --all-layers`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hybrid_erofs.errors import IndexFormatError
from hybrid_erofs.fetching.profile import (
    PrefetchProfile,
    dump_profile,
    parse_profile,
    profile_spans,
)
from hybrid_erofs.indexing.image import prefetch_ref
from hybrid_erofs.indexing.imageindex import (
    INDEXED,
    FileRef,
    ImageEntry,
    ImageIndex,
    LayerEntry,
    dump_image_index,
    parse_image_index,
)

PROFILE = PrefetchProfile(blob="sha256:" + "a" * 64, zinfo_sha256="b" * 64, spans=(7, 0, 3),
                          command=("sh", "-c", "true"))


def test_round_trip_is_deterministic() -> None:
    data = dump_profile(PROFILE)
    assert parse_profile(data, name="p") == PROFILE
    assert dump_profile(parse_profile(data, name="p")) == data


def test_first_read_times_round_trip_and_are_optional() -> None:
    timed = PrefetchProfile(PROFILE.blob, PROFILE.zinfo_sha256, (7, 0, 3),
                            first_read_ms=(0, 12, 950))
    data = dump_profile(timed)
    assert json.loads(data)["first_read_ms"] == [0, 12, 950]
    assert parse_profile(data, name="p") == timed
    assert timed.timed() == [(0.0, 7), (12.0, 0), (950.0, 3)]
    # a profile without them (an older one): its own order, by place
    assert "first_read_ms" not in json.loads(dump_profile(PROFILE))
    assert parse_profile(dump_profile(PROFILE), name="p").first_read_ms is None
    assert PROFILE.timed() == [(0.0, 7), (1.0, 0), (2.0, 3)]


def test_first_read_times_are_relative_to_the_images_first_read() -> None:
    from hybrid_erofs.fetching.record import first_read_ms

    assert first_read_ms([[10.5, 10.75], [], [10.25, 12.0]]) == [(250, 500), (), (0, 1750)]
    # a daemon that does not report them (older): no times in any profile
    assert first_read_ms([[10.5], None]) == [None, None]


@pytest.mark.parametrize("raw, message", [
    (b"not json", "malformed prefetch profile"),
    (b'{"format": "other"}', "not a prefetch profile"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 9}', "version 9"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 1, "blob": "x", '
     b'"zinfo_sha256": "y", "spans": [1, -2]}', "'spans' must be"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 1, "spans": []}',
     "malformed prefetch profile"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 1, "blob": "x", '
     b'"zinfo_sha256": "y", "spans": [1, 2], "first_read_ms": [0]}', "'first_read_ms' must be"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 1, "blob": "x", '
     b'"zinfo_sha256": "y", "spans": [1], "first_read_ms": [-1]}', "'first_read_ms' must be"),
], ids=["json", "format", "version", "negative-span", "missing-field", "times-count",
        "negative-time"])
def test_bad_profiles_are_refused_in_one_line(raw: bytes, message: str) -> None:
    with pytest.raises(IndexFormatError, match=message) as caught:
        parse_profile(raw, name="prof.json")
    assert str(caught.value).startswith("prof.json: ") and "\n" not in str(caught.value)


def test_a_profile_is_used_only_for_its_own_zinfo(tmp_path: Path) -> None:
    zinfo = tmp_path / "layer.zinfo"
    zinfo.write_bytes(b"zinfo bytes")
    own = PrefetchProfile(PROFILE.blob, hashlib.sha256(b"zinfo bytes").hexdigest(), (5, 1))
    path = tmp_path / "p.json"
    path.write_bytes(dump_profile(own))
    assert profile_spans(path, zinfo=zinfo) == (5, 1)
    assert prefetch_ref(path, zinfo_sha256=own.zinfo_sha256) is not None
    zinfo.write_bytes(b"another zinfo")
    assert profile_spans(path, zinfo=zinfo) == ()
    assert prefetch_ref(path, zinfo_sha256="0" * 64) is None
    path.write_bytes(b"garbage")
    assert profile_spans(path, zinfo=zinfo) == ()
    assert profile_spans(None, zinfo=zinfo) == ()


def _ref(name: str) -> FileRef:
    return FileRef(name, "sha256:" + "c" * 64, 10)


def test_index_json_lists_an_optional_prefetch_file() -> None:
    layer = LayerEntry(digest="sha256:" + "d" * 64, media_type="m", size=1,
                       diff_id="sha256:" + "9" * 64,
                       status=INDEXED, layer_size=2, zinfo=_ref("z"), sidecar=_ref("s"),
                       meta=_ref("m"), prefetch=_ref("p"))
    image = ImageEntry("sha256:" + "e" * 64, "mt", 3, "linux/amd64", "sha256:" + "f" * 64,
                       (layer,))
    data = dump_image_index(ImageIndex((image,), span=4096, tool="t"))
    parsed = parse_image_index(data)
    assert parsed.images[0].layers[0].prefetch == _ref("p")
    assert set(parsed.images[0].layers[0].files) == {"zinfo", "sidecar", "meta", "prefetch"}
    raw = json.loads(data)
    del raw["images"][0]["layers"][0]["files"]["prefetch"]
    assert parse_image_index(json.dumps(raw).encode()).images[0].layers[0].prefetch is None
    del raw["images"][0]["layers"][0]["files"]["meta"]
    with pytest.raises(IndexFormatError, match="needs zinfo, sidecar and meta"):
        parse_image_index(json.dumps(raw).encode())


def test_a_profile_is_bound_through_the_layer_descriptors_annotations() -> None:
    """`index --push` annotates each layer descriptor of the bound image with its profile's
    digest and size beside the sidecar's: the image digest covers the profile."""
    from hybrid_erofs.indexing.publish import _bound_manifest
    from hybrid_erofs.oci.client import Manifest
    from hybrid_erofs.trust.bound import (
        PREFETCH_DIGEST,
        PREFETCH_SIZE,
        SIDECAR_DIGEST,
        bound_prefetch,
        bound_prefetch_name,
    )

    profiled = LayerEntry(digest="sha256:" + "d" * 64, media_type="m", size=1,
                          diff_id="sha256:" + "9" * 64, status=INDEXED, layer_size=2,
                          zinfo=_ref("z"), sidecar=_ref("s"), meta=_ref("m"),
                          prefetch=FileRef("p", "sha256:" + "1" * 64, 123))
    plain = LayerEntry(digest="sha256:" + "a" * 64, media_type="m", size=1,
                       diff_id="sha256:" + "8" * 64, status=INDEXED, layer_size=2,
                       zinfo=_ref("z2"), sidecar=_ref("s2"), meta=_ref("m2"))
    image = ImageEntry("sha256:" + "e" * 64, "mt", 3, "linux/amd64", "sha256:" + "f" * 64,
                       layers=(profiled, plain))
    body = json.dumps({"schemaVersion": 2, "layers": [
        {"digest": profiled.digest, "mediaType": "m", "size": 1},
        {"digest": plain.digest, "mediaType": "m", "size": 1,
         "annotations": {"org.example": "kept"}}]}).encode()
    original = Manifest("mt", "sha256:" + hashlib.sha256(body).hexdigest(), body,
                        json.loads(body))
    new = _bound_manifest(original, image)
    assert new is not None
    first, second = json.loads(new)["layers"]
    assert first["annotations"][SIDECAR_DIGEST] == profiled.sidecar.digest  # type: ignore[union-attr]
    assert first["annotations"][PREFETCH_DIGEST] == "sha256:" + "1" * 64
    assert first["annotations"][PREFETCH_SIZE] == "123"
    assert PREFETCH_DIGEST not in second["annotations"]
    assert second["annotations"]["org.example"] == "kept"
    profile = bound_prefetch(first["annotations"], layer=profiled.digest)
    assert profile is not None and (profile.digest, profile.size) == ("sha256:" + "1" * 64, 123)
    assert bound_prefetch(second["annotations"], layer=plain.digest) is None
    # kept under its own digest: two images' profiles of one layer never replace each other
    assert bound_prefetch_name(profile.digest) == f"prefetch-sha256-{'1' * 64}.json"


@pytest.mark.parametrize("labels, message", [
    ({"containerd.io/snapshot/hybrid-erofs/prefetch.digest": "sha256:xyz",
      "containerd.io/snapshot/hybrid-erofs/prefetch.size": "10"}, "malformed bound prefetch"),
    ({"containerd.io/snapshot/hybrid-erofs/prefetch.digest": "sha256:" + "1" * 64},
     "malformed bound prefetch"),
    ({"containerd.io/snapshot/hybrid-erofs/prefetch.digest": "sha256:" + "1" * 64,
      "containerd.io/snapshot/hybrid-erofs/prefetch.size": str(1 << 30)}, "not a plausible"),
], ids=["digest", "no-size", "size"])
def test_malformed_bound_profile_annotations_are_refused(labels: dict[str, str],
                                                         message: str) -> None:
    from hybrid_erofs.errors import TrustError
    from hybrid_erofs.trust.bound import bound_prefetch

    with pytest.raises(TrustError, match=message) as caught:
        bound_prefetch(labels, layer="sha256:" + "d" * 64)
    assert str(caught.value).startswith("layer sha256:") and "\n" not in str(caught.value)
