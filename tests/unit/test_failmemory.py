"""FailureMemorySource: a failed range fails at once for its lifetime, other ranges are still
tried, several failures in a row open the circuit until one probe succeeds; with the chunk cache
above and retries below, concurrent readers of a dead range cost one retry budget in all."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.source import MemorySource, check_range
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from hybrid_erofs.sources.failmemory import FailureMemorySource, FailureStats
from hybrid_erofs.sources.retry import RetrySource
from tests.doubles import CountingSource

DATA = bytes(range(256)) * 4096  # 1 MiB


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class DeadSource(CountingSource):
    """Fails every read (transiently) while `dead`, optionally only inside `bad` ranges."""

    def __init__(self, data: bytes, *, bad: list[range] | None = None) -> None:
        super().__init__(data)
        self.dead = True
        self.bad = bad

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if self.dead and (self.bad is None or any(offset < r.stop and r.start < offset + length
                                                  for r in self.bad)):
            with self._lock:
                self.calls.append((length, offset))
            raise SourceIOError(f"dead: {length} bytes at {offset}", transient=True)
        return super().pread(length, offset)


def test_a_failed_range_fails_at_once_until_its_time_is_up() -> None:
    clock = Clock()
    inner = DeadSource(DATA, bad=[range(0, 4096)])
    source = FailureMemorySource(inner, name="blob", ttl_s=5.0, clock=clock)
    with pytest.raises(SourceIOError, match="dead"):
        source.pread(4096, 0)
    for offset in (0, 100, 4095):  # every page of it, at once, without asking inner
        with pytest.raises(SourceIOError, match=r"bytes 0-4095 failed \(dead.*next try in 5.0 s"):
            source.pread(1, offset)
    assert len(inner.calls) == 1
    assert source.pread(4096, 8192) == DATA[8192:12288]  # another range is still tried
    clock.now += 5.0
    inner.dead = False
    assert source.pread(4096, 0) == DATA[:4096]  # its time is up: tried again, and it works
    assert source.stats == FailureStats(failures=1, fast_failures=3, circuit_opened=0)


def test_failures_in_a_row_open_the_circuit_until_a_probe_succeeds() -> None:
    clock = Clock()
    inner = DeadSource(DATA)
    source = FailureMemorySource(inner, ttl_s=5.0, open_after=3, clock=clock)
    for offset in (0, 100_000, 200_000):
        with pytest.raises(SourceIOError, match="dead"):
            source.pread(4096, offset)
    asked = len(inner.calls)
    with pytest.raises(SourceIOError, match="the last 3 reads failed .*next try in 5.0 s"):
        source.pread(4096, 500_000)  # a range never tried: the circuit is open
    assert len(inner.calls) == asked == 3
    clock.now += 5.0
    with pytest.raises(SourceIOError, match="dead"):
        source.pread(4096, 600_000)  # the probe: still dead, open again
    with pytest.raises(SourceIOError, match="next try in 5.0 s"):
        source.pread(4096, 700_000)
    assert len(inner.calls) == 4
    clock.now += 5.0
    inner.dead = False
    assert source.pread(4096, 0) == DATA[:4096]  # the probe succeeds: everything forgotten
    assert source.pread(4096, 100_000) == DATA[100_000:104_096]
    assert source.stats.circuit_opened == 1


class Held(MemorySource):
    """Reads block until released, then succeed (or raise SourceIOError when `dead`)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = 0
        self.dead = False

    def pread(self, length: int, offset: int) -> bytes:
        self.calls += 1
        self.entered.set()
        self.release.wait(5)
        if self.dead:
            raise SourceIOError("held: still dead")
        return super().pread(length, offset)


def _probing(source: FailureMemorySource, held: Held) -> tuple[threading.Thread, list[object]]:
    """Start the circuit's probe in a thread (it blocks in `held`) and, once it runs, a second
    reader of another range; returns that reader and where its outcome lands."""
    source.inner = held
    prober = threading.Thread(target=_try, args=(source, 10, 0, []))
    prober.start()
    assert held.entered.wait(5)
    outcome: list[object] = []
    reader = threading.Thread(target=_try, args=(source, 10, 50, outcome))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not outcome  # it waits for the probe...
    assert held.calls == 1  # ...without a request of its own
    return reader, outcome


