"""Mount lifecycle: a daemon serves the device (a FUSE file, or kernel NBD) and the kernel mounts
EROFS on it; umount, status and reattach work from the state records (state.py). Image mounts
(imagemount.py) reuse the daemon, its spawning and the cleanup here.

Up: device, export, EROFS mount, record. Down: EROFS, then loop/FUSE/NBD, then the daemon, record.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from .device import RegistryOptions, is_local, open_device
from .errors import HybridErofsError, MountBusy, MountError
from .gzindex.source import GzipSource
from .kernel import (
    KernelMountError,
    attach_loop,
    detach_loop,
    loops_backed_by,
    mount_erofs,
    mount_table,
    mounted_at,
    mounts_under,
    process_alive,
    process_start_time,
    umount,
    users_of,
)
from .sources.chunkcache import ChunkCacheSource
from .sources.metered import MeteredSource, iter_stages
from .sources.verify import VerifiedSource
from .state import MountRecord, RegistrySettings, StatePaths, list_records

log = logging.getLogger(__name__)

VIAS = ("auto", "fuse", "loop", "nbd")
DISK_NAME = "disk.img"
STATS_INTERVAL_S = 2.0
READY_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 15.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# -- checks -------------------------------------------------------------------------------------

def require_root() -> None:
    if os.geteuid() != 0:
        raise MountError("mount: needs root (mounting EROFS needs CAP_SYS_ADMIN)")


def check_mountpoint(mountpoint: str | os.PathLike[str]) -> Path:
    """The mountpoint as an absolute, symlink-free path; MountError when it cannot be used."""
    path = Path(os.path.realpath(mountpoint))
    if not path.exists():
        raise MountError(f"{mountpoint}: mountpoint does not exist")
    if not path.is_dir():
        raise MountError(f"{mountpoint}: mountpoint is not a directory")
    entry = mounted_at(path)
    if entry is not None:
        raise MountError(f"{mountpoint}: already a mount point ({entry.fstype} from "
                         f"{entry.source}); umount it first")
    return path


def _erofs_mounted(mountpoint: Path) -> bool:
    return _fs_mounted(mountpoint, "erofs")


def _fs_mounted(mountpoint: Path, fstype: str) -> bool:
    return any(e.mountpoint == str(mountpoint) and e.fstype == fstype for e in mount_table())


def daemon_alive(record: MountRecord) -> bool:
    return process_alive(record.daemon_pid, record.daemon_start_time)


# -- statistics -----------------------------------------------------------------------------------

def collect_stats(device: MeteredSource) -> dict[str, Any]:
    """What `status` shows: reads served, errors, compressed bytes fetched, cache hit rate."""
    served = device.stats
    stats: dict[str, Any] = {"updated": time.time(), "reads": served.reads,
                             "bytes_served": served.bytes_served, "errors": served.errors,
                             "bytes_fetched": 0, "cache_hits": None, "cache_misses": None,
                             "hit_rate": None, "spans_verified": 0, "bytes_decoded": 0}
    fetched_by_gzip = 0
    for stage in iter_stages(device):
        if isinstance(stage, ChunkCacheSource):
            cache = stage.stats
            stats["bytes_fetched"] += cache.bytes_fetched
            stats["cache_hits"] = (stats["cache_hits"] or 0) + cache.hits
            stats["cache_misses"] = (stats["cache_misses"] or 0) + cache.misses
        elif isinstance(stage, GzipSource):
            fetched_by_gzip += stage.fetched_bytes
            stats["bytes_decoded"] += stage.decoded_bytes
        elif isinstance(stage, VerifiedSource):
            stats["spans_verified"] += stage.verified_spans
    if stats["cache_hits"] is None:
        stats["bytes_fetched"] = fetched_by_gzip  # a local layer: bytes read from the file
    else:
        total = stats["cache_hits"] + stats["cache_misses"]
        stats["hit_rate"] = stats["cache_hits"] / total if total else None
    return stats


# -- the daemon -----------------------------------------------------------------------------------

class LayerMount:
    """One layer up: its device, the device's export (a FUSE file, or kernel NBD) and the
    kernel's EROFS mount of it on `target`. Used once by a layer mount, once per layer by an
    image mount (imagemount.py). Stop: `unmount()`, then `release()`.
    """

    def __init__(self, source: str, target: Path, *, meta: Path, zinfo: Path | None,
                 registry: RegistryOptions, fuse_dir: Path, nbd_socket: Path,
                 backend: str) -> None:
        self.source = source
        self.target = target
        self.meta = meta
        self.zinfo = zinfo
        self.registry = registry
        self.fuse_dir = fuse_dir
        self.nbd_socket = nbd_socket
        self.backend = backend  # the kernel NBD device's BACKEND_IDENTIFIER
        self.device: MeteredSource | None = None
        self.export: Any = None  # FuseExport (mfusepy is optional: imported late)
        self.nbd_server: Any = None
        self.nbd_device: str | None = None
        self.loop_device: str | None = None
        self.mounted = False

    def start(self, via: str) -> str:
        """Open the device, export it and mount it; the transport that runs."""
        self.device = MeteredSource(open_device(self.source, meta=self.meta, zinfo=self.zinfo,
                                                registry=self.registry))
        transport = via
        if transport == "auto":
            from .nbdlink import nbd_devices
            transport = "nbd" if nbd_devices() else "fuse"
        if transport == "nbd":
            self._start_nbd()
            return transport
        return self._start_fuse(force_loop=transport == "loop")

    def _start_fuse(self, *, force_loop: bool) -> str:
        from .export.fuse import FuseExport
        assert self.device is not None
        self.fuse_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.export = FuseExport(self.device, self.fuse_dir, name=DISK_NAME)
        self.export.start()
        disk = str(self.export.path)
        if not force_loop:
            try:
                mount_erofs(disk, self.target)
                self.mounted = True
                return "fuse"
            except KernelMountError as exc:
                # No file-backed EROFS in this kernel (ENOTBLK; some builds say EINVAL).
                if exc.errno not in (errno.ENOTBLK, errno.EINVAL):
                    raise
                log.info("%s; trying a loop device", exc)
        self.loop_device, fd = attach_loop(disk)
        try:
            mount_erofs(self.loop_device, self.target)
            self.mounted = True
        finally:
            os.close(fd)  # from here the mount holds the device; autoclear frees it at umount
        return "loop"

    def _start_nbd(self) -> None:
        from .export.nbd import NbdServer
        from .nbdlink import NbdNetlink, client_handshake
        assert self.device is not None
        netlink = NbdNetlink()  # raises "no /dev/nbd* (modprobe nbd)" first
        try:
            self.nbd_socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.nbd_server = NbdServer(self.device, socket_path=self.nbd_socket,
                                        export_name="disk")
            threading.Thread(target=self.nbd_server.serve_forever, name="nbd",
                             daemon=True).start()
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(self.nbd_socket))
            size = client_handshake(client, "disk")
            # dead_conn_timeout 0: a dead daemon fails reads with EIO at once instead of
            # blocking them (a non-zero value lets --reattach resume, see docs/mount.md).
            self.nbd_device = netlink.connect(client, size=size, backend=self.backend)
            client.close()  # the kernel holds its own reference
            mount_erofs(self.nbd_device, self.target)
            self.mounted = True
        finally:
            netlink.close()

    @property
    def export_running(self) -> bool:
        return self.export is None or bool(self.export.running)

    def record_fields(self) -> dict[str, Any]:
        """Where this layer's pieces are, for a state record (the names MountRecord uses)."""
        return {"loop_device": self.loop_device, "nbd_device": self.nbd_device,
                "fuse_dir": str(self.fuse_dir) if self.export is not None else None,
                "disk_path": str(self.export.path) if self.export is not None else None,
                "nbd_socket": str(self.nbd_socket) if self.nbd_server is not None else None}

    def unmount(self) -> None:
        """Unmount the EROFS; detach it lazily when busy (a stop was requested)."""
        if not self.mounted:
            return
        try:
            umount(self.target)
        except MountBusy:
            holders = users_of(str(self.target))
            log.log(logging.WARNING if holders else logging.INFO,
                    "%s is busy (%s): detaching lazily", self.target,
                    _describe(holders) or "no process found")
            umount(self.target, lazy=True)
        self.mounted = False

    def release(self, *, signals: list[int] | None = None) -> None:
        """After unmount(): loop / NBD device, then the export, then the device.

        With `signals` (a stop requested by signal), a FUSE file still held by a lazily
        detached mount keeps being served until its readers are done or another signal comes.
        """
        if self.loop_device is not None and self.export is not None:
            with contextlib.suppress(MountError):
                detach_loop(self.loop_device, backing=str(self.export.path))
        if self.nbd_device is not None:
            _disconnect_nbd(self.nbd_device)
        if self.nbd_server is not None:
            self.nbd_server.shutdown()
        if self.export is not None:
            self._stop_export(signals)
        if self.device is not None:
            self.device.close()

    def _stop_export(self, signals: list[int] | None) -> None:
        from .export.fuse import ExportBusy
        seen = len(signals) if signals is not None else 0
        warned = False
        while True:
            try:
                self.export.stop()
                return
            except ExportBusy as exc:
                if signals is None or len(signals) > seen:
                    self.export.stop(force=True, timeout_s=1.0)
                    return
                if not warned:
                    log.warning("%s; serving until it is released (signal again to stop now)",
                                exc)
                    warned = True
                time.sleep(0.5)


