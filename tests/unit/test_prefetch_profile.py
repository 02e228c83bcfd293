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


@pytest.mark.parametrize("raw, message", [
    (b"not json", "malformed prefetch profile"),
    (b'{"format": "other"}', "not a prefetch profile"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 9}', "version 9"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 1, "blob": "x", '
     b'"zinfo_sha256": "y", "spans": [1, -2]}', "'spans' must be"),
    (b'{"format": "hybrid-erofs/prefetch-profile", "version": 1, "spans": []}',
     "malformed prefetch profile"),
], ids=["json", "format", "version", "negative-span", "missing-field"])
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
