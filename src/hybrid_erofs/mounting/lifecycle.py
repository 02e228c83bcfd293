"""The mount lifecycle shared by layer and image mounts: a daemon process serves until a stop
signal or an outside umount; the parent spawns it and waits for "ready"; umount, status and the
cleanup after a dead daemon work from the state records (state.py).

Up: device, export, EROFS mount, record. Down: EROFS, then loop/FUSE/NBD, then the daemon, record.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from ..device import RegistryOptions, is_local
from ..errors import HybridErofsError, MountBusy, MountError
from ..metrics import DaemonMetrics, MetricsServer
from ..oci.layout import is_layout_reference, parse_layout_reference
from ..printable import printable_message
from ..source import ByteSource, Releasing
from ..sources.metered import MeteredSource, iter_stages
from ..units import format_duration, format_size
from .kernel import (
    detach_loop,
    loops_backed_by,
    mount_table,
    mounted_at,
    mounts_under,
    process_alive,
    process_start_time,
    umount,
    users_of,
)
from .nbdlink import disconnect_quietly
from .state import (
    DISK_NAME,
    RUNTIME_ENV,
    MountRecord,
    RegistrySettings,
    StatePaths,
    list_records,
)
from .stats import StatsServer, cache_samples, daemon_stats, query_stats
from .utab import forget_helper, has_helper_entry, record_helper

log = logging.getLogger(__name__)

VIAS = ("auto", "fuse", "loop", "nbd")
STATS_INTERVAL_S = 2.0
READY_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 15.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# -- checks -------------------------------------------------------------------------------------

def require_root(command: str) -> None:
    """MountError naming `command` (mount, mount-image, umount...) when not run as root."""
    if os.geteuid() != 0:
        raise MountError(f"{command}: needs root (mounting and unmounting EROFS need "
                         f"CAP_SYS_ADMIN)")

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

def fs_mounted(mountpoint: Path, fstype: str) -> bool:
    return any(e.mountpoint == str(mountpoint) and e.fstype == fstype for e in mount_table())

def daemon_alive(record: MountRecord) -> bool:
    return process_alive(record.daemon_pid, record.daemon_start_time)

def initial_record(source: str, mountpoint: Path, *, meta: Path | None, zinfo: Path | None,
                   registry: RegistryOptions, via: str, paths: StatePaths) -> MountRecord:
    """The record of a mount being started by this process; no secret goes into it."""
    settings = RegistrySettings(
        platform=registry.platform, layer=registry.layer, blob=registry.blob,
        username=registry.username, insecure=registry.insecure,
        cache_dir=str(registry.cache_dir) if registry.cache_dir else None,
        cache_max_bytes=registry.cache_max_bytes, retries=registry.retries,
        retry_delay_s=registry.retry_delay_s, failure_ttl_s=registry.failure_ttl_s,
        memory_cache_bytes=registry.memory_cache_bytes,
        password_from="stdin" if registry.password is not None else None)
    return MountRecord(
        mountpoint=str(mountpoint), source=source, meta=str(meta) if meta else None,
        zinfo=str(zinfo) if zinfo else None, via=via, transport="starting",
        daemon_pid=os.getpid(), daemon_start_time=process_start_time(os.getpid()),
        log_file=str(paths.log), created=time.time(), registry=settings)

def describe_holders(holders: dict[int, str]) -> str:
    return ", ".join(f"{pid} ({name})" for pid, name in sorted(holders.items()))


# -- the daemon -----------------------------------------------------------------------------------

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
    """What serve_daemon drives: a layer mount (layer.py) or an image mount (image.py)."""

    def start(self) -> MountRecord: ...

    def layers(self) -> list[tuple[str, ByteSource]]:
        """Each layer's device (blob digest or file as its name), bottom first, once started."""
        ...

    def gone(self) -> str | None:
        """Why serving should stop (someone unmounted it, an export ended), or None."""
        ...

    def teardown(self, *, signals: list[int] | None = None) -> None: ...

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# Buffers up to this size come from the arenas and are reused: a full read's 1 MiB FUSE replies
# and 4 MiB inflate outputs, each mmap'ed, zero-filled by page faults and unmapped again at a
# fixed 256 KiB threshold, cost the daemon 40 % of its CPU (docs/benchmarks.md, full read).
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 8 << 20  # free memory at an arena's top kept for reuse between trims
TRIM_EVERY_S = 2.0  # how often free arena pages are given back (malloc_trim)
# A layer without reads for this long gives up the memory its stages can fill again (decoded
# spans, verified spans, chunks fetched ahead): an idle mount shrinks to its start-up size.
IDLE_RELEASE_S = 60.0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (trim_malloc runs every TRIM_EVERY_S)."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def bound_malloc() -> None:
    """Keep a long-lived daemon's heap from growing past what its caches hold: glibc gives
    each thread that allocates an arena of its own (up to 8 per core), and its dynamic mmap
    threshold moves large buffers (spans, chunks) into those arenas, where freed memory stays
    fragmented. Two arenas, fixed MMAP_THRESHOLD and TRIM_THRESHOLD (buffers are reused, not
    mapped and zero-filled anew for every read), and `trim_malloc` every TRIM_EVERY_S to give
    the free pages inside the arenas back (docs/benchmarks.md, daemon memory). A no-op
    without glibc."""
    libc = _libc()
    try:
        if libc is not None:
            libc.mallopt(_M_ARENA_MAX, 2)
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except AttributeError:
        pass


