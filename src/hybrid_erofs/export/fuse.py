"""FUSE exporter: a read-only mount holding one regular file whose bytes are a ByteSource.

Sits at the top of the stack, beside the NBD server; the kernel mounts the file as EROFS.
Stop order: unmount EROFS (and free its loop device) first, then the export, then close the source.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Literal, TypeVar, cast, overload

from ..errors import HybridErofsError, already_logged
from ..source import ByteSource, FileRanged, read_into

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The content never changes while mounted: let the kernel keep attributes and pages for long.
CACHE_TIMEOUT_S = 86400.0
# FUSE reads follow the bdi readahead (128 KiB by default); 1 MiB halves the per-request cost.
DEFAULT_READ_AHEAD_KB = 1024
MAX_THREADS = 16
# EROFS reads its metadata (the meta image at the start of the device) one 4 KiB block at a
# time, without readahead: each block a FUSE round trip of its own. A small read in that head
# of the device reads this much of it ahead (HeadReadAhead).
HEAD_READ_AHEAD = 4 << 20
_START_TIMEOUT_S = 30.0
_MNT_DETACH = 2


# fuse_common.h (libfuse 3): enum fuse_buf_flags, FUSE_CAP_SPLICE_WRITE.
FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
FUSE_CAP_SPLICE_WRITE = 1 << 7


class _FuseBuf(ctypes.Structure):
    # struct fuse_buf { size_t size; enum fuse_buf_flags flags; void *mem; int fd; off_t pos; }
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _FuseBufvec(ctypes.Structure):
    # struct fuse_bufvec { size_t count, idx, off; struct fuse_buf buf[1]; }: the buffer is
    # inline (mfusepy declares a pointer there, so its own struct cannot be used).
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


class ExportError(HybridErofsError, OSError):
    """The FUSE export could not be mounted or unmounted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "fuse export error"


class ExportBusy(ExportError):
    """The exported file is still in use (an EROFS mount or a loop device sits on it)."""


def load_mfusepy() -> ModuleType:
    """Import mfusepy bound to libfuse 3 (it would prefer libfuse 2 when both are installed)."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except OSError as exc:  # mfusepy loads the C library when imported
        raise ExportError(f"fuse: libfuse3 is not installed (Debian: apt-get install fuse3): "
                          f"{exc}") from exc
    except ImportError as exc:
        raise ExportError(f"fuse: cannot import mfusepy, a dependency of hybrid-erofs "
                          f"(pip install hybrid-erofs again): {exc}") from exc
    if mfusepy.fuse_version_major != 3:
        raise ExportError(
            f"fuse: mfusepy loaded libfuse {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}"
            f", need libfuse 3 (set FUSE_LIBRARY_NAME=fuse3 before importing mfusepy)"
        )
    module: ModuleType = mfusepy
    return module


class HeadReadAhead:
    """Reads the head of the exported file (the meta image) ahead into the kernel's page cache
    when the kernel misses a block of it.

    EROFS reads metadata a block at a time through the page cache of the FUSE file, with no
    readahead: a cold walk of a tree (a container's start, `find`, `tar -c`) waits for one
    FUSE round trip per inode or directory block. `missed(offset, caller)` (called from
    read_buf, so it never blocks) asks a thread of its own to open the exported file and
    `posix_fadvise(WILLNEED)` the next `window` bytes of the head: the kernel sends that as
    asynchronous readahead, served like any read (from the meta file: a splice; its requests
    name this thread, so they are not taken for misses), and the blocks EROFS asks for next
    are in the page cache or on their way (a block being read ahead is waited for, never read
    twice). A miss inside the window waiting for the thread, or inside the one it is asking
    for, asks nothing; any other miss (the pages were dropped meanwhile, or never came) asks
    again: advice on pages the cache holds costs a lookup each. Advice only: a failure is
    logged once (debug) and the reads go on as before.

    `close()` (FuseExport.stop, before the unmount) ends the thread, after an open or advice
    under way (a descriptor open then would keep the mount busy); a miss after it asks nothing.
    """

    def __init__(self, path: Path, head: int, *, window: int = HEAD_READ_AHEAD) -> None:
        self.path = path
        self.head = head
        self._window = window
        self._lock = threading.Condition()
        self._wanted: tuple[int, int] | None = None  # the window the thread is to ask for
        self._asking = (0, 0)  # the window it is asking for
        self._closed = False
        self._failed = False
        self._thread: threading.Thread | None = None
        self._tid = 0  # the thread's id: the kernel's readahead for it names it
        self.windows = 0  # statistics: windows asked for

    def missed(self, offset: int, caller: int) -> None:
        """The kernel read `offset` of the head (it was not in its page cache) for `caller`,
        the thread id in the request: the read-ahead's own reads are not misses."""
        if caller == self._tid:
            return
        with self._lock:
            if self._closed or any(start <= offset < end for start, end in
                                   (self._wanted or (0, 0), self._asking)):
                return
            start = offset - offset % 4096
            self._wanted = (start, min(self.head, start + self._window))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="head-read-ahead",
                                                daemon=True)
                self._thread.start()
            self._lock.notify()

    def _run(self) -> None:
        self._tid = threading.get_native_id()
        while True:
            with self._lock:
                while self._wanted is None and not self._closed:
                    self._lock.wait()
                if self._closed or self._wanted is None:
                    return
                start, end = self._asking = self._wanted
                self._wanted = None
            # Not under the lock: the open is a FUSE request that a worker thread answers, and
            # workers call missed(). Closed at once: an open descriptor would keep the mount
            # busy (the readahead it started goes on without it).
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
                self.windows += 1
            except OSError as exc:
                if not self._failed:
                    self._failed = True
                    log.debug("%s: no read-ahead of bytes %d-%d: %s", self.path, start, end - 1,
                              exc)
            with self._lock:
                self._asking = (0, 0)

    def close(self) -> None:
        """End the thread (after an open or advice under way)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
            thread = self._thread
        if thread is not None:
            thread.join(5.0)

    def reopen(self) -> None:
        """Read ahead again after `close()` (the unmount it was closed for was refused)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return  # close() gave up waiting for it: it ends on its own, stays closed
            self._closed, self._thread, self._wanted = False, None, None


