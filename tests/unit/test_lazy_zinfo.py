"""Profile zinfos and LazyWindows (gzindex/lazy.py): the profile zinfo's format, the check of the
full zinfo against it, reads through a GzipSource started on it (right bytes; a window that is
not real waits for the full zinfo; a full zinfo that disagrees fails for good, once), the
background fetch's hook after the profile's spans, and the bound annotations and daemon
arguments that carry it (trust/bound.py)."""

from __future__ import annotations

import gzip
import io
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from hybrid_erofs.errors import IndexFormatError, RegistryError, SourceIOError, TrustError
from hybrid_erofs.fetching.background import BackgroundFetcher, FetchPolicy
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import (
    WINDOW_SIZE,
    ZERO_WINDOW,
    GzipIndex,
    dump_index,
    parse_index,
)
from hybrid_erofs.gzindex.lazy import LazyWindows, check_profile_index, profile_index
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.indexing.imageindex import ZINFO_GZIP_MEDIA_TYPE, ZINFO_MEDIA_TYPE, FileRef
from hybrid_erofs.oci.client import Descriptor
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.layerstore import LayerStore
from hybrid_erofs.sources.stored import StoredLayerSource
from hybrid_erofs.trust.bound import (
    ZinfoLater,
    bound_prefetch,
    bound_prefetch_zinfo,
    bound_transit,
    layer_annotations,
)

from .test_gzip_source import mixed

DATA = mixed(3, 3 << 20)
BLOB = gzip.compress(DATA, 6)
FULL = build_index(io.BytesIO(BLOB), span=128 << 10).index  # type: ignore[arg-type]
REAL = (4, 1, 7)


def _windows(full: GzipIndex = FULL, real: tuple[int, ...] = REAL,
             failures: list[str] | None = None, errors: list[Exception] | None = None
             ) -> tuple[LazyWindows, list[int]]:
    loads: list[int] = []

    def load() -> GzipIndex:
        loads.append(1)
        if errors:
            raise errors.pop(0)
        return full

    windows = LazyWindows(profile_index(FULL, real), real, load=load,
                          on_failure=None if failures is None else failures.append,
                          name="layer.zinfo")
    return windows, loads


def test_a_profile_zinfo_keeps_the_table_and_only_the_profile_windows() -> None:
    assert len(FULL) >= 10
    profile = profile_index(FULL, REAL)
    again = parse_index(dump_index(profile), name="p")  # a valid zinfo v2
    assert again == profile
    for number, (have, want) in enumerate(zip(profile.checkpoints, FULL.checkpoints,
                                              strict=True)):
        assert (have.in_offset, have.out_offset, have.bits) == (
            want.in_offset, want.out_offset, want.bits)
        assert have.window == (want.window if number in REAL else ZERO_WINDOW)
    # zeros are nearly free in transit
    assert len(gzip.compress(dump_index(profile))) < len(gzip.compress(dump_index(FULL))) / 2
    check_profile_index(profile, FULL, REAL, name="z")


@pytest.mark.parametrize("change", ["in", "out", "bits", "window", "count"])
def test_a_full_zinfo_that_disagrees_with_the_profile_zinfo_is_refused(change: str) -> None:
    cps = list(FULL.checkpoints)
    cp = cps[4]
    if change == "in":
        cps[4] = replace(cp, in_offset=cp.in_offset + 1)
    elif change == "out":
        cps[4] = replace(cp, out_offset=cp.out_offset + 1)
    elif change == "bits":
        cps[4] = replace(cp, bits=(cp.bits + 1) % 8)
    elif change == "window":
        cps[4] = replace(cp, window=b"x" + cp.window[1:])
    else:
        cps.pop()
    other = GzipIndex(FULL.span, tuple(cps))
    with pytest.raises(IndexFormatError, match=r"^z: .*(checkpoint 4|profile zinfo has)"):
        check_profile_index(profile_index(FULL, REAL), other, REAL, name="z")
    # a window that is not real in the profile zinfo may be anything there
    cps = list(FULL.checkpoints)
    cps[5] = replace(cps[5], window=bytes([1]) * WINDOW_SIZE)
    check_profile_index(profile_index(FULL, REAL), GzipIndex(FULL.span, tuple(cps)), REAL,
                        name="z")