def _disconnect_nbd(device: str) -> None:
    from .nbdlink import NbdNetlink
    with contextlib.suppress(MountError, OSError):
        netlink = NbdNetlink()
        netlink.disconnect(device)
        netlink.close()


class _Daemon:
    """Everything one layer mount holds while it is up, and its teardown in the right order."""

    def __init__(self, source: str, mountpoint: Path, *, meta: Path, zinfo: Path | None,
                 registry: RegistryOptions, via: str, paths: StatePaths) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.meta = meta
        self.zinfo = zinfo
        self.registry = registry
        self.via = via
        self.paths = paths
        self.layer = LayerMount(source, mountpoint, meta=meta, zinfo=zinfo, registry=registry,
                                fuse_dir=paths.fuse_dir, nbd_socket=paths.nbd_socket,
                                backend=str(paths.record))
        self.record: MountRecord | None = None

    def start(self) -> MountRecord:
        record = initial_record(self.source, self.mountpoint, meta=self.meta, zinfo=self.zinfo,
                                registry=self.registry, via=self.via, paths=self.paths)
        self.paths.save(record)  # first, so that umount can clean up after a crash from here on
        transport = self.layer.start(self.via)
        os.listdir(self.mountpoint)  # the mount answers
        self.record = record.with_changes(transport=transport, **self.layer.record_fields())
        self.paths.save(self.record)
        assert self.layer.device is not None
        self.paths.save_stats(collect_stats(self.layer.device))
        return self.record

    def serve(self, stop: threading.Event) -> None:
        """Write stats every STATS_INTERVAL_S until a stop signal, or until the EROFS mount or
        the FUSE export is gone (someone ran a plain umount)."""
        assert self.layer.device is not None
        while not stop.wait(STATS_INTERVAL_S):
            with contextlib.suppress(HybridErofsError):
                self.paths.save_stats(collect_stats(self.layer.device))
            if not _erofs_mounted(self.mountpoint):
                log.info("%s is no longer mounted; stopping", self.mountpoint)
                self.layer.mounted = False
                return
            if not self.layer.export_running:
                log.warning("the FUSE export ended; stopping")
                return

    def teardown(self, *, signals: list[int] | None = None) -> None:
        """EROFS first, then loop / FUSE / NBD, then the device and the state files."""
        self.layer.unmount()
        self.layer.release(signals=signals)
        self.paths.remove()