def trim_malloc() -> None:
    """Give the free pages of every malloc arena back to the system (glibc malloc_trim)."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass


def serve_daemon(mountpoint: str | os.PathLike[str], make: Callable[[Path, StatePaths], DaemonBody],
                 *, via: str, ready_fd: int | None = None,
                 ready: Callable[[MountRecord], None] | None = None,
                 metrics_address: tuple[str, int] | None = None,
                 command: str = "mount") -> None:
    """Mount in this process with `make(mountpoint, paths)` and serve until SIGTERM/SIGINT/
    SIGHUP or an outside umount, then unmount everything (a daemon's body, and --foreground).

    While serving, `status` is answered live on the mount's stats socket (and a copy written
    to its stats file every STATS_INTERVAL_S); with `metrics_address` (host, port; port 0
    picks one, recorded) Prometheus metrics are served at http://HOST:PORT/metrics.
    `ready_fd`: a pipe to the parent, told "ready" or "error: <reason>" once.
    """
    report = _Reporter(ready_fd)
    bound_malloc()
    try:
        require_root(command)
        if via not in VIAS:
            raise ValueError(f"'via' must be one of {', '.join(VIAS)} (got {via!r})")
        paths = StatePaths.for_mountpoint(os.path.realpath(mountpoint))
        clear_stale(paths)  # first: a dead daemon's mounts may still sit there
        path = check_mountpoint(mountpoint)
        metrics = DaemonMetrics()
        with contextlib.ExitStack() as services, _stop_requests() as (stop, received):
            if metrics_address is not None:  # first: a busy port fails before anything mounts
                metrics_server = MetricsServer(metrics, *metrics_address)
                services.callback(metrics_server.close)
            daemon = make(path, paths)
            try:
                record = daemon.start()
                for name, device in daemon.layers():
                    metrics.add_layer(name, device)
                metrics.add_provider(lambda: cache_samples(metrics))
                if metrics_address is not None:
                    record = record.with_changes(metrics_address=metrics_server.address)
                    paths.save(record)
                stats_server = StatsServer(paths.stats_socket,
                                           lambda: _daemon_status(daemon, metrics))
            except BaseException:
                daemon.teardown()
                raise
            try:
                log.info("mounted %s on %s via %s", record.source, path, record.transport)
                report.ready()
                _sd_notify(f"READY=1\nSTATUS=mounted on {path}\nMAINPID={os.getpid()}")
                if ready is not None:
                    ready(record)
                _serve(daemon, metrics, paths, stop)
            finally:
                _sd_notify("STOPPING=1")
                stats_server.close()
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

def _daemon_status(daemon: DaemonBody, metrics: DaemonMetrics) -> dict[str, Any]:
    """What `status` shows: the metrics, and how each layer's index was obtained and whether
    it was verified (sources/gate.py), the layer most in doubt as "trust"."""
    stats = daemon_stats(metrics)
    states = getattr(daemon, "trust_states", None)
    if states is not None:
        layers = states()
        if layers:
            stats["trust_layers"] = layers
            stats["trust"] = next((s for s in layers if s.get("state") == "failed"), None) or next(
                (s for s in layers if s.get("index") == "unbound" and s.get("state") != "verified"),
                None) or layers[-1]
    details = getattr(daemon, "layer_details", None)
    if callable(details):  # what is not a number: spans reads touched, why a fetch stopped
        for entry, extra in zip(stats.get("layers", []), details(), strict=False):
            entry.update(extra)
    return stats


class IdleRelease:
    """Per layer: once no read has come for `idle_s`, drop what its stages keep in memory and
    can make again (`Releasing`: decoded spans, verified spans, chunks fetched ahead), and
    again at each tick while it stays idle (a background fetch may fill them meanwhile). A
    read after that decodes from the layer store, the chunk cache or the blob again."""

    def __init__(self, idle_s: float = IDLE_RELEASE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self._clock = clock
        # (position, name) of a layer (an image may hold one blob twice) -> (reads, since when)
        self._seen: dict[tuple[int, str], tuple[int, float]] = {}
        self._logged: set[tuple[int, str]] = set()  # layers logged in this idle spell

    def tick(self, layers: list[tuple[str, ByteSource]]) -> int:
        """Look at each layer's reads; release the idle ones. Returns the bytes dropped."""
        now = self._clock()
        released = 0
        for position, (name, device) in enumerate(layers):
            key = (position, name)
            stages = list(iter_stages(device))
            reads = sum(stage.stats.reads for stage in stages
                        if isinstance(stage, MeteredSource))
            seen = self._seen.get(key)
            if seen is None or seen[0] != reads:
                self._seen[key] = (reads, now)
                self._logged.discard(key)
                continue
            if now - seen[1] < self.idle_s:
                continue
            dropped = sum(stage.release_memory() for stage in stages
                          if isinstance(stage, Releasing))
            if dropped and key not in self._logged:
                log.info("%s: no reads for %s: released %s of cached layer data", name,
                         format_duration(now - seen[1]), format_size(dropped))
                self._logged.add(key)
            released += dropped
        return released


