"""BackgroundFetcher: makes a lazily mounted layer local. Profile spans first, in parallel, at
once; then, after a quiet period, every other span in order, at a bounded rate, pausing while
on-demand reads come in; then the complete layer is verified (a failure fails the mount).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import HybridErofsError, is_transient
from ..metrics.samples import Sample, counter, gauge
from ..sources.stored import StoredLayerSource

log = logging.getLogger(__name__)

# How long a daemon following the snapshotter's warm-up waits for the next profile span to
# arrive before it fetches the rest itself (the warm-up died, or is busy with other layers'
# spans for that long).
FOLLOW_S = 5.0
FOLLOW_POLL_S = 0.02

STATES = ("waiting", "prefetching", "fetching", "verifying", "complete", "verified", "stopped",
          "failed")


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """How a background fetch behaves.

    delay_s: quiet period after the mount before the remaining spans are fetched (profile
        spans do not wait).
    idle_s: an on-demand read less than this long ago pauses the fetch.
    rate: compressed bytes per second at most (None: as fast as the link and CPU allow).
    workers: spans fetched and decoded at once.
    attempts: tries per span before the fetch stops (transient errors only).
    retry_s: wait before trying a failed span again.
    follow_s: the profile's spans are being fetched into the chunk cache by someone else
        (the snapshotter's warm-up, fetching/warmup.py): decode each once its compressed
        bytes are there, in the warm-up's order, and fetch one itself only when none has
        arrived for this long (None: fetch them at once).
    """

    delay_s: float = 5.0
    idle_s: float = 0.25
    rate: int | None = 64 << 20
    workers: int = 2
    attempts: int = 3
    retry_s: float = 2.0
    follow_s: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"'workers' must be >= 1 (got {self.workers})")
        if self.rate is not None and self.rate < 1:
            raise ValueError(f"'rate' must be >= 1 (got {self.rate})")
        if self.attempts < 1:
            raise ValueError(f"'attempts' must be >= 1 (got {self.attempts})")
        if self.follow_s is not None and self.follow_s < 0:
            raise ValueError(f"'follow_s' must be >= 0 (got {self.follow_s})")

    @staticmethod
    def recorded(policy: FetchPolicy | None) -> list[str]:
        """argv() of `policy` as a mount's state record keeps it, for a restart of its daemon
        (`mount --reattach`): without `follow_s`, since the warm-up a daemon followed belonged
        to its first start (the snapshotter's Prepare), and a restart that waited for it would
        wait `follow_s` for nothing."""
        return FetchPolicy.argv(None if policy is None else replace(policy, follow_s=None))

    @staticmethod
    def argv(policy: FetchPolicy | None) -> list[str]:
        """The `mount` options that give a daemon `policy` (None: off)."""
        if policy is None:
            return ["--no-background-fetch"]
        rate = [] if policy.rate is None else ["--fetch-rate", str(policy.rate)]
        follow = [] if policy.follow_s is None else ["--_follow-warmup", repr(policy.follow_s)]
        return ["--fetch-delay", repr(policy.delay_s), *rate, *follow]

    @staticmethod
    def restored(argv: Sequence[str]) -> FetchPolicy | None:
        """The policy a mount record keeps (`recorded()`), for its daemon's restart: a follow
        flag that records of earlier releases kept is dropped (the warm-up is gone)."""
        policy = FetchPolicy.from_argv(argv)
        return None if policy is None else replace(policy, follow_s=None)

    @staticmethod
    def from_argv(argv: Sequence[str]) -> FetchPolicy | None:
        """The policy `argv()` gave (a mount record's); the default for an empty one."""
        if "--no-background-fetch" in argv:
            return None
        values = dict(zip(argv[::2], argv[1::2], strict=False))
        defaults = FetchPolicy()
        rate = values.get("--fetch-rate")
        follow = values.get("--_follow-warmup")
        return FetchPolicy(delay_s=float(values.get("--fetch-delay", defaults.delay_s)),
                           rate=int(rate) if rate is not None else None if argv else defaults.rate,
                           follow_s=float(follow) if follow is not None else None)


@dataclass(frozen=True, slots=True)
class FetchProgress:
    """What `status` shows of a layer's background fetch."""

    state: str
    spans_local: int
    spans_total: int
    bytes_fetched: int  # compressed bytes of the spans this fetcher brought in
    complete: bool
    verified: bool
    reason: str | None = None  # why it stopped or failed

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def progress_samples(progress: FetchProgress) -> list[Sample]:
    """A layer's background fetch as metrics (`status` reads them back: fetch_status())."""
    return [
        gauge("fetch_state", STATES.index(progress.state),
              "Background fetch state: " + ", ".join(f"{n} {s}" for n, s in enumerate(STATES))),
        gauge("fetch_spans_local", progress.spans_local, "Spans of the layer stored locally"),
        gauge("fetch_spans_total", progress.spans_total, "Spans of the layer"),
        counter("fetch_background_bytes", progress.bytes_fetched,
                "Compressed bytes the background fetch brought in"),
        gauge("fetch_complete", int(progress.complete), "1 when every span is local"),
        gauge("fetch_verified", int(progress.verified), "1 when the complete layer passed its check"),
    ]


def fetch_status(values: dict[str, Any]) -> dict[str, Any] | None:
    """The background fetch of one layer from its metric values (a `status` layer entry);
    None when the layer has none."""
    state = values.get("fetch_state")
    if not isinstance(state, (int, float)):
        return None
    def number(key: str) -> int:
        value = values.get(key, 0)
        return int(value) if isinstance(value, (int, float)) else 0
    return {"state": STATES[int(state)] if 0 <= int(state) < len(STATES) else "unknown",
            "spans_local": number("fetch_spans_local"),
            "spans_total": number("fetch_spans_total"),
            "bytes_fetched": number("fetch_background_bytes"),
            "complete": bool(number("fetch_complete")),
            "verified": bool(number("fetch_verified")),
            "failed": bool(number("index_verification_failed"))}


def blob_ranges(layer: StoredLayerSource) -> list[tuple[int, int]]:
    """(offset, length) of each span's compressed bytes in the blob (as the index sidecar
    counts them: from the byte its first bits are in to the next span's)."""
    checkpoints = layer.inner.index.checkpoints
    starts = [cp.in_offset - 1 if cp.bits else cp.in_offset for cp in checkpoints]
    ends = [*starts[1:], layer.inner.blob_size]
    return [(start, max(0, end - start)) for start, end in zip(starts, ends, strict=True)]


class BackgroundFetcher:
    """Fetches and decodes every span of `layer` that is not stored yet, on its own threads.

    Order: `first` (a prefetch profile's spans, all at once with `policy.workers` in flight,
    no quiet period), then the rest by offset once `policy.delay_s` has passed since
    `start()`. Between spans it waits while `activity()` (a count of on-demand reads) has
    changed within `policy.idle_s`, and paces itself to `policy.rate`. A span that fails
    transiently is tried again `policy.attempts` times, then the fetch stops (the layer
    stays lazy, reads go on). `limit()` is asked before each span: a reason (the cache
    limit cannot hold the layer) stops the fetch and is shown. Each span is loaded inside
    `exact()` (the chunk cache's exact_reads: nothing is read ahead past the spans asked for).
    `before_rest()` runs once the quiet period is over, before the other spans (a layer
    mounted on a profile zinfo fetches its zinfo there, gzindex/lazy.py: after the profile's
    spans, and after those of the other layers that start with it); a failure of it is
    logged, and the spans that need it meet it again.

    When every span is stored, `verify()` runs once (unless the store says the layer was
    verified already); it raises to say the layer is not what the index says, and then
    `on_failure(reason)` is called (the mount fails every further read) and the state is
    "failed". Thread-safe; `stop()` waits for the spans in flight.
    """

    def __init__(self, layer: StoredLayerSource, *, policy: FetchPolicy | None = None,
                 first: Sequence[int] = (), activity: Callable[[], int] = lambda: 0,
                 verify: Callable[[], None] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 limit: Callable[[], str | None] = lambda: None, name: str = "layer",
                 clock: Callable[[], float] = time.monotonic,
                 exact: Callable[[], AbstractContextManager[None]] = nullcontext,
                 held: Callable[[], AbstractContextManager[None]] = nullcontext,
                 before_rest: Callable[[], object] | None = None,
                 present: Callable[[int], bool] | None = None) -> None:
        self.layer = layer
        self._present = present  # span number -> its compressed bytes are in the chunk cache
        self._before_rest = before_rest
        self._exact = exact  # around each span's load: no readahead past it (chunk cache)
        self._held = held  # around the profile's spans: readers' ahead-work held (GzipSource)
        self.policy = policy or FetchPolicy()
        total = layer.store.span_count
        self._first = [n for n in dict.fromkeys(first) if 0 <= n < total]
        self._activity = activity
        self._verify = verify
        self._on_failure = on_failure
        self._limit = limit
        self.name = name
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state = "waiting"
        self._reason: str | None = None
        self._bytes = 0
        self._thread: threading.Thread | None = None
        self.order: list[int] = []  # spans in the order they were handed to workers (tests)
        self._compressed = [length for _offset, length in blob_ranges(layer)]

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a BackgroundFetcher can be started once")
        self._started = self._clock()
        self._thread = threading.Thread(target=self._run, name=f"fetch:{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the fetch to end (complete, stopped or failed); True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def progress(self) -> FetchProgress:
        store = self.layer.store
        with self._lock:
            state, reason, fetched = self._state, self._reason, self._bytes
        return FetchProgress(state=state, spans_local=store.spans_present(),
                             spans_total=store.span_count, bytes_fetched=fetched,
                             complete=store.complete, verified=store.verified, reason=reason)

    # -- the fetch --------------------------------------------------------------------------

    def _set(self, state: str, reason: str | None = None) -> None:
        with self._lock:
            self._state, self._reason = state, reason

    def _run(self) -> None:
        try:
            store = self.layer.store
            if not store.complete:
                if self._first:
                    self._set("prefetching")
                    with self._held():
                        if not self._fetch(self._first, pause=False, follow=True):
                            return
                    self._set("waiting")
                if not self._quiet_period():
                    return
                self._run_before_rest()
                self._set("fetching")
                rest = [n for n in range(store.span_count) if not store.has_span(n)]
                if not self._fetch(rest, pause=True):
                    return
                store.flush()
            else:
                self._run_before_rest()
            self._finish()
        except Exception as exc:  # a bug must not kill the daemon: stop and say why
            log.error("%s: background fetch stopped: %r", self.name, exc, exc_info=True)
            self._set("stopped", f"internal error: {exc!r}")

    def _run_before_rest(self) -> None:
        if self._before_rest is None or self._stop.is_set():
            return
        try:
            self._before_rest()
        except HybridErofsError as exc:
            log.warning("%s: %s", self.name, exc)

    def _quiet_period(self) -> bool:
        remaining = self._started + self.policy.delay_s - self._clock()
        if remaining > 0 and self._stop.wait(remaining):
            return False
        return not self._stop.is_set()

    def _wait_idle(self, seen: list[float]) -> bool:
        """Pause while on-demand reads come in; `seen` is [count, when it last changed]."""
        while not self._stop.is_set():
            count = self._activity()
            now = self._clock()
            if count != seen[0]:
                seen[0], seen[1] = count, now
            if now - seen[1] >= self.policy.idle_s:
                return True
            self._stop.wait(self.policy.idle_s)
        return False

    def _arrived(self, number: int, last: list[float]) -> bool:
        """Following a warm-up: wait until span `number`'s compressed bytes are in the chunk
        cache, or none has arrived for `follow_s` (`last`: [when one last did]); then it is
        loaded (fetched, if it is not there). False when stopped."""
        follow_s, present = self.policy.follow_s, self._present
        if follow_s is None or present is None:
            return True
        while not self._stop.is_set():
            now = self._clock()
            if present(number):
                last[0] = now
                return True
            if now - last[0] >= follow_s:
                return True
            self._stop.wait(FOLLOW_POLL_S)
        return False

    def _fetch(self, numbers: Iterable[int], *, pause: bool, follow: bool = False) -> bool:
        """Fetch `numbers` with `workers` in flight (`follow`: each once the warm-up has
        brought it, `_arrived`); False when stopped (state says why)."""
        store = self.layer.store
        seen = [float(self._activity()), self._clock()]  # reads may have come just now
        arrival = [self._clock()]
        pending = [n for n in numbers if not store.has_span(n)]
        next_at = self._clock()
        tries: dict[int, int] = {}
        with ThreadPoolExecutor(self.policy.workers,
                                thread_name_prefix=f"fetch:{self.name}") as pool:
            running: dict[Future[None], int] = {}
            while pending or running:
                while pending and len(running) < self.policy.workers:
                    if self._stop.is_set() or (pause and not self._wait_idle(seen)):
                        break
                    reason = self._limit()
                    if reason is not None:
                        log.warning("%s: background fetch stopped: %s", self.name, reason)
                        self._set("stopped", reason)
                        self._stop.set()
                        break
                    delay = next_at - self._clock()
                    if pause and delay > 0 and self._stop.wait(delay):
                        break
                    if store.has_span(pending[0]):  # a reader's, meanwhile
                        pending.pop(0)
                        continue
                    if follow and not self._arrived(pending[0], arrival):
                        break
                    number = pending.pop(0)
                    self.order.append(number)
                    running[pool.submit(self._load, number)] = number
                    if self.policy.rate is not None:
                        next_at = max(next_at, self._clock()) + (
                            self._compressed[number] / self.policy.rate)
                if not running:
                    if self._stop.is_set():
                        return False
                    continue
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    number = running.pop(future)
                    exc = future.exception()
                    if exc is None:
                        with self._lock:
                            self._bytes += self._compressed[number]
                        continue
                    tries[number] = tries.get(number, 0) + 1
                    if is_transient(exc) and tries[number] < self.policy.attempts:
                        log.info("%s: span %d: %s; trying again", self.name, number, exc)
                        pending.append(number)
                        next_at = self._clock() + self.policy.retry_s
                        continue
                    reason = f"span {number}: {exc}"
                    log.warning("%s: background fetch stopped: %s", self.name, reason)
                    self._set("stopped", reason)
                    self._stop.set()
                    pending.clear()
            return not self._stop.is_set()

    def _load(self, number: int) -> None:
        with self._exact():
            self.layer.inner.load_span(number)

    def _finish(self) -> None:
        store = self.layer.store
        if store.verified:
            self._set("verified")
            return
        if self._verify is None:
            self._set("complete", "no verifier for this layer")
            return
        self._set("verifying")
        try:
            self._verify()
        except HybridErofsError as exc:
            reason = str(exc)
            log.error("%s: the complete layer failed verification: %s; every further read "
                      "of this mount fails with EIO", self.name, reason)
            if self._on_failure is not None:  # first: "failed" must mean reads fail already
                self._on_failure(reason)
            self._set("failed", reason)
            return
        store.mark_verified()
        log.info("%s: complete and verified (%d spans)", self.name, store.span_count)
        self._set("verified")


__all__ = ["FOLLOW_S", "STATES", "BackgroundFetcher", "FetchPolicy", "FetchProgress",
           "blob_ranges", "fetch_status", "progress_samples"]
