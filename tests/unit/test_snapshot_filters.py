"""containerd's filter language as its metadata layer and ctr send it to a snapshotter's List."""

from __future__ import annotations

import pytest

from hybrid_erofs.errors import SnapshotInvalid
from hybrid_erofs.snapshotter.filters import (
    Field,
    matches,
    parse_filter,
    parse_filters,
    snapshot_fields,
)

REF = "containerd.io/snapshot.ref"
CHAIN = "sha256:" + "ab" * 32


def _fields(name: str = "k8s.io/3/x", parent: str = "", kind: str = "committed",
            labels: dict[str, str] | None = None) -> Field:
    return snapshot_fields(name=name, parent=parent, kind=kind, labels=labels or {})


def test_the_filter_containerds_metadata_layer_sends() -> None:
    # metadata/snapshot.go: fmt.Sprintf(`labels."containerd.io/snapshot.ref"==%s,parent==%q`)
    text = f'labels."{REF}"=={CHAIN},parent==""'
    (selectors,) = parse_filters([text])
    assert [s.fieldpath for s in selectors] == [("labels", REF), ("parent",)]
    assert matches((selectors,), _fields(labels={REF: CHAIN}))
    assert not matches((selectors,), _fields(labels={REF: CHAIN}, parent="p"))
    assert not matches((selectors,), _fields(labels={REF: "sha256:" + "cd" * 32}))
    assert not matches((selectors,), _fields())
    parent = "k8s.io/12/sha256:" + "ef" * 32
    (selectors,) = parse_filters([f'labels."{REF}"=={CHAIN},parent=="{parent}"'])
    assert matches((selectors,), _fields(labels={REF: CHAIN}, parent=parent))


@pytest.mark.parametrize(("text", "field", "expected"), [
    ("kind==committed", {}, True),
    ("kind==active", {}, False),
    ("kind!=active", {}, True),
    ("name~=^k8s", {}, True),
    ("name~=/^k8s.io\\/3/", {}, True),  # the quote escaped inside; \\. would be illegal
    ("name~=|3/x$|", {}, True),
    ("labels.a", {"labels": {"a": ""}}, True),
    ("labels.a", {}, False),
    ("labels.a!=x", {}, True),            # absent != x is true, as containerd
    ('labels.a==""', {"labels": {"a": ""}}, True),
    ('labels."a.b.c"==v', {"labels": {"a.b.c": "v"}}, True),
    ("labels.a.b.c==v", {"labels": {"a.b.c": "v"}}, True),  # path joined with dots
    ('name=="k8s.io/3/x"', {}, True),
    ('name=="k8s.io\\x2f3/x"', {}, True),  # Go escapes in quoted values
    ("  kind == committed , name ~= x ", {}, True),
    ("unknown==x", {}, False),
    ("parent", {}, True),                 # present, even when empty
])
def test_selectors(text: str, field: dict[str, dict[str, str]], expected: bool) -> None:
    fields = _fields(labels=field.get("labels"))
    assert matches((parse_filter(text),), fields) is expected


def test_several_filters_match_when_any_does_and_none_match_all() -> None:
    filters = parse_filters(["kind==active", "name==k8s.io/3/x"])
    assert matches(filters, _fields())
    assert matches((), _fields())
    assert matches(parse_filters([""]), _fields())


@pytest.mark.parametrize("text", ["==x", "kind=x", "kind==", "name~=/^k8s\\.io/", 'name=="open', "name~=/(/",
                                  'name=="\\q"', "kind==a b", "labels.", ".kind==x"])
def test_malformed_filters_are_invalid_argument(text: str) -> None:
    with pytest.raises(SnapshotInvalid) as info:
        parse_filter(text)
    assert info.value.code == "INVALID_ARGUMENT"
    assert repr(text) in str(info.value)