def initial_record(source: str, mountpoint: Path, *, meta: Path | None, zinfo: Path | None,
                   registry: RegistryOptions, via: str, paths: StatePaths) -> MountRecord:
    """The record of a mount being started by this process; no secret goes into it."""
    settings = RegistrySettings(
        platform=registry.platform, layer=registry.layer, blob=registry.blob,
        username=registry.username, insecure=registry.insecure,
        cache_dir=str(registry.cache_dir) if registry.cache_dir else None,
        password_from="stdin" if registry.password is not None else None)
    return MountRecord(
        mountpoint=str(mountpoint), source=source, meta=str(meta) if meta else None,
        zinfo=str(zinfo) if zinfo else None, via=via, transport="starting",
        daemon_pid=os.getpid(), daemon_start_time=process_start_time(os.getpid()),
        log_file=str(paths.log), created=time.time(), registry=settings)


def _describe(holders: dict[int, str]) -> str:
    return ", ".join(f"{pid} ({name})" for pid, name in sorted(holders.items()))


@contextlib.contextmanager
def _stop_requests() -> Iterator[tuple[threading.Event, list[int]]]:
    """SIGTERM/SIGINT/SIGHUP set the event and are counted; handlers restored after."""
    stop = threading.Event()
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop, received
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}
    try:
        yield stop, received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) that we are ready; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class DaemonBody(Protocol):
    """What serve_daemon drives: a layer mount (_Daemon) or an image mount (imagemount)."""

    def start(self) -> MountRecord: ...

    def serve(self, stop: threading.Event) -> None: ...

    def teardown(self, *, signals: list[int] | None = None) -> None: ...


