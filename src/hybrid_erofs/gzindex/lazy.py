"""Profile zinfos and windows that come later: a zinfo v2 with the full checkpoint table but the
real windows only of a prefetch profile's spans (zeros elsewhere), and LazyWindows, which
serves those at once and waits for the full zinfo (checked against the profile zinfo) for the rest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from ..errors import HybridErofsError, IndexFormatError, SourceIOError, is_transient
from .format import ZERO_WINDOW, Checkpoint, GzipIndex

log = logging.getLogger(__name__)


def profile_index(full: GzipIndex, spans: Iterable[int]) -> GzipIndex:
    """`full` with the windows of checkpoints other than `spans` zeroed: what a mount needs
    before its profile's spans are decoded (gzip in transit makes the zeros nearly free)."""
    keep = set(spans)
    return GzipIndex(span=full.span, checkpoints=tuple(
        cp if number in keep else Checkpoint(cp.in_offset, cp.out_offset, cp.bits, ZERO_WINDOW)
        for number, cp in enumerate(full.checkpoints)))


def check_profile_index(profile: GzipIndex, full: GzipIndex, real: Iterable[int], *,
                        name: str) -> None:
    """Refuse a full zinfo whose checkpoint table differs from the profile zinfo's, or whose
    windows differ from the profile zinfo's `real` windows (IndexFormatError naming `name`
    and the first difference)."""
    if (len(full), full.span) != (len(profile), profile.span):
        raise IndexFormatError(
            f"{name}: {len(full)} checkpoints of span {full.span}, the profile zinfo has "
            f"{len(profile)} of span {profile.span}")
    for number, (have, want) in enumerate(zip(full.checkpoints, profile.checkpoints,
                                              strict=True)):
        if (have.in_offset, have.out_offset, have.bits) != (
                want.in_offset, want.out_offset, want.bits):
            raise IndexFormatError(
                f"{name}: checkpoint {number} is at in={have.in_offset} out={have.out_offset} "
                f"bits={have.bits}, the profile zinfo says in={want.in_offset} "
                f"out={want.out_offset} bits={want.bits}")
    for number in sorted(set(real)):
        if 0 <= number < len(full) and (
                full.checkpoints[number].window != profile.checkpoints[number].window):
            raise IndexFormatError(
                f"{name}: checkpoint {number}: its window differs from the profile zinfo's")


class LazyWindows:
    """The windows of a layer's checkpoints when the mount started on a profile zinfo
    (`index`): those of `real` (the profile's spans) at once; any other waits for `load()`,
    the full zinfo (fetched, checked against its bound digest, parsed), which must agree with
    the profile zinfo (check_profile_index). A full zinfo that does not is a failure for
    good: `on_failure(reason)` is called once (the mount fails every read) and every window
    asked for after raises SourceIOError. A transient failure to fetch it (the registry)
    raises SourceIOError and is tried again by the next caller. Callbacks given to
    `when_complete` run once the full zinfo is here and agrees, never otherwise; those given
    to `when_refused`, once it is refused. Thread-safe."""

    def __init__(self, index: GzipIndex, real: Iterable[int], *,
                 load: Callable[[], GzipIndex],
                 on_failure: Callable[[str], None] | None = None, name: str = "zinfo",
                 digest: str = "") -> None:
        self.index = index
        self.digest = digest  # the profile zinfo's sha256 digest (what keys decoded spans)
        self.real = frozenset(n for n in real if 0 <= n < len(index))
        self.on_failure = on_failure
        self.name = name
        self._load = load
        self._full: GzipIndex | None = None
        self._failed: str | None = None
        self._lock = threading.Lock()
        self._on_complete: list[Callable[[], object]] = []
        self._on_refused: list[Callable[[], object]] = []

    @property
    def complete(self) -> bool:
        """The full zinfo is here (every window is known)."""
        return self._full is not None

    def when_complete(self, callback: Callable[[], object]) -> None:
        """Call `callback()` once the full zinfo is here and agrees with the profile zinfo
        (at once when it is already): device.py rekeys the layer store there. Never called
        when the full zinfo is refused; an error it raises is logged, not passed on."""
        self._when(lambda: self._full is not None, self._on_complete, callback)

    def when_refused(self, callback: Callable[[], object]) -> None:
        """Call `callback()` once the full zinfo is refused (at once when it was already),
        before `on_failure`: device.py discards the layer store there."""
        self._when(lambda: self._failed is not None, self._on_refused, callback)

    def _when(self, happened: Callable[[], bool], waiting: list[Callable[[], object]],
              callback: Callable[[], object]) -> None:
        """`callback()` now if `happened()`, else kept in `waiting` for when it does."""
        with self._lock:
            if not happened():
                waiting.append(callback)
                return
        self._call(callback)

    def _call(self, callback: Callable[[], object]) -> None:
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - an extra: the windows are served anyway
            log.warning("%s: after the full zinfo came: %r", self.name, exc)

    def known(self, number: int) -> bytes | None:
        """Checkpoint `number`'s window when it is known already, else None."""
        full = self._full
        if full is not None:
            return full.checkpoints[number].window
        return self.index.checkpoints[number].window if number in self.real else None

    def window(self, number: int) -> bytes:
        """Checkpoint `number`'s window: waits for the full zinfo when it is not real here."""
        window = self.known(number)
        return window if window is not None else self.load().checkpoints[number].window

    def load(self) -> GzipIndex:
        """The full zinfo, fetched once (callers wait for one fetch); SourceIOError when it
        cannot be had or does not agree with the profile zinfo."""
        reason: str | None = None
        with self._lock:
            if self._full is not None:
                return self._full
            if self._failed is not None:
                raise SourceIOError(f"{self.name}: {self._failed}")
            try:
                full = self._load()
                check_profile_index(self.index, full, self.real, name=self.name)
            except HybridErofsError as exc:
                if is_transient(exc):
                    raise SourceIOError(f"{self.name}: the full zinfo could not be fetched: "
                                        f"{exc}") from exc
                self._failed = f"the full zinfo is refused: {exc}"
                reason = self._failed
                callbacks, self._on_refused = self._on_refused, []
            else:
                self._full = full
                log.info("%s: the full zinfo is here (%d checkpoints)", self.name, len(full))
                callbacks, self._on_complete = self._on_complete, []
                self._on_refused.clear()
        if reason is not None:
            log.error("%s: %s", self.name, reason)
            for callback in callbacks:
                self._call(callback)
            if self.on_failure is not None:
                self.on_failure(reason)
            raise SourceIOError(f"{self.name}: {reason}")
        for callback in callbacks:  # outside the lock: windows are served meanwhile
            self._call(callback)
        return full


__all__ = ["LazyWindows", "check_profile_index", "profile_index"]
