"""Atomic output files: write under a temporary name in the target directory, fsync, rename.

A failure or interruption leaves the old file or none, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError


def write_atomic(path: str | os.PathLike[str], data: bytes | memoryview, *, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically; raise OutputError naming the path on failure."""
    write_atomic_chunks(path, (data,), mode=mode)


def write_atomic_chunks(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview], *,
                        mode: int = 0o644) -> None:
    """Write the chunks (a download, say) to `path` atomically. An exception raised by the
    iterator (a digest check) leaves nothing behind and propagates; OSError becomes
    OutputError naming the path."""
    path = Path(path)
    directory = path.parent
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise OutputError(f"{path}: cannot write: {exc.strerror}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail early, before long work, when `path` cannot be created later."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    directory = path.parent
    if not directory.is_dir():
        raise OutputError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: directory {directory} is not writable")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