def serve_daemon(mountpoint: str | os.PathLike[str], make: Callable[[Path, StatePaths], DaemonBody],
                 *, via: str, ready_fd: int | None = None,
                 ready: Callable[[MountRecord], None] | None = None) -> None:
    """Mount in this process with `make(mountpoint, paths)` and serve until SIGTERM/SIGINT/
    SIGHUP or an outside umount, then unmount everything (a daemon's body, and --foreground).

    `ready_fd`: a pipe to the parent, told "ready" or "error: <reason>" once.
    """
    report = _Reporter(ready_fd)
    try:
        require_root()
        if via not in VIAS:
            raise ValueError(f"'via' must be one of {', '.join(VIAS)} (got {via!r})")
        paths = StatePaths.for_mountpoint(os.path.realpath(mountpoint))
        clear_stale(paths)  # first: a dead daemon's mounts may still sit there
        path = check_mountpoint(mountpoint)
        with _stop_requests() as (stop, received):
            daemon = make(path, paths)
            try:
                record = daemon.start()
            except BaseException:
                daemon.teardown()
                raise
            try:
                log.info("mounted %s on %s via %s", record.source, path, record.transport)
                report.ready()
                _sd_notify(f"READY=1\nSTATUS=mounted on {path}\nMAINPID={os.getpid()}")
                if ready is not None:
                    ready(record)
                daemon.serve(stop)
            finally:
                _sd_notify("STOPPING=1")
                daemon.teardown(signals=received)
    except HybridErofsError as exc:
        report.error(str(exc))
        raise
    except OSError as exc:
        report.error(f"{mountpoint}: {exc.strerror or exc}")
        raise MountError(f"{mountpoint}: {exc.strerror or exc}") from exc
    except BaseException as exc:
        report.error(f"{mountpoint}: internal error: {exc!r}")
        raise
    finally:
        report.close()