def _try(source: FailureMemorySource, length: int, offset: int, outcome: list[object]) -> None:
    try:
        outcome.append(source.pread(length, offset))
    except SourceIOError as exc:
        outcome.append(exc)


def _open_circuit(clock: Clock) -> FailureMemorySource:
    source = FailureMemorySource(DeadSource(DATA), ttl_s=1.0, open_after=1, clock=clock)
    with pytest.raises(SourceIOError):
        source.pread(10, 0)
    clock.now += 1.0
    return source


def test_reads_during_the_probe_wait_for_it_and_share_its_success() -> None:
    """One probe at a time; a read that comes while it runs is served once it succeeds (the
    registry is back: no read fails for being second)."""
    source = _open_circuit(Clock())
    held = Held(DATA)
    reader, outcome = _probing(source, held)
    held.release.set()
    reader.join(5)
    assert outcome == [DATA[50:60]]
    assert held.calls == 2  # the probe, then the waiting read once the circuit closed


def test_reads_during_a_failing_probe_fail_at_once_after_it() -> None:
    source = _open_circuit(Clock())
    held = Held(DATA)
    held.dead = True
    reader, outcome = _probing(source, held)
    held.release.set()
    reader.join(5)
    [error] = outcome
    assert isinstance(error, SourceIOError) and "not fetching" in str(error)
    assert held.calls == 1  # the circuit is open again: no request of its own


def test_zero_ttl_remembers_nothing_and_caller_bugs_pass() -> None:
    inner = DeadSource(DATA)
    source = FailureMemorySource(inner, ttl_s=0)
    for _ in range(3):
        with pytest.raises(SourceIOError, match="dead"):
            source.pread(10, 0)
    assert len(inner.calls) == 3
    with pytest.raises(ValueError):
        FailureMemorySource(MemorySource(DATA)).pread(10, len(DATA))
    with pytest.raises(ValueError, match="'ttl_s' must be >= 0"):
        FailureMemorySource(inner, ttl_s=-1)
    with pytest.raises(ValueError, match="'open_after' must be >= 1"):
        FailureMemorySource(inner, open_after=0)


def test_concurrent_readers_of_a_dead_range_cost_one_retry_budget(tmp_path: Path) -> None:
    """The stack of a registry layer below VerifiedSource: 8 readers of one range while the
    inner source fails everything get EIO after one budget of 3 tries, then recover."""
    clock = Clock()
    inner = DeadSource(DATA)
    retried = RetrySource(inner, attempts=3, delay_s=0.01, sleep=lambda s: None)
    remembered = FailureMemorySource(retried, ttl_s=60.0, clock=clock)
    cache = ChunkCacheSource(remembered, key="sha256:" + "fa" * 32, cache_dir=tmp_path,
                             chunk_size=65536, readahead=0)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def reader() -> None:
        start.wait()
        for offset in range(0, 65536, 4096):  # page by page, as the kernel retries
            try:
                cache.pread(4096, offset)
            except SourceIOError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    try:
        assert len(errors) == 8 * 16
        assert len(inner.calls) == 3  # one budget, shared by every reader and page
        assert retried.stats.retries == 2 and retried.stats.gave_up == 1
        inner.dead = False
        clock.now += 60.0
        assert cache.pread(4096, 0) == DATA[:4096]
    finally:
        cache.close()


def test_one_log_line_per_failure_and_the_eios_it_causes_marked(
        caplog: pytest.LogCaptureFixture) -> None:
    from hybrid_erofs.errors import already_logged

    clock = Clock()
    source = FailureMemorySource(DeadSource(DATA), ttl_s=5.0, open_after=3, clock=clock)
    caused = []
    for _ in range(10):  # the kernel asking again, page by page
        with pytest.raises(SourceIOError) as caught:
            source.pread(4096, 0)
        caused.append(caught.value)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "bytes 0-4095 failed" in warnings[0]
    assert all(already_logged(exc) for exc in caused)  # exporters log them at debug
