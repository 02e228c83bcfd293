"""BackgroundFetcher over a real indexed layer: order (profile spans first, then by offset),
pausing for on-demand reads, rate, retries, the cache limit, and the check of the complete
layer (trust/verifier.py) closing the gate (EIO) on a mismatch."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import random
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hybrid_erofs.errors import LayerVerificationError, SourceIOError
from hybrid_erofs.fetching.background import BackgroundFetcher, FetchPolicy
from hybrid_erofs.gzindex.format import parse_index
from hybrid_erofs.gzindex.sidecar import Sidecar, load_sidecar, sidecar_path
from hybrid_erofs.gzindex.source import GzipSource
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.source import ByteSource, MemorySource
from hybrid_erofs.sources.gate import GateSource
from hybrid_erofs.sources.layerstore import LayerStore
from hybrid_erofs.sources.stored import StoredLayerSource
from hybrid_erofs.sources.verify import VerifiedSource
from hybrid_erofs.trust.verifier import LayerIndexFiles, verify_layer

from ..doubles import CountingSource

FAST = FetchPolicy(delay_s=0.0, idle_s=0.05, rate=None, workers=2, retry_s=0.01)


def _tar() -> bytes:
    rng = random.Random(7)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n in range(40):
            data = (rng.randbytes(rng.randrange(1000, 60000)) if n % 3 == 0 else
                    b"text %d " % n * rng.randrange(100, 20000))
            info = tarfile.TarInfo(f"dir{n % 4}/file{n}")
            info.size, info.mtime = len(data), 1700000000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Indexed:
    blob: bytes
    layer_data: bytes
    zinfo: Path
    meta: Path
    sidecar: Sidecar

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Indexed:
    tmp = tmp_path_factory.mktemp("layer")
    data = _tar()
    blob = gzip.compress(data, 6, mtime=0)
    (tmp / "layer.tar.gz").write_bytes(blob)
    zinfo, meta = tmp / "layer.zinfo", tmp / "meta.erofs"
    index_layer(str(tmp / "layer.tar.gz"), zinfo=zinfo, meta=meta, span=64 << 10)
    return Indexed(blob, data, zinfo, meta, load_sidecar(sidecar_path(zinfo)))


def _stack(indexed: Indexed, store_dir: Path, blob: ByteSource | None = None
           ) -> tuple[StoredLayerSource, CountingSource]:
    counting = blob if isinstance(blob, CountingSource) else CountingSource(indexed.blob)
    index = parse_index(indexed.zinfo.read_bytes(), name="zinfo", blob_size=len(indexed.blob))
    verified = VerifiedSource(counting, indexed.sidecar.spans)
    gz = GzipSource(verified, index, size=indexed.sidecar.layer_size)
    store = LayerStore(store_dir, size=gz.size, starts=[cp.out_offset for cp in index.checkpoints])
    return StoredLayerSource(gz, store), counting


def _check(indexed: Indexed, layer: StoredLayerSource, *, digest: str | None = None,
           zinfo: Path | None = None) -> Callable[[], None]:
    """What LayerMount hands the fetcher: trust/verifier.py over the complete blob."""
    def check() -> None:
        result = verify_layer(MemorySource(indexed.blob),
                              LayerIndexFiles(indexed.meta, zinfo or indexed.zinfo),
                              blob_digest=digest or indexed.digest)
        if not result.ok:
            raise LayerVerificationError(result.summary())
    return check


def test_fetches_every_span_in_order_then_verifies(indexed: Indexed, tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    total = layer.store.span_count
    assert total >= 8
    fetcher = BackgroundFetcher(layer, policy=FAST, verify=_check(indexed, layer))
    fetcher.start()
    assert fetcher.join(30)
    progress = fetcher.progress()
    assert (progress.state, progress.spans_local, progress.spans_total) == ("verified", total, total)
    assert progress.complete and progress.verified and progress.bytes_fetched > 0
    assert fetcher.order == list(range(total))
    assert layer.pread(layer.size, 0) == indexed.layer_data
    layer.close()
    again, counting = _stack(indexed, tmp_path)
    assert again.store.verified  # recorded: a later mount needs neither fetch nor check
    fetcher = BackgroundFetcher(again, policy=FAST, verify=lambda: pytest.fail("checked twice"))
    fetcher.start()
    assert fetcher.join(10) and fetcher.progress().state == "verified"
    assert counting.calls == []
    again.close()


def test_profile_spans_come_first(indexed: Indexed, tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    total = layer.store.span_count
    first = [total - 1, 3, 5, 3, total + 7]  # duplicates and strangers are dropped
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, workers=1), first=first)
    fetcher.start()
    assert fetcher.join(30)
    assert fetcher.order[:3] == [total - 1, 3, 5]
    assert sorted(fetcher.order) == list(range(total))
    assert fetcher.progress().state == "complete"  # no verifier given
    layer.close()


def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_following_a_warm_up_loads_each_profile_span_once_it_is_there(
        indexed: Indexed, tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    arrived: set[int] = set()
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, workers=1, follow_s=60.0),
                                first=[4, 2], present=arrived.__contains__)
    fetcher.start()
    time.sleep(0.3)
    assert fetcher.order == [] and fetcher.progress().state == "prefetching"
    # a reader never waits on the warm-up: it fetches what it needs
    length, start = layer.store.span_range(6)
    assert layer.pread(length, start) == indexed.layer_data[start:start + length]
    arrived.add(4)
    _until(lambda: fetcher.order == [4])
    time.sleep(0.2)
    assert fetcher.order == [4]  # span 2 has not come yet
    arrived.add(2)
    assert fetcher.join(30)
    assert fetcher.order[:2] == [4, 2] and fetcher.progress().spans_local == layer.store.span_count
    layer.close()


def test_a_follower_fetches_itself_when_the_warm_up_brings_nothing(indexed: Indexed,
                                                                     tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    started = time.monotonic()
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, workers=1, follow_s=0.3),
                                first=[4, 2], present=lambda number: False)
    fetcher.start()
    _until(lambda: len(fetcher.order) > 0)
    assert time.monotonic() - started >= 0.3
    assert fetcher.join(30)
    assert fetcher.order[:2] == [4, 2] and fetcher.progress().state == "complete"
    layer.close()


def test_readers_ahead_work_is_held_during_the_profile_spans_only(indexed: Indexed,
                                                                   tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    total = layer.store.span_count
    log: list[str] = []

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        log.append(f"held at {len(fetcher.order)}")
        yield
        log.append(f"released at {len(fetcher.order)}")

    fetcher = BackgroundFetcher(layer, policy=replace(FAST, workers=1), first=[2, 1],
                                held=held)
    fetcher.start()
    assert fetcher.join(30) and len(fetcher.order) == total
    assert log == ["held at 0", "released at 2"]
    layer.close()


def test_on_demand_reads_pause_the_fetch(indexed: Indexed, tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    reads = [0]
    busy = threading.Event()
    busy.set()

    def reader() -> None:
        while busy.is_set():
            reads[0] += 1
            time.sleep(0.01)

    thread = threading.Thread(target=reader)
    thread.start()
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, idle_s=0.1),
                                activity=lambda: reads[0])
    fetcher.start()
    time.sleep(0.5)
    assert fetcher.order == []  # reads keep coming: nothing fetched
    busy.clear()
    thread.join()
    assert fetcher.join(30) and fetcher.progress().complete
    layer.close()


def test_quiet_period_and_rate_bound_the_fetch(indexed: Indexed, tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    compressed = len(indexed.blob)
    started = time.monotonic()
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, delay_s=0.3, rate=compressed * 2))
    fetcher.start()
    time.sleep(0.15)
    assert fetcher.progress().state == "waiting" and fetcher.order == []
    assert fetcher.join(30)
    assert time.monotonic() - started >= 0.3 + 0.4  # the rate allows the blob in 0.5 s
    layer.close()


class _Flaky(CountingSource):
    """Fails reads at or after `offset` transiently `failures` times, or for good."""

    def __init__(self, data: bytes, offset: int, failures: int, transient: bool) -> None:
        super().__init__(data)
        self.offset, self.failures, self.transient = offset, failures, transient

    def pread(self, length: int, offset: int) -> bytes:
        if offset + length > self.offset and self.failures > 0:
            self.failures -= 1
            raise SourceIOError("registry went away", transient=self.transient)
        return super().pread(length, offset)


def test_transient_failures_are_retried(indexed: Indexed, tmp_path: Path) -> None:
    flaky = _Flaky(indexed.blob, len(indexed.blob) // 2, failures=2, transient=True)
    layer, _ = _stack(indexed, tmp_path, flaky)
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, workers=1))
    fetcher.start()
    assert fetcher.join(30) and fetcher.progress().complete
    layer.close()


def test_lasting_failures_stop_the_fetch_and_say_why(indexed: Indexed, tmp_path: Path) -> None:
    flaky = _Flaky(indexed.blob, len(indexed.blob) // 2, failures=10**6, transient=False)
    layer, _ = _stack(indexed, tmp_path, flaky)
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, workers=1))
    fetcher.start()
    assert fetcher.join(30)
    progress = fetcher.progress()
    assert progress.state == "stopped" and not progress.complete
    assert progress.reason is not None and "registry went away" in progress.reason
    layer.close()


def test_a_cache_limit_that_cannot_hold_the_layer_stops_it(indexed: Indexed,
                                                           tmp_path: Path) -> None:
    layer, counting = _stack(indexed, tmp_path)
    fetcher = BackgroundFetcher(layer, policy=FAST, limit=lambda: "the cache limit is too small")
    fetcher.start()
    assert fetcher.join(30)
    progress = fetcher.progress()
    assert (progress.state, progress.reason) == ("stopped", "the cache limit is too small")
    assert counting.calls == [] and progress.spans_local == 0
    layer.close()


def test_stop_ends_a_fetch_in_its_quiet_period(indexed: Indexed, tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    fetcher = BackgroundFetcher(layer, policy=replace(FAST, delay_s=60))
    fetcher.start()
    started = time.monotonic()
    fetcher.stop()
    assert time.monotonic() - started < 5 and fetcher.order == []
    layer.close()


@pytest.mark.parametrize("case", ["tampered-blob", "index-differs"])
def test_a_complete_layer_that_fails_its_check_fails_every_read(
        indexed: Indexed, tmp_path: Path, case: str) -> None:
    layer, _ = _stack(indexed, tmp_path)
    gate = GateSource(layer)
    assert gate.pread(100, 0) == indexed.layer_data[:100]
    if case == "tampered-blob":  # the blob is not the one the manifest names
        check = _check(indexed, layer, digest="sha256:" + "0" * 64)
    else:  # the zinfo in use differs from the one the blob gives (a window byte changed)
        other = tmp_path / "other.zinfo"
        raw = bytearray(indexed.zinfo.read_bytes())
        raw[-100] ^= 0xFF
        other.write_bytes(bytes(raw))
        check = _check(indexed, layer, zinfo=other)
    fetcher = BackgroundFetcher(layer, policy=FAST, verify=check, on_failure=gate.close_gate)
    fetcher.start()
    assert fetcher.join(30)
    progress = fetcher.progress()
    assert progress.state == "failed" and not progress.verified
    assert progress.reason
    with pytest.raises(OSError) as caught:
        gate.pread(100, 0)
    assert caught.value.errno == 5
    starts = [cp.out_offset for cp in layer.inner.index.checkpoints]
    layer.close()
    again = LayerStore(tmp_path, size=layer.size, starts=starts)
    assert again.complete and not again.verified  # nothing recorded as verified
    again.close()


def test_the_check_passes_a_layer_that_is_what_its_index_says(indexed: Indexed,
                                                                tmp_path: Path) -> None:
    layer, _ = _stack(indexed, tmp_path)
    _check(indexed, layer)()  # all well
    layer.close()


@pytest.mark.parametrize("policy", [FetchPolicy(delay_s=1.5, rate=1000), None,
                                    FetchPolicy(delay_s=0.0, rate=None),
                                    FetchPolicy(rate=1000, follow_s=5.0)], ids=str)
def test_the_policy_reaches_the_daemon_and_a_reattach(policy: FetchPolicy | None) -> None:
    import click
    from click.testing import CliRunner

    from hybrid_erofs.cli.options import fetch_options

    argv = FetchPolicy.argv(policy)
    assert FetchPolicy.from_argv(argv) == policy
    got: list[FetchPolicy | None] = []

    @click.command()
    @fetch_options
    def probe(fetch: FetchPolicy | None) -> None:
        got.append(fetch)

    if policy is None or policy.rate is not None:  # the CLI always has a rate
        result = CliRunner().invoke(probe, argv)
        assert result.exit_code == 0, result.output
        assert got == [policy]
    assert FetchPolicy.from_argv(()) == FetchPolicy()  # records from before: the default


def test_a_restart_does_not_follow_a_warm_up_that_is_gone() -> None:
    """A daemon that followed the snapshotter's warm-up does not keep the flag in its
    record, and a restart from a record of an earlier release that kept it drops it."""
    policy = FetchPolicy(delay_s=2.0, rate=1000, follow_s=5.0)
    unfollowed = FetchPolicy(delay_s=2.0, rate=1000)
    assert "--_follow-warmup" not in FetchPolicy.recorded(policy)
    assert FetchPolicy.restored(FetchPolicy.recorded(policy)) == unfollowed
    assert FetchPolicy.restored(FetchPolicy.argv(policy)) == unfollowed  # an older record
    assert FetchPolicy.restored(FetchPolicy.recorded(None)) is None
    assert FetchPolicy.restored(()) == FetchPolicy()


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="'workers' must be >= 1"):
        FetchPolicy(workers=0)
    with pytest.raises(ValueError, match="'rate' must be >= 1"):
        FetchPolicy(rate=0)
