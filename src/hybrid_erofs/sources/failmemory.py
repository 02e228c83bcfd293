"""FailureMemorySource: remembers failed reads for a while, so a failing registry costs one retry
budget per range (not one per page the kernel re-reads, or per reader) and a dead one a probe.

Sits between ChunkCacheSource (above) and RetrySource (below): it sees the errors retries gave up on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SourceIOError
from ..metrics.samples import Sample, counter
from ..source import ByteSource, check_range

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 5.0
DEFAULT_OPEN_AFTER = 3
_MAX_ENTRIES = 256


@dataclass(frozen=True, slots=True)
class FailureStats:
    """Counters of one FailureMemorySource since it was opened."""

    failures: int  # reads the inner source failed (each after its retries)
    fast_failures: int  # reads refused at once because of a remembered failure
    circuit_opened: int  # times the circuit opened (several failures in a row)


@dataclass(frozen=True, slots=True)
class _Failure:
    offset: int
    end: int  # exclusive
    until: float  # clock time when the range may be tried again
    reason: str


class FailureMemorySource:
    """Fail reads at once that overlap a range whose read failed less than `ttl_s` ago.

    Two memories, both bounded in time:
    * per range: a failed read (the error RetrySource gave up with, or a permanent one) is
      remembered for `ttl_s`; reads overlapping it raise SourceIOError (not transient) at
      once, naming the first failure. Other ranges are still tried: a registry that fails
      one range keeps serving the rest.
    * circuit breaker: after `open_after` failed reads in a row with no success between,
      every read fails at once until `ttl_s` after the last failure; then a single read is
      let through as a probe, and reads that come while it runs wait for its outcome (a
      registry that is back serves them all; one still dead fails them at once). Its success
      closes the circuit and forgets every remembered failure; its failure opens it again for
      `ttl_s`.

    Errors that are not SourceIOError (a caller's ValueError) pass through unremembered.

    Args:
        inner: the retrying blob source; owned, closed by `close()`.
        name: how messages name the blob (its digest).
        ttl_s: how long a failure is remembered (default 5 s; 0 disables the memory).
        open_after: failures in a row that open the circuit (default 3).
        clock: injectable `time.monotonic`.

    Thread-safe if `inner` is.
    """

    def __init__(self, inner: ByteSource, *, name: str = "blob", ttl_s: float = DEFAULT_TTL_S,
                 open_after: int = DEFAULT_OPEN_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError(f"'ttl_s' must be >= 0 (got {ttl_s})")
        if open_after < 1:
            raise ValueError(f"'open_after' must be >= 1 (got {open_after})")
        self.inner = inner
        self._name = name
        self._ttl_s = ttl_s
        self._open_after = open_after
        self._clock = clock
        self._lock = threading.Lock()
        self._probe_done = threading.Condition(self._lock)
        self._failures: list[_Failure] = []
        self._in_a_row = 0
        self._open_until: float | None = None  # the circuit is open (or half-open after it)
        self._last_reason = ""
        self._probing = False
        self._counts = [0, 0, 0]  # FailureStats fields, in order

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def stats(self) -> FailureStats:
        with self._lock:
            return FailureStats(*self._counts)

    def metric_samples(self) -> list[Sample]:
        stats = self.stats
        return [counter("failure_memory_hits", stats.fast_failures,
                        "Reads failed at once because their range (or the registry) failed "
                        "moments ago"),
                counter("circuit_opened", stats.circuit_opened,
                        "Times several failures in a row stopped all fetches for a while")]

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if not self._ttl_s:
            return self.inner.pread(length, offset)
        probe = self._admit(length, offset)
        try:
            data = self.inner.pread(length, offset)
        except SourceIOError as exc:
            self._remember(length, offset, exc, probe)
            exc.logged = True  # _remember logged it, once
            raise
        except BaseException:
            if probe:
                with self._lock:
                    self._probing = False
                    self._probe_done.notify_all()
            raise
        if probe or self._in_a_row:
            self._succeeded(probe)
        return data

    def close(self) -> None:
        self.inner.close()

    def _admit(self, length: int, offset: int) -> bool:
        """Raise for a remembered failure; True when this read is the circuit's probe."""
        now = self._clock()
        end = offset + length
        with self._lock:
            while self._probing:  # the probe's outcome decides this read too
                self._probe_done.wait()
                now = self._clock()
            if self._open_until is not None:
                if now < self._open_until:
                    self._counts[1] += 1
                    wait_s = max(0.0, self._open_until - now)
                    raise SourceIOError(
                        f"{self._name}: not fetching bytes {offset}-{end - 1}: the last "
                        f"{self._in_a_row} reads failed ({self._last_reason}); next try in "
                        f"{wait_s:.1f} s", logged=True)
                self._probing = True
                return True
            if self._failures:
                self._failures = [f for f in self._failures if f.until > now]
                for failure in self._failures:
                    if failure.offset < end and offset < failure.end:
                        self._counts[1] += 1
                        raise SourceIOError(
                            f"{self._name}: not fetching bytes {offset}-{end - 1}: bytes "
                            f"{failure.offset}-{failure.end - 1} failed ({failure.reason}); "
                            f"next try in {failure.until - now:.1f} s", logged=True)
        return False

    def _remember(self, length: int, offset: int, exc: SourceIOError, probe: bool) -> None:
        now = self._clock()
        reason = str(exc)
        with self._lock:
            self._counts[0] += 1
            self._in_a_row += 1
            self._last_reason = reason
            self._probing = False
            self._probe_done.notify_all()
            self._failures.append(_Failure(offset, offset + length, now + self._ttl_s, reason))
            del self._failures[:-_MAX_ENTRIES]
            opened = self._open_until is None and self._in_a_row >= self._open_after
            if probe or opened:
                self._open_until = now + self._ttl_s
            if opened:
                self._counts[2] += 1
        # One line per event: a range that failed, the circuit opening (not each probe).
        if opened:
            log.warning("%s: %d reads in a row failed (last: %s); failing reads at once for "
                        "%g s, then trying one", self._name, self._in_a_row, reason,
                        self._ttl_s)
        elif probe:
            log.debug("%s: the probe failed: %s", self._name, reason)
        else:
            log.warning("%s: bytes %d-%d failed: %s; not fetched again for %g s", self._name,
                        offset, offset + length - 1, reason, self._ttl_s)

    def _succeeded(self, probe: bool) -> None:
        with self._lock:
            self._in_a_row = 0
            if probe:
                self._probing = False
                self._open_until = None
                self._failures.clear()
                self._probe_done.notify_all()
        if probe:
            log.info("%s: reads succeed again", self._name)


__all__ = ["DEFAULT_OPEN_AFTER", "DEFAULT_TTL_S", "FailureMemorySource", "FailureStats"]