def run_mount(source: str, mountpoint: str | os.PathLike[str], *, meta: Path,
              zinfo: Path | None = None, registry: RegistryOptions | None = None,
              via: str = "auto", ready_fd: int | None = None,
              ready: Callable[[MountRecord], None] | None = None) -> None:
    """Mount layer `source` in this process and serve until SIGTERM/SIGINT/SIGHUP or an outside
    umount, then unmount everything (the daemon's body, and `mount --foreground`).

    `ready_fd`: a pipe to the parent `mount`, told "ready" or "error: <reason>" once.
    """
    def make(path: Path, paths: StatePaths) -> DaemonBody:
        return _Daemon(source, path, meta=meta, zinfo=zinfo,
                       registry=registry or RegistryOptions(), via=via, paths=paths)

    serve_daemon(mountpoint, make, via=via, ready_fd=ready_fd, ready=ready)


class _Reporter:
    """The daemon's end of the readiness pipe: one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode())
        self.close()

    def ready(self) -> None:
        self._send("ready")

    def error(self, message: str) -> None:
        self._send(f"error: {message}")

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


# -- the parent: start a daemon and wait for it ---------------------------------------------------

def absolute_source(source: str) -> str:
    """A local layer file as an absolute path (the daemon runs in /); references unchanged."""
    if is_local(source) and source != "-":
        return os.path.abspath(source)
    return source


def mount_layer(source: str, mountpoint: str | os.PathLike[str], *, meta: Path,
                zinfo: Path | None = None, registry: RegistryOptions | None = None,
                via: str = "auto", foreground: bool = False,
                timeout_s: float = READY_TIMEOUT_S) -> MountRecord | None:
    """Mount layer `source` (a local layer file or a registry reference) on `mountpoint`.

    Background (default): start a daemon (`hybrid-erofs mount --foreground`, new session, its
    output in the mount's log file) and return its record once the mount answers. Any failure
    raises MountError (or the library error that caused it) with nothing left mounted or
    running. `foreground=True`: serve in this process until a stop signal (run_mount).
    A registry password travels to the daemon through a pipe, never argv or the state record.
    """
    registry = registry or RegistryOptions()
    if via not in VIAS:
        raise ValueError(f"'via' must be one of {', '.join(VIAS)} (got {via!r})")
    source = absolute_source(source)
    meta = Path(os.path.abspath(meta))
    zinfo = Path(os.path.abspath(zinfo)) if zinfo is not None else None
    if foreground:
        run_mount(source, mountpoint, meta=meta, zinfo=zinfo, registry=registry, via=via)
        return None
    path, paths = prepare_mount(mountpoint)

    def argv(ready_fd: int) -> list[str]:
        return daemon_argv(source, path, meta=meta, zinfo=zinfo, registry=registry, via=via,
                           ready_fd=ready_fd)

    return spawn_daemon(argv, path, registry=registry, paths=paths, timeout_s=timeout_s)


def prepare_mount(mountpoint: str | os.PathLike[str]) -> tuple[Path, StatePaths]:
    """Before spawning a daemon: root, a dead daemon's leftovers cleaned, a usable mountpoint
    (absolute, resolved) and its state paths."""
    require_root()
    paths = StatePaths.for_mountpoint(os.path.realpath(mountpoint))
    clear_stale(paths)  # first: a dead daemon's mounts may still sit there
    path = check_mountpoint(mountpoint)
    paths.prepare()
    return path, paths


def registry_argv(registry: RegistryOptions) -> list[str]:
    """The registry options as CLI flags; no secret (a password is `--password-stdin`)."""
    argv: list[str] = []
    for flag, value in (("--platform", registry.platform), ("--layer", registry.layer),
                        ("--blob", registry.blob), ("--username", registry.username),
                        ("--cache-dir", registry.cache_dir)):
        if value is not None:
            argv += [flag, str(value)]
    if registry.insecure:
        argv.append("--insecure")
    if registry.password is not None:
        argv.append("--password-stdin")
    return argv


def daemon_argv(source: str, mountpoint: Path, *, meta: Path, zinfo: Path | None,
                registry: RegistryOptions, via: str, ready_fd: int) -> list[str]:
    """The daemon's command line; holds no secret (the password goes through stdin)."""
    argv = [sys.executable, "-m", "hybrid_erofs", "-v", "mount", "--foreground",
            "--_daemon-ready-fd", str(ready_fd), "--meta", str(meta), "--via", via]
    if zinfo is not None:
        argv += ["--zinfo", str(zinfo)]
    return [*argv, *registry_argv(registry), "--", source, str(mountpoint)]


def spawn_daemon(argv: Callable[[int], list[str]], mountpoint: Path, *,
                 registry: RegistryOptions, paths: StatePaths,
                 timeout_s: float) -> MountRecord:
    """Start the daemon `argv(ready_fd)` (new session, cwd /, output to the log), hand it the
    password on stdin, and wait until it says "ready"; on any failure clean up after it and
    raise MountError."""
    read_fd, write_fd = os.pipe()
    try:
        with open(paths.log, "ab") as log_file:
            process = subprocess.Popen(
                argv(write_fd), stdin=subprocess.PIPE if registry.password is not None else
                subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), start_new_session=True, cwd="/")
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    # Reap the daemon when it ends, should this process live that long (no zombie).
    threading.Thread(target=process.wait, name="mount-daemon-reaper", daemon=True).start()
    try:
        if process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(f"{registry.password}\n".encode())
                process.stdin.close()
        answer = _await_ready(read_fd, process, timeout_s)
    finally:
        os.close(read_fd)
    if answer.startswith("error: "):
        _wait_exit(process)
        _cleanup(paths, paths.load(), keep_log=False)
        raise MountError(answer.removeprefix("error: "))
    if answer != "ready":
        if process.poll() is None:
            process.terminate()
            _wait_exit(process)
        _cleanup(paths, paths.load(), keep_log=True)
        reason = (f"not ready within {timeout_s:.0f}s" if answer == "timeout" else
                  f"mount daemon exited with status {process.returncode} before the mount "
                  f"was ready")
        raise MountError(f"{mountpoint}: {reason}; see {paths.log}")
    record = paths.load()
    try:
        if record is None:
            raise MountError(f"{mountpoint}: the daemon left no state record")
        os.listdir(mountpoint)
    except (OSError, MountError) as exc:
        with contextlib.suppress(HybridErofsError):
            unmount(mountpoint, lazy=True)
        raise MountError(f"{mountpoint}: mounted but does not answer: {exc}") from exc
    return record


