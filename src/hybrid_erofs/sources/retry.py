"""RetrySource: re-issue failed reads of the source below it.

Place it directly above the network source and *below* ChunkCacheSource, so cache hits never
pay for retries and a retried miss is cached once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SourceIOError, is_transient
from ..metrics.samples import Sample, counter
from ..source import ByteSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryStats:
    """Counters of one RetrySource since it was opened."""

    retries: int  # tries after a transient failure
    gave_up: int  # reads that failed for good (attempts or deadline spent, or not transient)


class RetrySource:
    """Retry transient failures of `inner.pread` with exponential back-off and full jitter.

    The n-th retry waits `rng() * min(max_delay_s, delay_s * 2**(n-1))` (AWS "full jitter"),
    or the server's Retry-After (`exc.retry_after_s`, DS:902) when that is longer. Errors that
    are not transient are raised at once. When `attempts` or `deadline_s` run out, the last
    error is re-raised wrapped in a SourceIOError marked *not* transient, so retry layers
    stacked above do not multiply the attempts. Thread-safe if `inner` is.

    Args:
        inner: the source to protect; owned, closed by `close()`.
        attempts: total tries per read, including the first (default 5).
        delay_s: back-off cap for the first retry, doubled each time (default 0.2).
        max_delay_s: the largest back-off between two tries (default 5).
        deadline_s: total time budget per read, waits included (default 60); a Retry-After
            that would overrun it fails the read at once.
        sleep, clock, rng: injectable `time.sleep`, `time.monotonic`, `random.random`.
    """

    def __init__(
        self,
        inner: ByteSource,
        *,
        attempts: int = 5,
        delay_s: float = 0.2,
        max_delay_s: float = 5.0,
        deadline_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"'attempts' must be >= 1 (got {attempts})")
        for name, value in (("delay_s", delay_s), ("max_delay_s", max_delay_s),
                            ("deadline_s", deadline_s)):
            if value < 0:
                raise ValueError(f"'{name}' must be >= 0 (got {value})")
        self.inner = inner
        self._attempts, self._delay_s, self._max_delay_s = attempts, delay_s, max_delay_s
        self._deadline_s = deadline_s
        self._sleep, self._clock, self._rng = sleep, clock, rng
        self._lock = threading.Lock()
        self._counts = [0, 0]  # RetryStats fields, in order

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def stats(self) -> RetryStats:
        with self._lock:
            return RetryStats(*self._counts)

    def pread(self, length: int, offset: int) -> bytes:
        started = self._clock()
        attempt = 1
        while True:
            try:
                return self.inner.pread(length, offset)
            except Exception as exc:
                if not is_transient(exc):
                    self._count(gave_up=isinstance(exc, SourceIOError))
                    raise
                wait_s = self._wait_s(exc, attempt)
                elapsed_s = self._clock() - started
                if attempt >= self._attempts:
                    self._count(gave_up=True)
                    raise _gave_up(exc, f"after {attempt} attempts") from exc
                if elapsed_s + wait_s > self._deadline_s:
                    self._count(gave_up=True)
                    raise _gave_up(
                        exc, f"after {attempt} attempts: next try in {wait_s:.1f} s would pass "
                             f"the {self._deadline_s:g} s deadline") from exc
                log.debug("retry %d/%d in %.2f s for %d bytes at %d after: %s",
                          attempt, self._attempts - 1, wait_s, length, offset, exc)
            self._sleep(wait_s)
            attempt += 1
            self._count(retries=1)

    def _wait_s(self, exc: BaseException, attempt: int) -> float:
        backoff_s = min(self._max_delay_s, self._delay_s * 2.0 ** (attempt - 1))
        wait_s = self._rng() * backoff_s
        retry_after_s = getattr(exc, "retry_after_s", None)
        if isinstance(retry_after_s, int | float) and retry_after_s > wait_s:
            wait_s = float(retry_after_s)
        return wait_s

    def metric_samples(self) -> list[Sample]:
        stats = self.stats
        return [counter("registry_retries", stats.retries,
                        "Registry reads tried again after a transient failure"),
                counter("registry_failures", stats.gave_up,
                        "Registry reads that failed for good (retries spent, or permanent)")]

    def _count(self, *, retries: int = 0, gave_up: int = 0) -> None:
        with self._lock:
            self._counts[0] += retries
            self._counts[1] += gave_up

    def close(self) -> None:
        self.inner.close()


def _gave_up(exc: BaseException, why: str) -> SourceIOError:
    return SourceIOError(f"{exc} (gave up {why})", transient=False)