def test_real_windows_come_at_once_and_the_rest_waits_for_one_load() -> None:
    windows, loads = _windows()
    assert windows.window(4) == FULL.checkpoints[4].window and not loads
    assert windows.known(5) is None and not windows.complete
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda n=n: got.append(windows.window(n)))
               for n in (5, 6, 8, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [1] and windows.complete
    assert sorted(got) == sorted(FULL.checkpoints[n].window for n in (5, 6, 8, 5))
    assert windows.known(9) == FULL.checkpoints[9].window


def test_a_full_zinfo_that_disagrees_fails_for_good_and_reports_once() -> None:
    cps = list(FULL.checkpoints)
    cps[7] = replace(cps[7], window=bytes(WINDOW_SIZE - 1) + b"!")
    failures: list[str] = []
    windows, loads = _windows(GzipIndex(FULL.span, tuple(cps)), failures=failures)
    for _ in range(2):
        with pytest.raises(SourceIOError, match="layer.zinfo: the full zinfo is refused: "
                                                ".*checkpoint 7: its window differs"):
            windows.window(5)
    assert loads == [1] and len(failures) == 1 and "checkpoint 7" in failures[0]
    assert windows.known(5) is None  # never the unchecked one


def test_a_tampered_full_zinfo_fails_and_a_transient_failure_is_tried_again() -> None:
    failures: list[str] = []
    windows, loads = _windows(failures=failures, errors=[
        RegistryError("blob: connection reset", transient=True),
        IndexFormatError("sha256:abc: blob digest mismatch")])
    with pytest.raises(SourceIOError, match="could not be fetched: blob: connection reset"):
        windows.window(5)
    assert not failures
    with pytest.raises(SourceIOError, match="refused: sha256:abc: blob digest mismatch"):
        windows.window(5)
    assert len(failures) == 1 and loads == [1, 1]
    with pytest.raises(SourceIOError):
        windows.load()
    assert loads == [1, 1]


def test_reads_through_a_profile_zinfo_are_right_and_wait_for_the_rest() -> None:
    windows, loads = _windows()
    source = GzipSource(MemorySource(BLOB), windows.index, size=len(DATA), windows=windows)
    for number in REAL:  # the profile's spans: their own windows, nothing fetched
        cp = FULL.checkpoints[number]
        end = FULL.checkpoints[number + 1].out_offset
        assert source.pread(end - cp.out_offset, cp.out_offset) == DATA[cp.out_offset:end]
    assert not loads
    start = FULL.checkpoints[9].out_offset + 100
    assert source.pread(5000, start) == DATA[start:start + 5000]  # waits for the zinfo
    assert loads == [1]
    assert source.pread(len(DATA), 0) == DATA
    source.close()


def test_a_span_is_never_decoded_with_a_window_that_is_not_the_bound_one() -> None:
    failures: list[str] = []
    bad = list(FULL.checkpoints)
    bad[9] = replace(bad[9], in_offset=bad[9].in_offset + 3)  # the table differs
    windows, _ = _windows(GzipIndex(FULL.span, tuple(bad)), failures=failures)
    source = GzipSource(MemorySource(BLOB), windows.index, size=len(DATA), windows=windows)
    start = FULL.checkpoints[9].out_offset
    for _ in range(2):
        with pytest.raises(SourceIOError, match="refused"):
            source.pread(10, start)
    assert len(failures) == 1
    cp = FULL.checkpoints[4]
    assert source.pread(10, cp.out_offset) == DATA[cp.out_offset:cp.out_offset + 10]
    source.close()


def test_the_background_fetch_loads_the_zinfo_after_the_profile_spans(tmp_path: Path) -> None:
    seen: list[list[int]] = []
    windows, _ = _windows()
    gz = GzipSource(MemorySource(BLOB), windows.index, size=len(DATA), windows=windows)
    store = LayerStore(tmp_path, size=gz.size, starts=[cp.out_offset for cp in FULL.checkpoints])
    layer = StoredLayerSource(gz, store)

    def after() -> None:
        seen.append(sorted(n for n in range(store.span_count) if store.has_span(n)))
        windows.load()

    fetcher = BackgroundFetcher(layer, policy=FetchPolicy(delay_s=0.0, idle_s=0.01, rate=None,
                                                          workers=1),
                                first=REAL, before_rest=after)
    fetcher.start()
    assert fetcher.join(30)
    assert fetcher.order[:3] == list(REAL) and seen == [sorted(REAL)]
    assert fetcher.progress().state == "complete"
    assert layer.pread(layer.size, 0) == DATA
    layer.close()


def test_the_annotations_bind_a_profile_zinfo_only_with_its_profile() -> None:
    side = FileRef("s", "sha256:" + "1" * 64, 10)
    profile = FileRef("p", "sha256:" + "2" * 64, 20)
    zinfo = FileRef("z", "sha256:" + "3" * 64, 30)
    gz = FileRef("z.gz", "sha256:" + "4" * 64, 5)
    annotations = layer_annotations(side, profile, {"prefetch_zinfo": gz},
                                    prefetch_zinfo=zinfo)
    assert bound_prefetch(annotations, layer="l") is not None
    found = bound_prefetch_zinfo(annotations, layer="l")
    assert found is not None and (found.digest, found.size) == (zinfo.digest, 30)
    assert bound_transit(annotations, layer="l")["prefetch_zinfo"].digest == gz.digest
    alone = layer_annotations(side, None, {"prefetch_zinfo": gz}, prefetch_zinfo=zinfo)
    assert bound_prefetch_zinfo(alone, layer="l") is None
    assert "prefetch_zinfo" not in bound_transit(alone, layer="l")
    bad = {**annotations, "containerd.io/snapshot/hybrid-erofs/prefetch.zinfo.size": "x"}
    with pytest.raises(TrustError, match="layer l: malformed bound profile zinfo"):
        bound_prefetch_zinfo(bad, layer="l")


def test_zinfo_later_travels_in_argv_and_json() -> None:
    later = ZinfoLater(Path("/c/p.zinfo"), Descriptor(ZINFO_GZIP_MEDIA_TYPE, "sha256:" + "a" * 64,
                                                      12),
                       Descriptor(ZINFO_MEDIA_TYPE, "sha256:" + "b" * 64, 34))
    argv = later.argv()
    assert ZinfoLater.from_argv(Path(argv[1]), argv[3]) == later
    assert ZinfoLater.from_json(later.to_json()) == later
    assert ZinfoLater.from_json(None) is None and ZinfoLater.from_argv(None, None) is None
    with pytest.raises(TrustError, match="malformed --_zinfo-blob"):
        ZinfoLater.from_argv(Path("p"), "a,b")


def test_zinfo_later_keeps_the_profile_zinfo_digest_in_argv_and_json() -> None:
    """The profile zinfo's bound digest travels to the daemon and into records, so a daemon
    started again from one checks the file as the first mount did."""
    later = ZinfoLater(Path("/c/p.zinfo"), Descriptor(ZINFO_GZIP_MEDIA_TYPE, "sha256:" + "a" * 64,
                                                      12),
                       Descriptor(ZINFO_MEDIA_TYPE, "sha256:" + "b" * 64, 34),
                       "sha256:" + "c" * 64)
    options = dict(zip(later.argv()[::2], later.argv()[1::2], strict=True))
    assert ZinfoLater.from_argv(Path(options["--_profile-zinfo"]), options["--_zinfo-blob"],
                                options["--_profile-zinfo-digest"]) == later
    assert ZinfoLater.from_json(later.to_json()) == later
    old = {k: v for k, v in later.to_json().items() if k != "profile_digest"}  # before it
    assert ZinfoLater.from_json(old) == replace(later, profile_digest=None)
    for broken in ({**old, "profile_zinfo": None}, {**old, "plain": ["m", "d", "34"]}):
        with pytest.raises(TrustError, match="malformed zinfo-later record"):
            ZinfoLater.from_json(broken)

