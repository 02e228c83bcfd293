"""HeadReadAhead without a mount: its failures stay advice (logged once, never raised), misses
inside the window it is about to ask for ask nothing, and close() ends its thread."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from hybrid_erofs.export.fuse import HeadReadAhead


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "head-read-ahead"]


def test_a_file_it_cannot_open_is_logged_once_and_never_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ahead = HeadReadAhead(tmp_path / "missing", 1 << 20)
    with caplog.at_level(logging.DEBUG, logger="hybrid_erofs.export.fuse"):
        ahead.missed(0, 1)
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
        ahead.missed(2 << 20, 1)  # outside the head's window: asks again, fails again
        time.sleep(0.1)
        ahead.close()
    messages = [r.getMessage() for r in caplog.records if "read-ahead" in r.getMessage()]
    assert len(messages) == 1 and "missing" in messages[0] and "bytes 0-1048575" in messages[0]
    assert ahead.windows == 0
    assert not _threads()


def _asked(ahead: HeadReadAhead, windows: int) -> None:
    """Wait until `ahead` has asked for `windows` windows in all; fail after 5 s."""
    deadline = time.monotonic() + 5
    while ahead.windows < windows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ahead.windows == windows


def test_advice_on_a_plain_file_and_a_miss_after_close(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * (64 << 10))
    ahead = HeadReadAhead(path, 32 << 10, window=16 << 10)
    ahead.missed(5000, 1)
    _asked(ahead, 1)
    ahead.close()
    assert not _threads()
    ahead.missed(20000, 1)  # closed: nothing is asked, no thread starts
    time.sleep(0.05)
    assert ahead.windows == 1 and not _threads()
    ahead.reopen()
    ahead.missed(20000, 1)
    _asked(ahead, 2)
    ahead.close()
    assert not _threads()


def test_its_own_reads_are_not_misses(tmp_path: Path) -> None:
    """The kernel's readahead for the advice names the read-ahead's thread: those reads ask
    nothing (else every window would start the next one, through the whole head)."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * (64 << 10))
    ahead = HeadReadAhead(path, 64 << 10, window=16 << 10)
    ahead.missed(0, 1)
    _asked(ahead, 1)
    ahead.missed(40000, ahead._tid)
    time.sleep(0.1)
    assert ahead.windows == 1
    ahead.missed(40000, 1)  # the same offset from a reader is a miss
    _asked(ahead, 2)
    ahead.close()
