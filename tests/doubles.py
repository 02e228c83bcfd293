"""Test doubles: ByteSources that count, fail, or corrupt, built on MemorySource."""

from __future__ import annotations

import threading
import time

from hybrid_erofs.errors import SourceIOError
from hybrid_erofs.source import MemorySource, check_range


class CountingSource(MemorySource):
    """Records every (length, offset) read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.calls: list[tuple[int, int]] = []
        self.closed = False
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            self.calls.append((length, offset))
        return super().pread(length, offset)

    @property
    def bytes_read(self) -> int:
        return sum(length for length, _ in self.calls)

    def close(self) -> None:
        self.closed = True


class FlakySource(CountingSource):
    """Fails the first `failures` reads with an error (transient unless told otherwise)."""

    def __init__(self, data: bytes, *, failures: int, transient: bool = True) -> None:
        super().__init__(data)
        self.failures = failures
        self.transient = transient

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        if self.failures > 0:
            self.failures -= 1
            self.calls.append((length, offset))
            raise SourceIOError(f"flaky: read of {length} at {offset} failed",
                                transient=self.transient)
        return super().pread(length, offset)


class SlowSource(CountingSource):
    """Takes `delay_s` per read (time.sleep releases the GIL), so concurrent readers overlap."""

    def __init__(self, data: bytes, *, delay_s: float) -> None:
        super().__init__(data)
        self.delay_s = delay_s

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        time.sleep(self.delay_s)
        return super().pread(length, offset)