class _DiskOperations:
    """mfusepy callbacks for a directory holding exactly one read-only file.

    Called from libfuse's worker threads at once, so it only reads immutable state and relies
    on the source being thread-safe. Only the methods defined here reach libfuse.
    """

    use_ns = True
    # Reads carry no path: libfuse skips the path lookup for every request.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, source: ByteSource, name: str, initialized: threading.Event,
                 head: HeadReadAhead | None = None) -> None:
        self._source = source
        self._head = head
        # Who made a request (the head's own readahead is not a miss); mfusepy is loaded.
        self._context = load_mfusepy().fuse_get_context if head is not None else None
        self._size = source.size
        # isinstance against a runtime Protocol looks at every member: once, not per read.
        self._ranged = isinstance(source, FileRanged)
        self._file = "/" + name
        self._name = name
        self._initialized = initialized
        now_ns = time.time_ns()
        common = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": now_ns,
                  "st_mtime": now_ns, "st_ctime": now_ns}
        self._root_attrs: dict[str, Any] = {**common, "st_mode": stat.S_IFDIR | 0o555,
                                            "st_nlink": 2, "st_size": 0, "st_ino": 1}
        self._file_attrs: dict[str, Any] = {**common, "st_mode": stat.S_IFREG | 0o444,
                                            "st_nlink": 1, "st_size": self._size, "st_ino": 2,
                                            "st_blksize": 4096,
                                            "st_blocks": (self._size + 511) // 512}

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None and conn.capable & FUSE_CAP_SPLICE_WRITE:
            # Replies from a file range (read_buf) go fd -> pipe -> /dev/fuse, never through
            # user space; replies from memory are written as before.
            conn.want |= FUSE_CAP_SPLICE_WRITE
        if config is not None:
            config.kernel_cache = 1
            config.entry_timeout = config.attr_timeout = CACHE_TIMEOUT_S
            config.negative_timeout = CACHE_TIMEOUT_S
        # Runs in a libfuse thread before the INIT reply: only signal, never touch the mount.
        self._initialized.set()

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        if path == "/":
            return self._root_attrs
        if path == self._file or (path is None and fh is not None):
            return self._file_attrs
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    def readdir(self, path: str | None, fh: int) -> list[str]:
        return [".", "..", self._name]

    def open(self, path: str, flags: int) -> int:
        if path != self._file:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        # read(2) semantics: the tail at EOF is short, beyond EOF is empty; inside the file
        # the source returns every byte or raises.
        if offset >= self._size:
            return b""
        return self._read(min(size, self._size - offset), offset)

    def read_buf(self, path: str | None, bufpp: Any, size: int, offset: int, fh: int) -> int:
        """libfuse's read_buf: answer with a file range of the source where it has one (the
        meta file, stored layer data), else with the bytes read. libfuse frees what we
        malloc here (fuse_free_buf: the vector, and `mem` of memory buffers)."""
        length = max(0, min(size, self._size - offset))
        if self._head is not None and offset < self._head.head and length < HEAD_READ_AHEAD:
            assert self._context is not None
            self._head.missed(offset, int(self._context()[2]))
        where = None
        if length and self._ranged:
            where = self._guarded(lambda: cast(FileRanged, self._source).file_range(length,
                                                                                   offset),
                                  length, offset)
        libc = _get_libc()
        memory = None
        if where is None and length:
            # The source writes the bytes straight into the buffer libfuse sends and frees.
            memory = libc.malloc(length)
            if not memory:
                raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
            try:
                target = memoryview((ctypes.c_char * length).from_address(memory)).cast("B")
                self._guarded(lambda: read_into(self._source, target, offset), length, offset)
            except BaseException:
                libc.free(memory)
                raise
        vector = libc.malloc(ctypes.sizeof(_FuseBufvec))
        if not vector:
            libc.free(memory)
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        ctypes.memset(vector, 0, ctypes.sizeof(_FuseBufvec))
        view = _FuseBufvec.from_address(vector)
        view.count = 1
        buf = view.buf[0]
        buf.size = length
        if where is not None:
            buf.flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK
            buf.fd, buf.pos = where
        elif memory:
            buf.mem = memory
        bufpp[0] = ctypes.cast(vector, type(bufpp[0]))
        return 0

    def _read(self, length: int, offset: int) -> bytes:
        return self._guarded(lambda: self._source.pread(length, offset), length, offset)

    @staticmethod
    def _guarded(call: Callable[[], _T], length: int, offset: int) -> _T:
        """`call()`, its failures logged and turned into EIO."""
        try:
            return call()
        except OSError as exc:
            log.log(logging.DEBUG if already_logged(exc) else logging.WARNING,
                    "read of %d bytes at offset %d failed: %s", length, offset, exc)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from exc
        except Exception as exc:
            # mfusepy would answer EINVAL; a reader must see an I/O error, never other bytes.
            log.error("read of %d bytes at offset %d failed", length, offset, exc_info=True)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from exc

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (self._size + 4095) // 4096,
                "f_bfree": 0, "f_bavail": 0, "f_files": 2, "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}


class FuseExport:
    """A FUSE mount on `mountpoint` holding one read-only file `name` with the bytes of `source`.

    `start()` mounts and returns once the kernel has finished the FUSE handshake; requests are
    served by libfuse's multithreaded loop in a background thread. `stop()` unmounts (refusing
    with ExportBusy while an EROFS mount or a loop device still uses the file) and waits for the
    loop to end; an external `fusermount3 -u` / `umount` ends it too. Usable as a context manager.

    Args:
        source: the device bytes; must be thread-safe. Not owned: the caller closes it after stop.
        mountpoint: an existing directory.
        name: the file's name inside the mount (default "disk.img").
        allow_other: let users other than the mounting one read the file (FUSE `allow_other`).
        read_ahead_kb: raise the mount's readahead to this (root only; None keeps the kernel's).
        head_bytes: the file's first bytes are metadata the kernel reads a block at a time
            (the meta image): read them ahead when it misses one (HeadReadAhead). 0: never.
    """

    def __init__(self, source: ByteSource, mountpoint: str | os.PathLike[str], *,
                 name: str = "disk.img", allow_other: bool = False,
                 read_ahead_kb: int | None = DEFAULT_READ_AHEAD_KB,
                 head_bytes: int = 0) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"'name' must be a plain file name (got {name!r})")
        self.source = source
        self.mountpoint = Path(mountpoint).absolute()
        self.name = name
        self.path = self.mountpoint / name
        self._allow_other = allow_other
        self._read_ahead_kb = read_ahead_kb
        self.head = (HeadReadAhead(self.path, min(head_bytes, source.size)) if head_bytes > 0
                     else None)
        self._initialized = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> FuseExport:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, *, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Mount and wait until the kernel can use the file; raise ExportError on failure."""
        if self._thread is not None:
            raise RuntimeError("a FuseExport can be started once")
        if not self.mountpoint.is_dir():
            raise ExportError(f"{self.mountpoint}: mountpoint is not a directory")
        mfusepy = load_mfusepy()
        fuse_class = _fuse_class(mfusepy)
        operations = _DiskOperations(self.source, self.name, self._initialized, self.head)
        options: dict[str, Any] = {
            "foreground": True, "ro": True, "fsname": "hybrid-erofs", "subtype": "hybrid-erofs",
            "default_permissions": True, "max_threads": MAX_THREADS,
            # libfuse 3.14 warns about its own default (UINT_MAX) unless this is set.
            "max_idle_threads": MAX_THREADS,
        }
        if self._allow_other:
            options["allow_other"] = True

        def loop() -> None:
            try:
                fuse_class(operations, str(self.mountpoint), **options)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=loop, name=f"fuse:{self.mountpoint}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._initialized.wait(0.05):
            if not self._thread.is_alive():
                raise ExportError(f"{self.mountpoint}: FUSE mount failed ({self._error!r}); "
                                  f"see the messages of libfuse above")
            if time.monotonic() > deadline:
                self.stop(force=True)
                raise ExportError(f"{self.mountpoint}: FUSE mount did not start within "
                                  f"{timeout_s:.0f}s")
        if self._read_ahead_kb is not None:
            self._tune_read_ahead(self._read_ahead_kb)
        log.info("serving %s (%d bytes)", self.path, self.source.size)

    def _tune_read_ahead(self, read_ahead_kb: int) -> None:
        try:
            st_dev = os.stat(self.mountpoint).st_dev
            knob = Path(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb")
            knob.write_text(f"{read_ahead_kb}\n")
        except OSError as exc:  # not root, or no sysfs: the kernel's 128 KiB still works
            log.debug("%s: readahead left as is: %s", self.mountpoint, exc)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the loop to end (after an unmount); True when it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _unmount(self, *, force: bool) -> None:
        """umount2 (lazily with `force`); ExportBusy while the file is in use."""
        if force:
            _unmount(self.mountpoint, lazy=True)
        else:
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    _unmount(self.mountpoint, lazy=False)
                    break
                except ExportBusy:
                    # An autoclear loop device detaches asynchronously after its umount.
                    users = self.users()
                    if users or time.monotonic() > deadline:
                        raise ExportBusy(
                            f"{self.path}: still in use ({', '.join(users) or 'open files'}); "
                            f"unmount that first") from None
                    time.sleep(0.05)

    def users(self) -> list[str]:
        """Mounts and loop devices that hold the exported file (why an unmount is EBUSY)."""
        return file_users(self.path)

    def stop(self, *, force: bool = False, timeout_s: float = 10.0) -> None:
        """Unmount and wait for the loop to end.

        Without `force`, refuses (ExportBusy) while the file is in use, so an EROFS mount on it
        never loses its backing store. With `force`, detaches lazily: later reads through a
        mount still on it fail with an I/O error, and the loop ends once the last user is gone.
        """
        if self.head is not None:
            self.head.close()  # a descriptor it has open would keep the mount busy
        if self._thread is None or not self._thread.is_alive():
            return
        try:
            self._unmount(force=force)
        except ExportBusy:
            if self.head is not None:
                self.head.reopen()
            raise
        if not self.wait(timeout_s) and not force:
            raise ExportError(f"{self.mountpoint}: FUSE loop still running {timeout_s:.0f}s "
                              f"after the unmount")


_libc: ctypes.CDLL | None = None
_FUSE_CLASSES: dict[int, type] = {}


def _fuse_class(mfusepy: ModuleType) -> Any:
    """mfusepy.FUSE with a read_buf that passes a NULL path on (flag_nopath: reads carry
    none, and mfusepy's own read_buf would decode it)."""
    found = _FUSE_CLASSES.get(id(mfusepy))
    if found is None:
        class _Fuse(mfusepy.FUSE):  # type: ignore[name-defined,misc]
            def read_buf(self, path: bytes | None, bufpp: Any, size: int, offset: int,
                         fip: Any) -> int:
                result: int = self.operations.read_buf(None, bufpp, size, offset, 0)
                return result

        found = _FUSE_CLASSES[id(mfusepy)] = _Fuse
    return found


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.malloc.argtypes = [ctypes.c_size_t]
        _libc.malloc.restype = ctypes.c_void_p
        _libc.free.argtypes = [ctypes.c_void_p]
        _libc.free.restype = None
    return _libc


def _unmount(mountpoint: Path, *, lazy: bool) -> None:
    """Unmount a FUSE mount: umount2(2) as root, else fusermount3 (the setuid helper)."""
    if os.geteuid() == 0:
        libc = _get_libc()
        if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH if lazy else 0) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # not mounted any more: the loop is ending already
            return
        if err == errno.EBUSY:
            raise ExportBusy(f"{mountpoint}: unmount: {os.strerror(err)}")
        raise ExportError(f"{mountpoint}: unmount failed: {os.strerror(err)} (errno {err})")
    helper = shutil.which("fusermount3") or shutil.which("fusermount")
    if helper is None:
        raise ExportError(f"{mountpoint}: unmount needs fusermount3 (apt-get install fuse3)")
    proc = subprocess.run([helper, "-u", *(["-z"] if lazy else []), str(mountpoint)],
                          capture_output=True, text=True)
    if proc.returncode == 0 or "not found in /etc/mtab" in proc.stderr:
        return
    message = proc.stderr.strip()
    if "busy" in message.lower():
        raise ExportBusy(f"{mountpoint}: unmount: {message}")
    raise ExportError(f"{mountpoint}: unmount failed: {message}")


