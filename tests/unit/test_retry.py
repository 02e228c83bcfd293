"""RetrySource: back-off with full jitter, Retry-After, bounded attempts and time, no retry of
permanent errors. Sleep, clock and randomness are injected; upstream calls are counted."""

from __future__ import annotations

import pytest

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.source import MemorySource
from hybrid_erofs.sources.retry import RetrySource
from tests.doubles import CountingSource, FlakySource

DATA = bytes(range(256)) * 64


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class ScriptedSource(CountingSource):
    """Raises the given errors in order, then reads normally."""

    def __init__(self, data: bytes, errors: list[Exception]) -> None:
        super().__init__(data)
        self.errors = errors

    def pread(self, length: int, offset: int) -> bytes:
        if self.errors:
            self.calls.append((length, offset))
            raise self.errors.pop(0)
        return super().pread(length, offset)


def _retry(inner: MemorySource, clock: FakeClock, **kw: float) -> RetrySource:
    return RetrySource(inner, sleep=clock.sleep, clock=clock, rng=lambda: 1.0, **kw)  # type: ignore[arg-type]


def test_recovers_with_exponential_backoff() -> None:
    clock = FakeClock()
    flaky = FlakySource(DATA, failures=3)
    source = _retry(flaky, clock, delay_s=0.5)
    assert source.pread(10, 20) == DATA[20:30]
    assert flaky.calls == [(10, 20)] * 4
    assert clock.slept == [0.5, 1.0, 2.0]


def test_full_jitter_and_max_delay() -> None:
    clock = FakeClock()
    flaky = FlakySource(DATA, failures=4)
    source = RetrySource(flaky, attempts=5, delay_s=1.0, max_delay_s=3.0,
                         sleep=clock.sleep, clock=clock, rng=lambda: 0.25)
    assert source.pread(1, 0) == DATA[:1]
    assert clock.slept == [0.25, 0.5, 0.75, 0.75]  # 0.25 * min(3, 1, 2, 4, 8)


def test_gives_up_after_attempts_not_transient_anymore() -> None:
    clock = FakeClock()
    flaky = FlakySource(DATA, failures=10)
    source = _retry(flaky, clock, attempts=3, delay_s=0.1)
    with pytest.raises(SourceIOError) as info:
        source.pread(4, 8)
    assert len(flaky.calls) == 3
    assert "gave up after 3 attempts" in str(info.value)
    assert "flaky: read of 4 at 8 failed" in str(info.value)
    assert info.value.transient is False  # stacked retry layers must not multiply attempts
    assert isinstance(info.value.__cause__, SourceIOError)


def test_permanent_errors_are_not_retried() -> None:
    clock = FakeClock()
    flaky = FlakySource(DATA, failures=1, transient=False)
    source = _retry(flaky, clock)
    with pytest.raises(SourceIOError, match="flaky") as info:
        source.pread(1, 0)
    assert len(flaky.calls) == 1 and clock.slept == []
    assert "gave up" not in str(info.value)


def test_caller_bugs_are_not_retried() -> None:
    clock = FakeClock()
    inner = CountingSource(DATA)
    with pytest.raises(ValueError, match="outside"):
        _retry(inner, clock).pread(10, len(DATA))
    assert clock.slept == []


def test_retry_after_is_honoured() -> None:
    clock = FakeClock()
    inner = ScriptedSource(DATA, [SourceIOError("GET x: HTTP 429", transient=True,
                                                retry_after_s=7.0)])
    source = _retry(inner, clock, delay_s=0.1)
    assert source.pread(3, 3) == DATA[3:6]
    assert clock.slept == [7.0]


def test_retry_after_shorter_than_backoff_keeps_backoff() -> None:
    clock = FakeClock()
    inner = ScriptedSource(DATA, [SourceIOError("x", transient=True, retry_after_s=0.0)])
    assert _retry(inner, clock, delay_s=0.3).pread(1, 0) == DATA[:1]
    assert clock.slept == [0.3]


def test_deadline_bounds_total_time() -> None:
    clock = FakeClock()
    flaky = FlakySource(DATA, failures=100)
    source = _retry(flaky, clock, attempts=100, delay_s=1.0, max_delay_s=4.0, deadline_s=10.0)
    with pytest.raises(SourceIOError, match="deadline") as info:
        source.pread(1, 0)
    assert clock.slept == [1.0, 2.0, 4.0]  # the next 4 s wait would end at 11 s > 10 s
    assert sum(clock.slept) <= 10.0
    assert info.value.transient is False


def test_retry_after_beyond_deadline_fails_at_once() -> None:
    clock = FakeClock()
    inner = ScriptedSource(DATA, [SourceIOError("GET x: HTTP 503", transient=True,
                                                retry_after_s=3600.0)])
    with pytest.raises(SourceIOError, match="3600.0 s would pass the 60 s deadline"):
        _retry(inner, clock).pread(1, 0)
    assert clock.slept == [] and len(inner.calls) == 1


def test_arguments_checked_and_ownership() -> None:
    with pytest.raises(ValueError, match="'attempts' must be >= 1 \\(got 0\\)"):
        RetrySource(MemorySource(b"x"), attempts=0)
    with pytest.raises(ValueError, match="'deadline_s' must be >= 0"):
        RetrySource(MemorySource(b"x"), deadline_s=-1)
    inner = CountingSource(DATA)
    source = RetrySource(inner)
    assert source.size == len(DATA)
    source.close()
    assert inner.closed
