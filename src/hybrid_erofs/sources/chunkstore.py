"""ChunkStore: one blob's cached chunks on disk, a sparse `data` file plus an `index` of checksums
and an `access` file of last-use times (for least-recently-used eviction by chunk, eviction.py).

Below ChunkCacheSource. Chosen over one file per chunk: faster warm hits (15-52 vs 24-69 µs per
4 KiB, tools/bench_chunkcache.py), no open() per hit; a chunk is evicted by punching its hole."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from ..errors import InvalidInput

log = logging.getLogger(__name__)


def _load_crc32() -> Callable[[bytes | memoryview], int]:
    """isal or zlib-ng (PCLMUL, about 17 µs per MiB) before stdlib zlib (about 150 µs per MiB)."""
    try:
        from isal import isal_zlib

        return cast(Callable[[bytes | memoryview], int], isal_zlib.crc32)
    except ImportError:  # pragma: no cover - depends on the platform's wheels
        pass
    try:
        from zlib_ng import zlib_ng

        return cast(Callable[[bytes | memoryview], int], zlib_ng.crc32)
    except ImportError:  # pragma: no cover
        return zlib.crc32


_crc32 = _load_crc32()

FORMAT_DIR = "chunks-v1"  # bump when the layout changes, so old and new never mix
_MAGIC = b"HECHUNK1"
_HEADER = struct.Struct("<8sQQ")  # magic, blob size, chunk size
_HEADER_SIZE = 64  # room for future fields; records start here
_RECORD = struct.Struct("<II")  # crc32 of the chunk's bytes, check of (chunk number, crc32)
# `access`: per chunk, the Unix time in milliseconds it was last stored or read
_STAMP = struct.Struct("<Q")
STAMP_EVERY_MS = 1000  # a read rewrites a chunk's time at most this often
_NO_RECORD = bytes(_RECORD.size)
# OCI image-spec descriptor.md digest grammar; the encoded part is restricted further so that a
# digest can never name a path outside the cache (no '/', no '..').
_DIGEST = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
FILE_MODE = 0o600  # private registries' bytes stay private to the user who pulled them
DIR_MODE = 0o700


def blob_dir(cache_dir: Path, key: str) -> Path:
    """Directory of blob `key` ("sha256:<hex>") inside `cache_dir`."""
    match = _DIGEST.fullmatch(key)
    if match is None:
        raise InvalidInput(f"{key!r}: not a blob digest (expected 'sha256:<hex>')")
    return cache_dir / FORMAT_DIR / match.group(1) / match.group(2)


def _check(number: int, crc: int) -> int:
    """Self-check of a record; odd by construction, so an all-zero record is never valid."""
    return zlib.crc32(struct.pack("<QI", number, crc)) | 1


def read_header(index_fd: int) -> tuple[int, int] | None:
    """(blob size, chunk size) from an index file, or None when the header is not ours."""
    raw = os.pread(index_fd, _HEADER.size, 0)
    if len(raw) != _HEADER.size:
        return None
    magic, size, chunk_size = _HEADER.unpack(raw)
    if magic != _MAGIC or chunk_size < 1:
        return None
    return size, chunk_size


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of a byte range of a file, keeping its size (fallocate(2)
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); reads of it then return zeros."""
    if _libc.fallocate(fd, 3, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def read_stamps(access_fd: int, chunk_count: int) -> list[int]:
    """Last-use times of every chunk from an `access` file (0: never recorded)."""
    raw = os.pread(access_fd, chunk_count * _STAMP.size, 0)
    stamps = [stamp for (stamp,) in _STAMP.iter_unpack(raw[: len(raw) // 8 * 8])]
    return stamps + [0] * (chunk_count - len(stamps))


def present_records(index_fd: int, chunk_count: int) -> list[bool]:
    """Which chunks an index marks present (records only; data is checked on read)."""
    raw = os.pread(index_fd, chunk_count * _RECORD.size, _HEADER_SIZE)
    present = [check == _check(number, crc)
               for number, (crc, check) in enumerate(_RECORD.iter_unpack(raw[: len(raw) // 8 * 8]))]
    return present + [False] * (chunk_count - len(present))


def clear_record(index_fd: int, number: int) -> None:
    """Mark one chunk absent: a zeroed record is never valid."""
    os.pwrite(index_fd, _NO_RECORD, _HEADER_SIZE + number * _RECORD.size)


def count_records(index_fd: int, chunk_count: int) -> int:
    """How many chunks an index marks present (records only; data is checked on read)."""
    raw = os.pread(index_fd, chunk_count * _RECORD.size, _HEADER_SIZE)
    present = 0
    for number, (crc, check) in enumerate(_RECORD.iter_unpack(raw[: len(raw) // 8 * 8])):
        present += check == _check(number, crc)
    return present


class ChunkStore:
    """One blob's chunks in `directory`: `data` (chunk N at N * chunk_size, sparse), `index`.

    `index` is a 64-byte header (magic, blob size, chunk size) and one 8-byte record per chunk:
    the chunk's crc32 and a check over (chunk number, crc32). Crash-safety rule: a run of chunks
    is written to `data` before its records are written, and every read is verified against
    the recorded crc32. So a chunk whose write was interrupted, a hole, a torn or zeroed
    record, a truncated file or bit rot all read as "absent", never as zeros. Neither file is
    synced: after a crash a record may reach the disk before its chunk's bytes, which then
    read as a hole (zeros) or partly written, and fail the crc32 like any torn write (a
    refetch); the bytes at a chunk's place are only ever that chunk's bytes, zeros or a mix of
    the two (docs/benchmarks.md: the fdatasync per write cost 0.2-1.1 s of CPU for a 544 MB
    blob). Above the cache, every span's sha256 is checked before it is decoded
    (VerifiedSource) and its chunks are dropped when it fails.

    Two lock files: `open.lock` is held shared (flock) while the store is open, so eviction,
    which needs it exclusively, never removes a blob in use; `fetch.lock` takes POSIX byte-range
    locks, byte N standing for chunk N, so two processes never fetch the same chunk at once.
    POSIX locks belong to the process: threads must not lock overlapping ranges (the caller
    deduplicates in-process), and two stores of one blob in one process do not exclude each
    other (a duplicate fetch, never wrong data).

    Eviction (eviction.py) drops single chunks: record cleared, then the data hole punched. A
    chunk pinned by a read of this process is never dropped; a read in another process that
    races with the eviction finds the crc32 wrong or the record gone and refetches.
    `access` holds an 8-byte last-use time (ms) per chunk, written when a chunk is stored and
    at most once a second per chunk when read.

    Thread-safe for reads and for writes of disjoint chunks (pread/pwrite on shared fds).
    """

    def __init__(self, directory: Path, *, size: int, chunk_size: int) -> None:
        self.directory = directory
        self.size = size
        self._open_fd = self._lock_open(directory)
        try:
            self._index_fd, self.chunk_size = self._open_index(directory, size, chunk_size)
            self._data_fd = os.open(directory / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    FILE_MODE)
            self._fetch_fd = os.open(directory / "fetch.lock",
                                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            self._access_fd = os.open(directory / "access",
                                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except BaseException:
            for fd in (getattr(self, name, -1) for name in ("_index_fd", "_data_fd",
                                                             "_fetch_fd")):
                if fd >= 0:
                    os.close(fd)
            os.close(self._open_fd)
            raise
        self.chunk_count = -(-size // self.chunk_size)
        # Records already seen valid. A record changes only when `discard` or eviction clears
        # it; a store of another process that still remembers the old crc32 then re-reads the
        # record as soon as the data stops matching it.
        self._crcs: dict[int, int] = {}
        self._stamped: dict[int, int] = {}  # chunk -> last-use time this store wrote
        self._pins: dict[int, int] = {}  # chunk -> reads of this process using it now
        self._pin_lock = threading.Lock()
        self._reported: set[int] = set()  # chunks whose damage was logged (once each)

    @staticmethod
    def _lock_open(directory: Path) -> int:
        """Open and flock(LOCK_SH) `open.lock`, retrying if eviction removed the directory."""
        while True:
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(directory / "open.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_SH)
            # Eviction renames the directory away while holding LOCK_EX: if it did so between
            # our open and our lock, our lock is on a file that no longer has this name.
            try:
                if os.stat(directory / "open.lock").st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    @staticmethod
    def _open_index(directory: Path, size: int, chunk_size: int) -> tuple[int, int]:
        """Open `index`, creating it or replacing a foreign/mismatched one; returns its chunk size."""
        path = directory / "index"
        replace = False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if os.stat(directory / "data").st_blocks:
                    log.warning("%s: index missing; the cached chunks of this blob are dropped "
                                "and fetched again as needed", path)
                    replace = True  # truncates the data below
        else:
            header = read_header(fd)
            if header is not None and header[0] == size:
                # A store created with another chunk size stays usable: adopt its size.
                return fd, header[1]
            if header is None:
                log.warning("%s: index header damaged; the cached chunks of this blob are "
                            "dropped and fetched again as needed", path)
            else:
                log.warning("%s: index is for a blob of %d bytes, not %d; starting afresh",
                            path, header[0], size)
            os.close(fd)
            replace = True
        tmp = directory / f".index.{os.getpid()}.{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.pwrite(fd, _HEADER.pack(_MAGIC, size, chunk_size).ljust(_HEADER_SIZE, b"\0"), 0)
            os.fsync(fd)
            if replace:
                os.replace(tmp, path)  # a racing replacer may win; either header is right
                for name in ("data", "access"):  # old bytes may follow another geometry
                    with contextlib.suppress(OSError):
                        os.truncate(directory / name, 0)
            else:
                try:
                    os.link(tmp, path)  # create-if-absent, atomically
                except FileExistsError:
                    os.close(fd)
                    fd = -1
                finally:
                    tmp.unlink(missing_ok=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if fd >= 0:
                os.close(fd)
            raise
        if fd < 0:  # another process created it first: use theirs
            return ChunkStore._open_index(directory, size, chunk_size)
        return fd, chunk_size

    def chunk_length(self, number: int) -> int:
        """Bytes in chunk `number` (the last chunk may be short)."""
        return min(self.chunk_size, self.size - number * self.chunk_size)

    def records(self, first: int, count: int) -> list[int | None]:
        """crc32 of chunks first..first+count-1 as recorded on disk now (None: absent).

        A record that is neither valid nor cleared (damaged index) is logged once."""
        raw = os.pread(self._index_fd, count * _RECORD.size, _HEADER_SIZE + first * _RECORD.size)
        crcs: list[int | None] = [None] * count
        for k, (crc, check) in enumerate(_RECORD.iter_unpack(raw[: len(raw) // 8 * 8])):
            if check == _check(first + k, crc):
                crcs[k] = crc
            elif (crc or check) and first + k not in self._reported:
                self._reported.add(first + k)
                log.warning("%s: index record of chunk %d is damaged; fetching the chunk again",
                            self.directory, first + k)
        return crcs

    def has(self, number: int) -> bool:
        """True when chunk `number` is recorded present (its bytes are verified on read)."""
        return number in self._crcs or self.records(number, 1)[0] is not None

    def read(self, number: int, *, fresh: bool = False) -> bytes | None:
        """Chunk `number`'s verified bytes, or None when absent, short or corrupt.

        `fresh` ignores what this store remembers and reads the record again (another
        process may have stored the chunk).
        """
        crc = None if fresh else self._crcs.get(number)
        if crc is None:
            crc = self.records(number, 1)[0]
            if crc is None:
                return None
        length = self.chunk_length(number)
        data = os.pread(self._data_fd, length, number * self.chunk_size)
        if len(data) != length or _crc32(data) != crc:
            self._crcs.pop(number, None)
            recorded = self.records(number, 1)[0]
            if recorded is None:
                return None  # evicted by another process meanwhile: not damage
            if recorded != crc:  # stored again by another process meanwhile
                return None if fresh else self.read(number, fresh=True)
            if number not in self._reported:
                self._reported.add(number)
                log.warning("%s: chunk %d (%d bytes) fails its crc32 check; fetching it again",
                            self.directory, number, length)
            return None
        self._crcs[number] = crc
        return data

    def write(self, first: int, data: bytes) -> None:
        """Store whole chunks first.. from `data`: bytes, then the records (no sync, see the
        class).

        On failure (a full disk) nothing is recorded and the blocks written are freed again."""
        offset = first * self.chunk_size
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._data_fd, view[done:], offset + done)
            records = []
            crcs = {}
            for k in range(0, len(data), self.chunk_size):
                number = first + k // self.chunk_size
                crcs[number] = crc = _crc32(view[k : k + self.chunk_size])
                records.append(_RECORD.pack(crc, _check(number, crc)))
            os.pwrite(self._index_fd, b"".join(records), _HEADER_SIZE + first * _RECORD.size)
        except OSError:
            with contextlib.suppress(OSError):
                punch_hole(self._data_fd, offset, len(data))
            raise
        self._crcs.update(crcs)
        self._reported.difference_update(crcs)
        self.stamp(first, len(crcs), time.time_ns() // 1_000_000, stored=True)

    def stamp(self, first: int, count: int, now_ms: int, *, stored: bool = False) -> None:
        """Record that chunks first..first+count-1 were used at `now_ms` (best effort: a read
        rewrites a chunk's time at most once a second, a failed write only makes eviction
        think it older)."""
        stamped = self._stamped
        if not stored and all(now_ms - stamped.get(n, 0) < STAMP_EVERY_MS
                              for n in range(first, first + count)):
            return
        for n in range(first, first + count):
            stamped[n] = now_ms
        with contextlib.suppress(OSError):
            os.pwrite(self._access_fd, _STAMP.pack(now_ms) * count, first * _STAMP.size)

    def pin(self, first: int, count: int) -> None:
        """Keep chunks first..first+count-1 from eviction until `unpin` (a read needs them)."""
        with self._pin_lock:
            for n in range(first, first + count):
                self._pins[n] = self._pins.get(n, 0) + 1

    def unpin(self, first: int, count: int) -> None:
        with self._pin_lock:
            for n in range(first, first + count):
                left = self._pins[n] - 1
                if left:
                    self._pins[n] = left
                else:
                    del self._pins[n]

    def evict(self, number: int) -> bool:
        """Drop chunk `number` to free its space, unless a read of this process pins it:
        record cleared first, then the data's hole punched. False when pinned."""
        with self._pin_lock:
            if number in self._pins:
                return False
            self._crcs.pop(number, None)
            clear_record(self._index_fd, number)
            punch_hole(self._data_fd, number * self.chunk_size, self.chunk_length(number))
        return True

    def present(self) -> list[bool]:
        """Which chunks the index marks present now."""
        return present_records(self._index_fd, self.chunk_count)

    def stamps(self) -> list[int]:
        return read_stamps(self._access_fd, self.chunk_count)

    def discard(self, first: int, count: int) -> None:
        """Mark chunks first..first+count-1 absent (their bytes failed a check above us):
        zeroed records are never valid, so the next read refetches them."""
        for number in range(first, first + count):
            self._crcs.pop(number, None)
        os.pwrite(self._index_fd, bytes(count * _RECORD.size), _HEADER_SIZE + first * _RECORD.size)

    @contextlib.contextmanager
    def locked(self, first: int, count: int) -> Iterator[None]:
        """Hold the cross-process fetch lock of chunks first..first+count-1."""
        while True:
            try:
                fcntl.lockf(self._fetch_fd, fcntl.LOCK_EX, count, first)
                break
            except OSError as exc:
                # The kernel sees POSIX locks per process, so threads of one process can look
                # like a deadlock cycle to it; the cycle is not real, so wait and try again.
                if exc.errno != errno.EDEADLK:
                    raise
                time.sleep(0.001)
        try:
            yield
        finally:
            fcntl.lockf(self._fetch_fd, fcntl.LOCK_UN, count, first)

    def touch(self) -> None:
        """Mark the blob as used now (eviction is least-recently-used by this time)."""
        with contextlib.suppress(OSError):
            os.utime(self.directory / "index")

    def disk_bytes(self) -> int:
        """Bytes this blob occupies on disk (allocated blocks, so holes are free)."""
        return sum(os.fstat(fd).st_blocks * 512
                   for fd in (self._data_fd, self._index_fd, self._access_fd))

    def close(self) -> None:
        for fd in (self._data_fd, self._index_fd, self._fetch_fd, self._access_fd,
                   self._open_fd):
            os.close(fd)
