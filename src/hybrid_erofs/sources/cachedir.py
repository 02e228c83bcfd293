"""The chunk cache directory as a whole: where it lives, what it holds, and pruning it.

Used by ChunkCacheSource (size limit) and `hybrid-erofs cache ls|prune`; blobs in use are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .chunkstore import FORMAT_DIR, count_records, read_header
from .layerstore import DATA_NAME as LAYER_DATA

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """/var/cache/hybrid-erofs for root, else $XDG_CACHE_HOME/hybrid-erofs or ~/.cache/..."""
    if os.geteuid() == 0:
        return Path("/var/cache/hybrid-erofs")
    xdg = os.environ.get("XDG_CACHE_HOME")
    # XDG Base Directory spec: a relative $XDG_CACHE_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "hybrid-erofs"


DEFAULT_LIMIT_CAP = 10 << 30
DEFAULT_LIMIT_FRACTION = 0.5


def default_cache_limit(cache_dir: Path) -> int:
    """The size limit when none is given: half of what the cache could grow to on its
    filesystem (free space plus what it holds now), at most 10 GiB, so it never fills the disk."""
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return DEFAULT_LIMIT_CAP
    held = sum(blob.disk_bytes for blob in scan_blobs(cache_dir, count=False))
    room = st.f_bavail * st.f_frsize + held
    return max(1, min(DEFAULT_LIMIT_CAP, int(room * DEFAULT_LIMIT_FRACTION)))


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One cached blob, as `cache ls` shows it."""

    digest: str
    path: Path
    size: int  # blob size; 0 when the index is unreadable
    chunk_size: int
    chunks: int  # chunks in the blob
    chunks_present: int  # chunks recorded present (-1 when not counted)
    disk_bytes: int  # allocated bytes of data + index
    last_access_s: float  # epoch seconds: last open, read or store
    in_use: bool  # open by some process right now


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What `prune_cache` removed (or would remove, with dry_run) and what it had to keep."""

    removed: tuple[BlobInfo, ...]
    kept_in_use: tuple[BlobInfo, ...]
    bytes_before: int
    bytes_after: int


def _in_use(directory: Path) -> bool:
    """True when some process holds the blob's open.lock (shared flock)."""
    try:
        fd = os.open(directory / "open.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def decoded_files(directory: Path) -> list[str]:
    """The decoded-layer data files in a blob directory (one per index: layerstore.data_name),
    without their span records."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(name for name in names if (name == LAYER_DATA or name.startswith(
        LAYER_DATA + "-")) and ".spans-" not in name)


def decoded_bytes(directory: Path) -> int:
    """Disk bytes of the decoded-layer data files in a blob directory, each file once (a
    layer store being rekeyed has two names for a moment: LayerStore.rekey)."""
    total = 0
    seen: set[int] = set()
    for name in decoded_files(directory):
        with contextlib.suppress(OSError):
            st = os.stat(directory / name)
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def _info(directory: Path, digest: str, *, count: bool) -> BlobInfo:
    """Describe one blob directory without opening it as a store."""
    size = chunk_size = present = 0
    disk = 0
    last = 0.0
    # chunks, their records and last-use times; then the decoded layer
    for name in ("data", "index", "access"):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(directory / name)
            disk += st.st_blocks * 512
            if name == "index":  # stores touch it on open, on reads and when adding chunks
                last = st.st_mtime
    disk += decoded_bytes(directory)
    try:
        fd = os.open(directory / "index", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        header = None
    else:
        try:
            header = read_header(fd)
            if header is not None and count:
                present = count_records(fd, -(-header[0] // header[1]))
        finally:
            os.close(fd)
    if header is not None:
        size, chunk_size = header
    chunks = -(-size // chunk_size) if chunk_size else 0
    return BlobInfo(digest=digest, path=directory, size=size, chunk_size=chunk_size,
                    chunks=chunks, chunks_present=present if count else -1, disk_bytes=disk,
                    last_access_s=last, in_use=_in_use(directory))


def scan_blobs(cache_dir: Path, *, count: bool = True) -> list[BlobInfo]:
    """Every blob in `cache_dir`, least recently used first; `count` reads chunk records."""
    root = cache_dir / FORMAT_DIR
    blobs = []
    with contextlib.suppress(FileNotFoundError):
        for algorithm in sorted(os.listdir(root)):
            if algorithm.startswith("."):
                continue
            for encoded in sorted(os.listdir(root / algorithm)):
                if not encoded.startswith("."):
                    blobs.append(_info(root / algorithm / encoded, f"{algorithm}:{encoded}",
                                       count=count))
    blobs.sort(key=lambda blob: blob.last_access_s)
    return blobs


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool | None]:
    """Hold an exclusive flock on `path` (created) if no one else holds it: True inside then,
    False when someone does, None when its directory is gone."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def unused(directory: Path) -> contextlib.AbstractContextManager[bool | None]:
    """A blob's open.lock held exclusively if no process has the blob open (each opener holds
    it shared): True inside then, False when it is in use, None when the blob is gone."""
    return try_lock(directory / "open.lock")


def remove_blob(directory: Path) -> bool:
    """Delete one blob's directory unless it is in use; False when it was kept."""
    with unused(directory) as free:
        if free is None:
            return True
        if not free:
            return False
        # Rename first, under the lock: an opener that raced us sees the name vanish and
        # starts a fresh directory instead of using one being deleted (ChunkStore._lock_open).
        trash = directory.parent / f".trash-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def prune_cache(cache_dir: Path, *, max_bytes: int | None = None,
                older_than_s: float | None = None, remove_all: bool = False,
                dry_run: bool = False, clock: Callable[[], float] = time.time) -> PruneResult:
    """Remove whole blobs, least recently used first, never one in use by any process.

    Removes every blob with `remove_all`; blobs not used for `older_than_s`; then more until
    the total is at most `max_bytes`. With several criteria a blob goes if any applies.
    """
    blobs = scan_blobs(cache_dir, count=False)
    total = before = sum(blob.disk_bytes for blob in blobs)
    now = clock()
    removed: list[BlobInfo] = []
    kept: list[BlobInfo] = []
    for blob in blobs:  # oldest first
        wanted = (remove_all
                  or (older_than_s is not None and now - blob.last_access_s > older_than_s)
                  or (max_bytes is not None and total > max_bytes))
        if not wanted:
            continue
        if blob.in_use or (not dry_run and not remove_blob(blob.path)):
            kept.append(blob)
            continue
        removed.append(blob)
        total -= blob.disk_bytes
    if not dry_run:
        _remove_stale_trash(cache_dir / FORMAT_DIR)
    if removed:
        log.info("%s: pruned %d blobs, %d -> %d bytes", cache_dir, len(removed), before, total)
    return PruneResult(removed=tuple(removed), kept_in_use=tuple(kept), bytes_before=before,
                       bytes_after=total)


def _remove_stale_trash(root: Path) -> None:
    """Finish deletions a killed pruner left behind (renamed, not yet removed)."""
    with contextlib.suppress(FileNotFoundError):
        for algorithm in os.listdir(root):
            if algorithm.startswith("."):
                continue
            for name in os.listdir(root / algorithm):
                if name.startswith(".trash-"):
                    shutil.rmtree(root / algorithm / name, ignore_errors=True)
