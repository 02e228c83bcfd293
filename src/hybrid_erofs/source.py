"""The one interface every pipeline stage implements, plus the leaf sources.

ByteSource: `size`, `pread(length, offset)` (exactly `length` bytes or raise), `close()`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import InvalidInput, SourceIOError


@runtime_checkable
class ByteSource(Protocol):
    """A read-only, random-access run of `size` bytes.

    `pread(length, offset)` returns exactly `length` bytes (argument order as
    `os.pread`). Callers keep `0 <= offset` and `offset + length <= size`; a
    source never returns a short read: it returns everything or raises
    SourceIOError. Closing a wrapper closes the source it wraps.
    """

    @property
    def size(self) -> int: ...

    def pread(self, length: int, offset: int) -> bytes: ...

    def close(self) -> None: ...


@runtime_checkable
class FileRanged(Protocol):
    """Optional capability: bytes that lie in a local file as they are, so an exporter may
    send them with sendfile(2) instead of copying them through Python."""

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        """(fd, file offset) of `length` bytes at `offset`, or None when they are not one
        plain run of a file. The fd stays owned by the source."""
        ...


@runtime_checkable
class Prefetching(Protocol):
    """Optional capability: start getting a range ready (fetched, stored, read from disk) in
    the background, so that a read of it soon after waits less. Returns at once; failures
    are left for the read to meet. Prefetched bytes pass every check a read makes."""

    def prefetch(self, length: int, offset: int) -> None: ...


@runtime_checkable
class Releasing(Protocol):
    """Optional capability of a stage that keeps data in memory which it can make again from
    elsewhere (decode it again, read it back from disk): give that memory up, for an idle
    mount. Data in use by a read and data that exists nowhere else are kept."""

    def release_memory(self) -> int:
        """Drop what can be made again; the bytes dropped."""
        ...


def read_into(source: ByteSource, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` (writable, format "B") with the bytes of `source` at `offset`, or raise.

    Sources with a `pread_into(buffer, offset)` (same contract) write into it directly; the
    others are read with `pread` and copied in. On an error the buffer's contents are
    undefined (the caller never hands a partly filled buffer on).
    """
    into = getattr(source, "pread_into", None)
    if into is not None:
        into(buffer, offset)
    else:
        buffer[:] = source.pread(len(buffer), offset)


def check_range(source: ByteSource, length: int, offset: int) -> None:
    """Raise ValueError for a request outside `source` (a caller bug, not I/O)."""
    if length < 0 or offset < 0 or offset + length > source.size:
        raise ValueError(
            f"read of {length} bytes at offset {offset} is outside "
            f"{type(source).__name__} of size {source.size}"
        )


class MemorySource:
    """A ByteSource over bytes in memory. Thread-safe (immutable)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass


class FileSource:
    """A ByteSource over a local file, read with os.pread. Thread-safe.

    The size is taken once at open; a file that shrinks later makes reads
    raise SourceIOError rather than return short data.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InvalidInput(f"{self.path}: cannot open: {exc.strerror}") from exc
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        check_range(self, length, offset)
        parts: list[bytes] = []
        done = 0
        while done < length:
            try:
                data = os.pread(self._fd, length - done, offset + done)
            except OSError as exc:
                raise SourceIOError(
                    f"{self.path}: read of {length} bytes at offset {offset} failed: {exc.strerror}"
                ) from exc
            if not data:
                raise SourceIOError(
                    f"{self.path}: short read: {done} of {length} bytes at offset {offset} "
                    f"(file shrank below {self._size} bytes?)"
                )
            parts.append(data)
            done += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        check_range(self, length, offset)
        return None if self._closed else (self._fd, offset)

    def prefetch(self, length: int, offset: int) -> None:
        """Have the kernel read the range into the page cache (posix_fadvise WILLNEED)."""
        check_range(self, length, offset)
        with self._lock:
            if not self._closed and length:
                with contextlib.suppress(OSError):  # advice only
                    os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)