def _serve(daemon: DaemonBody, metrics: DaemonMetrics, paths: StatePaths,
           stop: threading.Event) -> None:
    """Write the stats file every STATS_INTERVAL_S until a stop signal or the daemon is gone;
    give free heap pages back every TRIM_EVERY_S, and the caches of layers idle for
    IDLE_RELEASE_S."""
    idle, failed = IdleRelease(), False
    while True:
        with contextlib.suppress(HybridErofsError):
            paths.save_stats(_daemon_status(daemon, metrics))
        try:
            idle.tick(daemon.layers())
        except Exception:  # a bug here must not end the mount: log it once, serve on
            if not failed:
                log.exception("releasing the caches of idle layers failed")
            failed = True
        trim_malloc()
        if stop.wait(min(STATS_INTERVAL_S, TRIM_EVERY_S)):
            return
        reason = daemon.gone()
        if reason is not None:
            log.info("%s; stopping", reason)
            return

class _Reporter:
    """The daemon's end of the readiness pipe: one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, (printable_message(line) + "\n").encode())
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
    """A local layer file or an `oci:DIR[:TAG]` layout with an absolute path (the daemon runs
    in /); registry references unchanged."""
    if is_layout_reference(source) and not os.path.exists(source):
        layout = parse_layout_reference(source)
        return f"oci:{os.path.abspath(layout.path)}" + (f":{layout.tag}" if layout.tag else "")
    if is_local(source) and source != "-":
        return os.path.abspath(source)
    return source

def absolute_options(registry: RegistryOptions) -> RegistryOptions:
    """`registry` with an absolute --cache-dir (the daemon runs in /)."""
    if registry.cache_dir is None or registry.cache_dir.is_absolute():
        return registry
    return replace(registry, cache_dir=Path(os.path.abspath(registry.cache_dir)))

# Environment variables naming files that a daemon (cwd /) reads: made absolute for it.
_PATH_VARIABLES = ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", RUNTIME_ENV)

def daemon_environment() -> dict[str, str]:
    env = dict(os.environ)
    for name in _PATH_VARIABLES:
        if env.get(name):
            env[name] = os.path.abspath(env[name])
    return env

def prepare_mount(mountpoint: str | os.PathLike[str], *,
                  command: str = "mount") -> tuple[Path, StatePaths]:
    """Before spawning a daemon: root, a dead daemon's leftovers cleaned, a usable mountpoint
    (absolute, resolved) and its state paths."""
    require_root(command)
    paths = StatePaths.for_mountpoint(os.path.realpath(mountpoint))
    clear_stale(paths)  # first: a dead daemon's mounts may still sit there
    path = check_mountpoint(mountpoint)
    paths.prepare()
    return path, paths

def registry_argv(registry: RegistryOptions, *,
                  metrics_address: tuple[str, int] | None = None) -> list[str]:
    """The registry options (and `--metrics-address`) as CLI flags; no secret (a password is
    `--password-stdin`)."""
    argv: list[str] = []
    if metrics_address is not None:
        host, port = metrics_address
        argv += ["--metrics-address", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    for flag, value in (("--platform", registry.platform), ("--layer", registry.layer),
                        ("--blob", registry.blob), ("--username", registry.username),
                        ("--cache-dir", registry.cache_dir),
                        ("--cache-max-size", registry.cache_max_bytes),
                        ("--retries", registry.retries), ("--retry-delay", registry.retry_delay_s),
                        ("--failure-memory", registry.failure_ttl_s),
                        ("--memory-cache", registry.memory_cache_bytes)):
        if value is not None:
            argv += [flag, str(value)]
    if registry.insecure:
        argv.append("--insecure")
    if registry.password is not None:
        argv.append("--password-stdin")
    return argv

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
                pass_fds=(write_fd,), start_new_session=True, cwd="/",
                env=daemon_environment())
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
        cleanup_mount(paths, paths.load(), keep_log=False)
        raise MountError(answer.removeprefix("error: "))
    if answer != "ready":
        if process.poll() is None:
            process.terminate()
            _wait_exit(process)
        cleanup_mount(paths, paths.load(), keep_log=True)
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


# -- umount, status ---------------------------------------------------------------------------------

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
    cleanup_mount(paths, record)

def cleanup_mount(paths: StatePaths, record: MountRecord | None, *, keep_log: bool = False) -> None:
    """Remove whatever a dead (or stopped) daemon left: the mount on the mountpoint (EROFS, or
    an image's overlay), loop devices, NBD devices, FUSE mounts (an image's layer mounts too),
    state files. Lazy where needed: the data behind them is gone anyway."""
    if record is not None:
        mountpoint = Path(record.mountpoint)
        if fs_mounted(mountpoint, record.fstype):
            forget_helper(mountpoint)
            _umount_anyway(mountpoint)
        if not record.is_image:
            disk = record.disk_path or str(paths.fuse_dir / DISK_NAME)
            _detach_loops(disk, record.loop_device)
            if record.nbd_device is not None:
                disconnect_quietly(record.nbd_device)
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
            disconnect_quietly(layer.nbd_device)
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

def find_mount(mountpoint: str | os.PathLike[str]) -> tuple[Path, StatePaths, MountRecord]:
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
    require_root("umount")
    path, paths, record = find_mount(mountpoint)
    alive = daemon_alive(record)
    if fs_mounted(path, record.fstype):
        if lazy:
            forget_helper(path)
            umount(path, lazy=True)
        else:
            holders = {pid: name for pid, name in users_of(str(path)).items()
                       if pid != os.getpid()}
            if holders:
                raise MountBusy(f"{mountpoint}: busy: used by {describe_holders(holders)}; stop them "
                                f"or use --lazy", pids=tuple(sorted(holders)))
            helper = has_helper_entry(path)
            forget_helper(path)
            try:
                umount(path)
            except MountBusy:
                if alive:
                    if helper:  # still mounted: `umount` must keep finding its helper
                        record_helper(path)
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
    cleanup_mount(paths, record)
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
        stats = (query_stats(paths.stats_socket) if alive else None) or paths.load_stats()
        status = MountStatus(record, alive, fs_mounted(Path(record.mountpoint), record.fstype),
                             stats)
        found.append(status)
        if prune and not alive:
            cleanup_mount(paths, record)
    return found

def status_json(statuses: list[MountStatus]) -> str:
    return json.dumps([s.to_dict() for s in statuses], indent=2, sort_keys=True)


__all__ = [
    "READY_TIMEOUT_S",
    "STATS_INTERVAL_S",
    "VIAS",
    "DaemonBody",
    "MountStatus",
    "absolute_options",
    "absolute_source",
    "check_mountpoint",
    "cleanup_mount",
    "clear_stale",
    "daemon_alive",
    "describe_holders",
    "find_mount",
    "fs_mounted",
    "initial_record",
    "mount_statuses",
    "prepare_mount",
    "registry_argv",
    "require_root",
    "serve_daemon",
    "spawn_daemon",
    "status_json",
    "unmount",
]