def _await_ready(fd: int, process: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The daemon's one line: "ready", "error: ...", "" when it died, "timeout"."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace").strip()


def _wait_exit(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# -- umount, status, reattach -------------------------------------------------------------------

def clear_stale(paths: StatePaths) -> None:
    """A record for this mountpoint: refuse if its daemon runs, else clean what it left."""
    record = paths.load()
    if record is None:
        return
    if daemon_alive(record):
        raise MountError(f"{record.mountpoint}: already mounted by hybrid-erofs "
                         f"(daemon pid {record.daemon_pid})")
    log.info("%s: cleaning up after a dead daemon (pid %d)", record.mountpoint,
             record.daemon_pid)
    _cleanup(paths, record)


def _cleanup(paths: StatePaths, record: MountRecord | None, *, keep_log: bool = False) -> None:
    """Remove whatever a dead (or stopped) daemon left: the mount on the mountpoint (EROFS, or
    an image's overlay), loop devices, NBD devices, FUSE mounts (an image's layer mounts too),
    state files. Lazy where needed: the data behind them is gone anyway."""
    if record is not None:
        mountpoint = Path(record.mountpoint)
        if _fs_mounted(mountpoint, record.fstype):
            _umount_anyway(mountpoint)
        if not record.is_image:
            disk = record.disk_path or str(paths.fuse_dir / DISK_NAME)
            _detach_loops(disk, record.loop_device)
            if record.nbd_device is not None:
                _disconnect_nbd(record.nbd_device)
    if record is None or record.is_image:
        _cleanup_image(paths, record)
    fuse_dir = Path(record.fuse_dir) if record and record.fuse_dir else paths.fuse_dir
    while mounted_at(fuse_dir) is not None:
        _umount_anyway(fuse_dir)
    paths.remove(keep_log=keep_log)


def _cleanup_image(paths: StatePaths, record: MountRecord | None) -> None:
    """An image's layers: their EROFS mounts, loop and NBD devices, then their FUSE mounts."""
    image_dir = Path(record.image_dir) if record and record.image_dir else paths.image_dir
    for _ in range(2):  # a mount stacked on another one shows up again after the first pass
        for entry in reversed(mounts_under(image_dir)):
            if not entry.fstype.startswith("fuse"):
                _umount_anyway(entry.mountpoint)
    layers = record.layers if record is not None else ()
    for n, layer in enumerate(layers):
        _detach_loops(layer.disk_path or str(paths.layer_fuse_dir(n) / DISK_NAME),
                      layer.loop_device)
        if layer.nbd_device is not None:
            _disconnect_nbd(layer.nbd_device)
    while found := mounts_under(image_dir):
        for entry in reversed(found):
            _umount_anyway(entry.mountpoint)


def _umount_anyway(mountpoint: str | os.PathLike[str]) -> None:
    try:
        umount(mountpoint)
    except MountBusy:
        umount(mountpoint, lazy=True)


def _detach_loops(disk: str, recorded: str | None) -> None:
    for loop in {*loops_backed_by(disk), *([recorded] if recorded else [])}:
        with contextlib.suppress(MountError):
            detach_loop(loop, backing=disk)


def _find(mountpoint: str | os.PathLike[str]) -> tuple[Path, StatePaths, MountRecord]:
    path = Path(os.path.realpath(mountpoint))
    paths = StatePaths.for_mountpoint(path)
    record = paths.load()
    if record is None:
        raise MountError(f"{mountpoint}: not mounted by hybrid-erofs "
                         f"(`hybrid-erofs status` lists its mounts)")
    return path, paths, record


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False,
            timeout_s: float = _STOP_TIMEOUT_S) -> str:
    """Unmount EROFS (an image's overlay), stop the daemon (which unmounts an image's layers
    and releases loop/FUSE/NBD), remove the state.

    A busy mount without `lazy` raises MountBusy naming the processes and changes nothing.
    A dead daemon's leftovers are cleaned. Returns a one-line report.
    """
    require_root()
    path, paths, record = _find(mountpoint)
    alive = daemon_alive(record)
    if _fs_mounted(path, record.fstype):
        if lazy:
            umount(path, lazy=True)
        else:
            holders = {pid: name for pid, name in users_of(str(path)).items()
                       if pid != os.getpid()}
            if holders:
                raise MountBusy(f"{mountpoint}: busy: used by {_describe(holders)}; stop them "
                                f"or use --lazy", pids=tuple(sorted(holders)))
            try:
                umount(path)
            except MountBusy:
                if alive:
                    raise MountBusy(f"{mountpoint}: busy (no process holds it: a nested mount "
                                    f"or a bind mount?); use --lazy") from None
                umount(path, lazy=True)  # its daemon is dead: nothing there can be read
    if alive:
        os.kill(record.daemon_pid, signal.SIGTERM)
        deadline = time.monotonic() + (2.0 if lazy else timeout_s)
        while daemon_alive(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        if daemon_alive(record):
            if lazy:
                return (f"{mountpoint}: detached; daemon {record.daemon_pid} keeps serving "
                        f"open files until they are closed")
            os.kill(record.daemon_pid, signal.SIGKILL)
            while daemon_alive(record) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
    _cleanup(paths, record)
    return f"unmounted {mountpoint}" + ("" if alive else " (its daemon had died; cleaned up)")


@dataclass(frozen=True, slots=True)
class MountStatus:
    """One mount as `status` shows it."""

    record: MountRecord
    alive: bool
    mounted: bool
    stats: dict[str, Any]

    @property
    def state(self) -> str:
        if not self.alive:
            return "stale"
        return "mounted" if self.mounted else "detached"

    @property
    def layer_count(self) -> int:
        return len(self.record.layers) if self.record.is_image else 1

    @property
    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.record.created)

    def to_dict(self) -> dict[str, Any]:
        return {"mountpoint": self.record.mountpoint, "source": self.record.source,
                "kind": self.record.kind, "layers": self.layer_count,
                "via": self.record.transport, "state": self.state, "daemon_alive": self.alive,
                "daemon_pid": self.record.daemon_pid, "uptime_s": round(self.uptime_s, 1),
                "log_file": self.record.log_file, "stats": self.stats}


def mount_statuses(*, prune: bool = False) -> list[MountStatus]:
    """Every recorded mount; `prune` cleans the stale ones (their daemon died) after listing."""
    found: list[MountStatus] = []
    for paths, record in list_records():
        alive = daemon_alive(record)
        status = MountStatus(record, alive, _fs_mounted(Path(record.mountpoint), record.fstype),
                             paths.load_stats())
        found.append(status)
        if prune and not alive:
            _cleanup(paths, record)
    return found


def reattach(mountpoint: str | os.PathLike[str], *, password: str | None = None,
             timeout_s: float = READY_TIMEOUT_S) -> MountRecord:
    """Restore a mount whose daemon died: tear down what is left, mount again from the record.

    FUSE cannot resume: once its daemon is gone the kernel has aborted the connection and the
    EROFS mount on the file only returns EIO, so this is umount + mount (open files are lost).
    Registry credentials are read again from their source (auth files), or `password`.
    An image mount is mounted again from the layers its record lists.
    """
    require_root()
    path, paths, record = _find(mountpoint)
    if daemon_alive(record):
        try:
            os.listdir(path)
        except OSError:
            unmount(path, lazy=True)
        else:
            raise MountError(f"{mountpoint}: daemon {record.daemon_pid} is alive and the mount "
                             f"answers: nothing to reattach")
    else:
        _cleanup(paths, record)
    settings = record.registry
    if settings.password_from == "stdin" and password is None:
        raise MountError(f"{mountpoint}: was mounted with --password-stdin: give the password "
                         f"again (--password-stdin)")
    registry = RegistryOptions(
        platform=settings.platform, layer=settings.layer, blob=settings.blob,
        username=settings.username, password=password, insecure=settings.insecure,
        cache_dir=Path(settings.cache_dir) if settings.cache_dir else None)
    if record.is_image:
        from .imagemount import ImageLayer, mount_image
        layers = [ImageLayer(layer.source, Path(layer.meta),
                             Path(layer.zinfo) if layer.zinfo else None, layer.blob)
                  for layer in record.layers]
        again = mount_image(record.source, path, layers, registry=registry, via=record.via,
                            timeout_s=timeout_s)
        assert again is not None
        return again
    assert record.meta is not None
    remounted = mount_layer(record.source, path, meta=Path(record.meta),
                            zinfo=Path(record.zinfo) if record.zinfo else None,
                            registry=registry, via=record.via, timeout_s=timeout_s)
    assert remounted is not None
    return remounted


def status_json(statuses: list[MountStatus]) -> str:
    return json.dumps([s.to_dict() for s in statuses], indent=2, sort_keys=True)


__all__ = [
    "DISK_NAME",
    "READY_TIMEOUT_S",
    "VIAS",
    "DaemonBody",
    "LayerMount",
    "MountStatus",
    "absolute_source",
    "check_mountpoint",
    "clear_stale",
    "collect_stats",
    "daemon_alive",
    "daemon_argv",
    "initial_record",
    "mount_layer",
    "mount_statuses",
    "prepare_mount",
    "reattach",
    "registry_argv",
    "require_root",
    "run_mount",
    "serve_daemon",
    "spawn_daemon",
    "status_json",
    "unmount",
]
