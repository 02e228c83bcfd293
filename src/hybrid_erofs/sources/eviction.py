"""Least-recently-used eviction by chunk across every blob of a chunk cache directory.

Keeps the directory under its size limit (blobs in use included) by dropping the chunks used
longest ago, whatever blob they belong to, and the decoded layer data (LayerStore) of blobs no
process uses; ChunkCacheSource calls it after storing chunks, when the disk is full, and to make
room for decoded spans. Blobs left without chunks and not in use are removed whole.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from .cachedir import decoded_bytes, decoded_files, remove_blob, scan_blobs, try_lock, unused
from .chunkstore import (
    FORMAT_DIR,
    ChunkStore,
    clear_record,
    present_records,
    punch_hole,
    read_header,
    read_stamps,
)
from .layerstore import DATA_NAME as LAYER_DATA

log = logging.getLogger(__name__)

_BLOCK = 4096
# Eviction starts when the directory holds more than HIGH of its limit and goes down to LOW;
# writers check every CHECK_EVERY of the limit they store, so that with a few processes
# writing at once the directory still stays under the limit itself.
HIGH, LOW, CHECK_EVERY = 13 / 16, 3 / 4, 1 / 32
# Stores open in this process, by directory: their pinned chunks are never evicted, and their
# in-memory state is updated when one of their chunks goes.
_open_stores: weakref.WeakValueDictionary[Path, ChunkStore] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def register_store(store: ChunkStore) -> None:
    """Let evictions in this process go through `store` (pins respected)."""
    with _registry_lock:
        _open_stores[store.directory] = store


def forget_store(store: ChunkStore) -> None:
    with _registry_lock:
        if _open_stores.get(store.directory) is store:
            del _open_stores[store.directory]


@dataclass(frozen=True, slots=True)
class EvictionResult:
    """What one eviction did."""

    bytes_before: int
    bytes_after: int
    chunks_evicted: int
    blobs_removed: int


@dataclass(frozen=True, slots=True)
class _Candidate:
    stamp: int  # last use, Unix milliseconds
    directory: Path
    number: int  # a chunk; DECODED: the blob's decoded layer data (LayerStore), as one
    length: int


DECODED = -1


def evict(cache_dir: Path, *, max_bytes: int, target_bytes: int | None = None,
          force: bool = False) -> EvictionResult | None:
    """When `cache_dir` holds more than HIGH of `max_bytes` (or `force`, after a failed
    write), drop least recently used chunks until it holds at most `target_bytes` (default
    LOW of `max_bytes`, so that eviction does not run after every store).

    One process at a time (a lock file in the directory): None when another is evicting.
    Chunks being fetched by any process, and chunks pinned by reads of this one, are kept.
    """
    target = int(max_bytes * LOW) if target_bytes is None else target_bytes
    root = cache_dir / FORMAT_DIR
    with try_lock(root / ".evict.lock") as locked:  # one evicting process at a time
        if not locked:
            return None
        blobs = scan_blobs(cache_dir, count=False)
        before = total = sum(blob.disk_bytes for blob in blobs)
        if total <= max_bytes * HIGH and not force:
            return EvictionResult(before, before, 0, 0)
        candidates: list[_Candidate] = []
        for blob in blobs:
            candidates += _candidates(blob.path, blob.last_access_s)
            if not blob.in_use:
                decoded = decoded_bytes(blob.path)
                if decoded:
                    candidates.append(_Candidate(int(blob.last_access_s * 1000), blob.path,
                                                 DECODED, decoded))
        candidates.sort(key=lambda c: (c.stamp, str(c.directory), c.number))
        evicted = 0
        touched: set[Path] = set()
        for candidate in candidates:
            if total <= target:
                break
            if _evict_one(candidate):
                evicted += candidate.number != DECODED
                touched.add(candidate.directory)
                total -= -(-candidate.length // _BLOCK) * _BLOCK
        removed = sum(1 for directory in touched if remove_if_empty(directory))
        after = sum(blob.disk_bytes for blob in scan_blobs(cache_dir, count=False))
    if evicted:
        log.info("%s: evicted %d chunks and %d blobs, %d -> %d bytes (limit %d)", cache_dir,
                 evicted, removed, before, after, max_bytes)
    return EvictionResult(before, after, evicted, removed)


def _candidates(directory: Path, fallback_s: float) -> list[_Candidate]:
    """The present chunks of one blob with their last-use times (the blob's own time when a
    chunk has none recorded)."""
    with _registry_lock:
        store = _open_stores.get(directory)
    try:
        if store is not None:
            present, stamps = store.present(), store.stamps()
            size, chunk_size = store.size, store.chunk_size
        else:
            index_fd = os.open(directory / "index", os.O_RDONLY | os.O_CLOEXEC)
            try:
                header = read_header(index_fd)
                if header is None:
                    return []
                size, chunk_size = header
                count = -(-size // chunk_size)
                present = present_records(index_fd, count)
            finally:
                os.close(index_fd)
            stamps = _foreign_stamps(directory, count)
    except OSError:
        return []
    return [_Candidate(stamps[n] or int(fallback_s * 1000), directory, n,
                       min(chunk_size, size - n * chunk_size))
            for n, here in enumerate(present) if here]


def _foreign_stamps(directory: Path, count: int) -> list[int]:
    try:
        fd = os.open(directory / "access", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # cached by an older version: the blob's time stands in
        return [0] * count
    try:
        return read_stamps(fd, count)
    finally:
        os.close(fd)


def _drop_decoded(directory: Path) -> bool:
    """Delete a blob's decoded layer data (LayerStore), only while no process has the blob
    open: a LayerStore serves its bytes without a checksum, so they must not vanish under it."""
    with unused(directory) as free:
        if not free:
            return False
        for path in directory.glob(f"{LAYER_DATA}*.spans-*"):  # the records first
            path.unlink(missing_ok=True)
        for name in decoded_files(directory):
            (directory / name).unlink(missing_ok=True)
        return True


def _evict_one(candidate: _Candidate) -> bool:
    """Drop one chunk (or a blob's decoded layer) unless pinned here or being fetched by any
    process."""
    if candidate.number == DECODED:
        return _drop_decoded(candidate.directory)
    with _registry_lock:
        store = _open_stores.get(candidate.directory)
    try:
        if store is not None:
            return store.evict(candidate.number)
        flags = os.O_RDWR | os.O_CLOEXEC
        index_fd = os.open(candidate.directory / "index", flags)
        try:
            data_fd = os.open(candidate.directory / "data", flags)
            fetch_fd = os.open(candidate.directory / "fetch.lock", flags | os.O_CREAT, 0o600)
            try:
                try:  # byte N of fetch.lock is chunk N (ChunkStore.locked)
                    fcntl.lockf(fetch_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, candidate.number)
                except OSError:
                    return False
                header = read_header(index_fd)
                if header is None:
                    return False
                clear_record(index_fd, candidate.number)
                punch_hole(data_fd, candidate.number * header[1], candidate.length)
                return True
            finally:
                os.close(fetch_fd)  # closing drops the lock
                os.close(data_fd)
        finally:
            os.close(index_fd)
    except OSError as exc:
        log.debug("%s: cannot evict chunk %d: %s", candidate.directory, candidate.number, exc)
        return False


def remove_if_empty(directory: Path) -> bool:
    """Remove a blob with no chunk recorded (or no index at all: a store that could not be
    set up) and no decoded layer data, unless some process has it open."""
    if decoded_bytes(directory):
        return False
    try:
        fd = os.open(directory / "index", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        header = None
    except OSError:
        return False
    else:
        try:
            header = read_header(fd)
            if header is not None and any(present_records(fd, -(-header[0] // header[1]))):
                return False
        finally:
            os.close(fd)
    if not directory.exists():
        return False
    return remove_blob(directory)


__all__ = ["CHECK_EVERY", "HIGH", "LOW", "EvictionResult", "evict", "forget_store", "register_store", "remove_if_empty"]