def _unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes of /proc/self/mountinfo (space, tab, newline, backslash)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def file_users(path: Path) -> list[str]:
    """Describe each mount whose source is `path` and each loop device backed by it."""
    target = str(path)
    found: list[str] = []
    loops: list[str] = []
    with contextlib.suppress(OSError):
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            if backing.read_text().strip() == target:
                loops.append("/dev/" + backing.parent.parent.name)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            dash = fields.index("-")
            source = _unescape_mountinfo(fields[dash + 2])
            if source == target or source in loops:
                found.append(f"{fields[dash + 1]} mounted on {_unescape_mountinfo(fields[4])}"
                             f" from {source}")
    mounted_loops = {entry.rsplit(" from ", 1)[1] for entry in found}
    found.extend(f"loop device {loop}" for loop in loops if loop not in mounted_loops)
    return found


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Collect SIGTERM/SIGINT/SIGHUP into a list; restore the handlers after.

    Python runs signal handlers on the main thread only; elsewhere nothing is installed and
    the caller's own arrangements (or libfuse's defaults) apply.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@overload
def serve_fuse(source: ByteSource, mountpoint: str | os.PathLike[str], *, name: str = ...,
               foreground: Literal[True] = ..., ready: Callable[[], None] | None = ...,
               allow_other: bool = ..., head_bytes: int = ...) -> None: ...


