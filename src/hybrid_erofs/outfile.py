"""Atomic output files: write under a temporary name in the target directory, fsync, rename.

A failure or interruption leaves the old file or none, never a partial one. Temporary names
carry the writer's pid (`.NAME.PID-XXXXXXXX.tmp`), so the next writer of NAME removes what a
killed one left. OutputSet renames several files in an order that keeps them checkable.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import OutputError

_OLD_TEMP = re.compile(r"[a-z0-9_]{8}")  # mkstemp's random part, from versions without pids


def write_atomic(path: str | os.PathLike[str], data: bytes | memoryview, *, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically; raise OutputError naming the path on failure."""
    write_atomic_chunks(path, (data,), mode=mode)


def write_atomic_chunks(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview], *,
                        mode: int = 0o644) -> None:
    """Write the chunks (a download, say) to `path` atomically. An exception raised by the
    iterator (a digest check) leaves nothing behind and propagates; OSError becomes
    OutputError naming the path."""
    path = Path(path)
    tmp = write_temporary(path, chunks, mode=mode)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise OutputError(f"{path}: cannot write: {exc.strerror}") from exc


def write_temporary(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview], *,
                    mode: int = 0o644) -> str:
    """Write the chunks to a synced temporary file beside `path` and return its name (the
    caller renames it); temporary files of `path` left by dead writers are removed first."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                                   dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise OutputError(f"{path}: cannot write: {exc.strerror}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of `path` whose writer is gone (killed mid-write); the
    names of older versions (no pid) count as stale. Returns what was removed."""
    path = Path(path)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    prefix = f".{path.name}."
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.name.endswith(".tmp"):
            continue
        rest = entry.name[len(prefix):-len(".tmp")]
        pid, dash, _ = rest.partition("-")
        if dash and pid.isdigit():
            if _alive(int(pid)):
                continue
        elif not _OLD_TEMP.fullmatch(rest):
            continue  # another file's temporary (NAME.json's, say), not one of NAME
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputSet:
    """Files that belong together, made visible in a fixed order.

    Every file is first written completely under a temporary name (`add`); `commit` then
    renames them in the order they were added. Put first the small file that names the
    digests of the others (the zinfo sidecar): from its rename on, any mix of new and old
    files is refused by the readers' checks, and before it nothing changed. `discard` (or
    leaving a `with` block by an exception) removes the temporary files.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path]] = []

    def add(self, path: str | os.PathLike[str], data: bytes | memoryview, *,
            mode: int = 0o644) -> None:
        self._staged.append((write_temporary(path, (data,), mode=mode), Path(path)))

    @property
    def paths(self) -> Sequence[Path]:
        return [target for _, target in self._staged]

    def commit(self) -> None:
        while self._staged:
            tmp, target = self._staged[0]
            try:
                os.replace(tmp, target)
            except OSError as exc:
                self.discard()
                raise OutputError(f"{target}: cannot write: {exc.strerror}") from exc
            self._staged.pop(0)
        _sync_directories(self.paths)

    def discard(self) -> None:
        for tmp, _ in self._staged:
            _unlink_quietly(tmp)
        self._staged.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.discard()


def _sync_directories(paths: Sequence[Path]) -> None:
    for directory in {path.parent for path in paths}:
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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
