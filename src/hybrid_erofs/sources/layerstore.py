"""LayerStore: a blob's decoded layer data on local disk, filled span by span as GzipSource
completes them; `layer-<index>` (sparse, the layer's size) plus `layer-<index>.spans-<geometry>`
(which spans are in it, and whether the whole layer was verified), in the blob's cache directory.
A store started on a profile zinfo becomes its zinfo's store once that agrees (`rekey`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import struct
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import CacheError
from .chunkstore import DIR_MODE, FILE_MODE, punch_hole

log = logging.getLogger(__name__)

DATA_NAME = "layer"
_MAGIC = b"HELAYER1"
_HEADER = struct.Struct("<8sQIB")  # magic, layer size, span count, verified
_HEADER_SIZE = 64
FLUSH_EVERY_S = 5.0
_OPEN_ATTEMPTS = 8


def data_name(index: str) -> str:
    """The data file of the spans decoded through index `index` (store_key): decoded bytes
    are a function of the blob AND the index (its windows), so two indexes of one blob never
    share them: a forged index, even one bound to an image of its own, cannot put its
    bytes under another image's mount of the same blob."""
    return f"{DATA_NAME}-{index}" if index else DATA_NAME


def store_key(*digests: str) -> str:
    """The key of a layer store: the digests of the index files whose windows decode it
    (the zinfo's; and the profile zinfo's when the mount starts on it, gzindex/lazy.py)."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]


def spans_name(size: int, starts: Sequence[int], index: str = "") -> str:
    """The record's file name: one per span geometry (two zinfos of one blob may cut it
    differently; the data file is the same layer data either way)."""
    geometry = hashlib.sha256(struct.pack(f"<Q{len(starts)}Q", size, *starts)).hexdigest()
    return f"{data_name(index)}.spans-{geometry[:16]}"


_IOV_MAX = 1024  # Linux's UIO_MAXIOV


def _pwrite_all(fd: int, pieces: list[memoryview], offset: int) -> None:
    """Write `pieces` one after the other at `offset`, all of them (pwritev may write less)."""
    pieces = [piece for piece in pieces if piece.nbytes]
    while pieces:
        written = os.pwritev(fd, pieces[:_IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while pieces and written >= pieces[0].nbytes:
            written -= pieces.pop(0).nbytes
        if written:
            pieces[0] = pieces[0][written:]


class LayerStore:
    """The decoded layer data of one blob, kept on local disk so a span is decoded once.

    `put(number, data)` writes a completed span (bytes GzipSource checked against the next
    checkpoint's window or the member's CRC-32) and serves it at once from this process;
    other processes and later mounts see it after `flush()`, which makes the data durable
    (fdatasync) before the record says it is there, so a crash never leaves a record for
    bytes that are not on disk. Like an extracted layer on disk, stored bytes are trusted
    as they are (no per-read checksum): that is what makes `fd` servable by splice.

    Args:
        directory: the blob's cache directory (ChunkStore's, which holds its open.lock).
        size: layer data size.
        starts: uncompressed offset of each span (the zinfo's checkpoints).
        budget: asked before a span is written, with its size: False (the cache is at its
            limit, ChunkCacheSource.reserve) leaves the span unstored. None: no limit.
        index: store_key() of the index files that decode the spans (device.py always
            gives it; "" names the store of no index in particular, for tests).

    Thread-safe. `close()` flushes.
    """

    def __init__(self, directory: Path, *, size: int, starts: Sequence[int],
                 budget: Callable[[int], bool] | None = None, index: str = "") -> None:
        self.directory = directory
        self.data_path = directory / data_name(index)
        self._budget = budget
        self._refused = False  # a write failed or the budget said no: logged once
        self.size = size
        self._starts = list(starts)
        self._count = len(self._starts)
        self.spans_path = directory / spans_name(size, self._starts, index)
        try:
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self._fd = self._open_data()
        except OSError as exc:
            raise CacheError(f"{directory}: cannot open the layer store: "
                             f"{exc.strerror or exc}") from exc
        self._lock = threading.Lock()
        # Held while the record is merged, and while rekey() moves the files: a flush never
        # writes a record under a name whose data file is gone.
        self._flush_lock = threading.Lock()
        self._present = bytearray(self._count)
        self._durable = bytearray(self._count)  # what the record on disk says (or will)
        # Spans served here but kept out of the record until the layer is verified (rekey's
        # `unchecked`): the record is what later mounts of the new index trust.
        self._unrecorded = bytearray(self._count)
        self._verified = False
        self._dirty = False
        self._closed = False
        self._discarded = False  # discard(): nothing is stored, served or recorded any more
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        try:
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
            self._load()
        except OSError as exc:
            os.close(self._fd)
            raise CacheError(f"{directory}: cannot open the layer store: "
                             f"{exc.strerror or exc}") from exc

    def _open_data(self) -> int:
        """The data file, with a shared flock held for as long as it is open (every process
        that has this store open holds one): `rekey` moves the files only when it alone holds
        it. Checked, once locked, to be still the file of its name: one opened just before a
        rekey moved it is given up and the name opened again."""
        for _attempt in range(_OPEN_ATTEMPTS):
            fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                st = os.fstat(fd)
                try:
                    named = os.stat(self.data_path)
                except FileNotFoundError:
                    named = None
            except BaseException:
                os.close(fd)
                raise
            if named is not None and (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
                return fd
            os.close(fd)
        raise OSError(f"{self.data_path.name} was replaced {_OPEN_ATTEMPTS} times while "
                      "being opened")

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def span_count(self) -> int:
        return self._count

    def spans_present(self) -> int:
        with self._lock:
            return sum(self._present)

    def has_span(self, number: int) -> bool:
        return bool(self._present[number])

    @property
    def complete(self) -> bool:
        return self.spans_present() == self._count

    @property
    def verified(self) -> bool:
        return self._verified

    def span_range(self, number: int) -> tuple[int, int]:
        """(length, offset) of span `number` in the layer data."""
        end = self._starts[number + 1] if number + 1 < self._count else self.size
        return end - self._starts[number], self._starts[number]

    def serves(self, number: int) -> bool:
        """True when reads of span `number` are answered from the store (has(), one span)."""
        return bool(self._present[number]) and not (self._closed or self._discarded)

    def has(self, length: int, offset: int) -> bool:
        """True when every byte of the range is in the store."""
        if length <= 0 or self._closed or self._discarded:
            return length == 0
        first = bisect_right(self._starts, offset) - 1
        last = bisect_right(self._starts, offset + length - 1) - 1
        present = self._present
        return all(present[first : last + 1])

    def put(self, number: int,
            data: bytes | bytearray | memoryview | Sequence[bytes | memoryview]) -> bool:
        """Store span `number` (exactly its bytes, in one buffer or as a list of pieces in
        order); whether the store serves it now. A failure to write is logged, not raised
        (the caller keeps serving the span from memory)."""
        length, offset = self.span_range(number)
        if isinstance(data, (bytes, bytearray, memoryview)):
            pieces = [memoryview(data).cast("B")]
        else:
            pieces = [memoryview(piece).cast("B") for piece in data]
        got = sum(piece.nbytes for piece in pieces)
        if got != length:
            raise ValueError(f"span {number} has {length} bytes, got {got}")
        if self._present[number] or self._closed or self._discarded:
            return self.serves(number)
        if self._budget is not None and not self._budget(length):
            self._refuse(logging.INFO, "the cache is at its size limit")
            return False
        try:
            _pwrite_all(self._fd, pieces, offset)
        except OSError as exc:
            with contextlib.suppress(OSError):  # give back what was written
                punch_hole(self._fd, offset, length)
            self._refuse(logging.WARNING, exc.strerror or str(exc))
            return False
        with self._lock:
            self._present[number] = 1
            self._dirty = True
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                                 name="layer-store-flush")
                self._flusher.start()
        return self.serves(number)

    def _refuse(self, level: int, why: str) -> None:
        """Log the first span not stored (one line, not one per span)."""
        if not self._refused:
            self._refused = True
            log.log(level, "%s: decoded spans not kept (%s); they are decoded again when "
                    "read", self.directory, why)

    def mark_verified(self) -> None:
        """The complete layer passed verification: the record says so from the next flush
        (and has every span: what rekey kept out of it was checked by the verification)."""
        with self._lock:
            self._verified = True
            self._unrecorded[:] = bytes(self._count)
            self._dirty = True
        self.flush()

    def flush(self) -> None:
        """Make stored spans durable, then merge them into the record (under its flock)."""
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            if not self._dirty or self._closed or self._discarded:
                return
            present = bytes(self._present)
            if any(self._unrecorded):
                present = bytes(p & (m ^ 1) for p, m in zip(present, self._unrecorded,
                                                            strict=True))
            verified = self._verified
            self._dirty = False
        try:
            os.fdatasync(self._fd)
            self._merge(present, verified)
        except OSError as exc:
            log.warning("%s: cannot record stored spans: %s", self.spans_path, exc.strerror or exc)
            with self._lock:
                self._dirty = True

    def close(self) -> None:
        self.flush()
        with self._flush_lock, self._lock:  # after a rekey or discard using the fd
            if self._closed:
                return
            self._closed = True
            flusher = self._flusher
        self._wake.set()
        if flusher is not None:  # gone before its file descriptor is
            flusher.join()
        os.close(self._fd)

    def rekey(self, index: str, *, unchecked: Iterable[int] = ()) -> bool:
        """Become the store of index `index` (store_key): the data file and its record are
        given that index's names, and this store's later writes, flushes and records go there
        (the open file descriptor is the same file). For a store started on a profile zinfo,
        called once the full zinfo agrees with it (device.py): every span decoded through
        the profile zinfo is then what the zinfo decodes.

        Never replaces anything: when `index`'s store exists already (another mount made
        it meanwhile) the two are kept apart, and so they are while another process has this
        store open (it would go on recording under the old names). True when this store is
        `index`'s now.

        `unchecked`: spans that are right for this store but not known to be for `index`'s
        (their end was not checked, GzipSource.unchecked_ends): served here, but left out of
        the new record until `mark_verified` (the verification of the complete layer checks
        every window); another mount of `index` decodes them itself meanwhile."""
        new_data = self.directory / data_name(index)
        new_spans = self.directory / spans_name(self.size, self._starts, index)
        with self._flush_lock:
            self._flush()  # what the record says moves with it
            with self._lock:
                if self._closed or self._discarded:
                    return False
            if new_data == self.data_path:
                return True
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # a failed conversion may drop ours
                log.info("%s: %s is open in another process: kept apart from %s",
                         self.directory, self.data_path.name, new_data.name)
                return False
            try:
                return self._move(new_data, new_spans, unchecked)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_SH)

    def _move(self, new_data: Path, new_spans: Path, unchecked: Iterable[int]) -> bool:
        """rekey() with the exclusive flock held: link, move the record, unlink. Every step
        leaves a record only beside its own data file (a record without it would say that
        spans of a new, empty file are there), whatever fails or crashes in between."""
        try:
            os.link(self.data_path, new_data)  # never replaces
        except FileExistsError:
            log.info("%s: %s exists already: %s kept apart from it", self.directory,
                     new_data.name, self.data_path.name)
            return False
        except OSError as exc:
            log.warning("%s: cannot link %s to %s: %s", self.directory, self.data_path.name,
                        new_data.name, exc.strerror or exc)
            return False
        with self._lock:
            if not self._verified:
                for number in unchecked:
                    if 0 <= number < self._count:
                        self._unrecorded[number] = 1
            mask = bytes(self._unrecorded)
        if any(mask):  # out of the record before it gets the new name
            self._forget(mask)
        try:
            # Any record under the new name is stale (its data file did not exist): replaced.
            os.rename(self.spans_path, new_spans)
        except FileNotFoundError:
            new_spans.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: cannot rename %s: %s", self.directory, self.spans_path.name,
                        exc.strerror or exc)
            with contextlib.suppress(OSError):
                new_data.unlink()
            with self._lock:  # still this index's store: its spans are recorded again
                self._unrecorded[:] = bytes(self._count)
                self._dirty = True
            return False
        old = self.data_path
        self.data_path, self.spans_path = new_data, new_spans
        with contextlib.suppress(OSError):  # else both names are the one file: still right
            old.unlink()
        log.info("%s: %s is now %s", self.directory, old.name, new_data.name)
        return True

    def discard(self) -> bool:
        """The index that decoded these spans was found not to describe the layer (a profile
        zinfo the full zinfo disagrees with): store, serve and record nothing more, and
        remove the files unless another process has the store open (then eviction does,
        later; it never becomes another index's store either way). True when removed."""
        with self._flush_lock:
            with self._lock:
                if self._closed or self._discarded:
                    return False
                self._discarded = True
                self._present[:] = bytes(self._count)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(self._fd, fcntl.LOCK_SH)
                log.info("%s: %s is open in another process: left to eviction",
                         self.directory, self.data_path.name)
                return False
            try:
                self.spans_path.unlink(missing_ok=True)  # the record first, as eviction does
                self.data_path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("%s: cannot remove %s: %s", self.directory, self.data_path.name,
                            exc.strerror or exc)
                return False
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_SH)
        log.info("%s: %s removed: its index was refused", self.directory, self.data_path.name)
        return True

    # -- the record -------------------------------------------------------------------------

    def _forget(self, mask: bytes) -> None:
        """Clear the spans of `mask` in the record (rekey, the only process with the store
        open), unless it says the layer was verified (then they are checked: the mask goes);
        on failure the record goes, which only costs decoding them again."""
        try:
            fd = os.open(self.spans_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                raw = bytearray(os.pread(fd, _HEADER_SIZE + self._count, 0))
                header = self._header(bytes(raw))
                if header is None:
                    return
                if header:  # verified by another process, before
                    with self._lock:
                        self._unrecorded[:] = bytes(self._count)
                    return
                for number, bit in enumerate(mask):
                    if bit:
                        raw[_HEADER_SIZE + number] = 0
                os.pwrite(fd, bytes(raw), 0)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("%s: cannot update, removed: %s", self.spans_path, exc.strerror or exc)
            with contextlib.suppress(OSError):
                self.spans_path.unlink()
        with self._lock:
            for number, bit in enumerate(mask):
                if bit:
                    self._durable[number] = 0
            self._dirty = True

    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.spans_path, "rb") as record:
            raw = record.read()
            header = self._header(raw)
            if header is None:
                return
            present = raw[_HEADER_SIZE : _HEADER_SIZE + self._count]
            self._present[:] = present
            self._durable[:] = present
            self._verified = bool(header) and all(present)

    def _header(self, raw: bytes) -> int | None:
        """The verified flag of a record of this geometry, or None when it is not one."""
        if len(raw) != _HEADER_SIZE + self._count:
            return None
        magic, size, count, verified = _HEADER.unpack_from(raw)
        if magic != _MAGIC or size != self.size or count != self._count:
            return None
        return int(verified)

    def _merge(self, present: bytes, verified: bool) -> None:
        fd = os.open(self.spans_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, _HEADER_SIZE + self._count, 0)
            ours = bytearray(present)
            flag = int(verified)
            header = self._header(raw)
            if header is not None:  # another process's spans count too
                theirs = raw[_HEADER_SIZE:]
                ours = bytearray(a | b for a, b in zip(ours, theirs, strict=True))
                flag |= header
            head = _HEADER.pack(_MAGIC, self.size, self._count, flag).ljust(_HEADER_SIZE, b"\0")
            os.pwrite(fd, head + bytes(ours), 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self._durable[:] = ours
            for number, bit in enumerate(ours):
                if bit and not self._present[number]:
                    self._present[number] = 1  # stored by another process meanwhile

    def _flush_loop(self) -> None:
        while not self._wake.wait(FLUSH_EVERY_S):
            self.flush()


__all__ = ["DATA_NAME", "LayerStore", "data_name", "spans_name", "store_key"]