@overload
def serve_fuse(source: ByteSource, mountpoint: str | os.PathLike[str], *, name: str = ...,
               foreground: Literal[False], ready: Callable[[], None] | None = ...,
               allow_other: bool = ..., head_bytes: int = ...) -> FuseExport: ...


def serve_fuse(source: ByteSource, mountpoint: str | os.PathLike[str], *,
               name: str = "disk.img", foreground: bool = True,
               ready: Callable[[], None] | None = None,
               allow_other: bool = False, head_bytes: int = 0) -> FuseExport | None:
    """Export `source` as `mountpoint/name`; `ready()` runs once the file can be used.

    foreground=True (main thread): serve until SIGTERM, SIGINT or SIGHUP, or until someone
    unmounts `mountpoint`; then unmount and return. A signal while the file is still in use
    (EROFS mounted on it) logs who uses it and keeps serving; a second signal detaches lazily
    and returns (users then see I/O errors). foreground=False: return the running FuseExport;
    the caller stops it. The source stays owned by the caller either way.
    """
    export = FuseExport(source, mountpoint, name=name, allow_other=allow_other,
                        head_bytes=head_bytes)
    if not foreground:
        export.start()
        if ready is not None:
            ready()
        return export
    with _stop_requests() as received:
        export.start()
        try:
            if ready is not None:
                ready()
            handled = 0
            while export.running:
                if len(received) > handled:
                    handled = len(received)
                    signame = signal.Signals(received[-1]).name
                    log.info("%s: unmounting %s", signame, export.mountpoint)
                    try:
                        export.stop()
                    except ExportBusy as exc:
                        if handled == 1:
                            log.error("%s; signal again to detach anyway (its readers get EIO)",
                                      exc)
                        else:
                            log.warning("%s; detaching lazily", exc)
                            export.stop(force=True, timeout_s=1.0)
                            break
                export.wait(0.1)
        except BaseException:
            export.stop(force=True, timeout_s=1.0)
            raise
    return None


__all__ = ["ExportBusy", "ExportError", "FuseExport", "file_users", "load_mfusepy", "serve_fuse"]
