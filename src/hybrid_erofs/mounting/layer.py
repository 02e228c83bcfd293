"""A layer mount: one layer's device exported (a FUSE file, or kernel NBD) and mounted by the
kernel as EROFS, served by a daemon of its own (lifecycle.py). Image mounts (image.py) use
LayerMount once per layer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..device import RegistryOptions, open_device, open_layer_blob
from ..errors import LayerVerificationError, MountBusy, MountError
from ..fetching.attach import attach_fetcher
from ..fetching.background import BackgroundFetcher, FetchPolicy
from ..fetching.profile import profile_spans
from ..gzindex.format import GzipIndex, parse_index
from ..gzindex.lazy import LazyWindows
from ..gzindex.sidecar import sha256_digest
from ..indexing.publish import registry_client
from ..oci.artifact import has_content
from ..source import ByteSource
from ..sources.gate import LOCAL, NOT_VERIFIED, UNBOUND, VERIFIED, VERIFYING, GateSource
from ..sources.metered import MeteredSource, iter_stages
from ..sources.registry import RegistryBlobSource
from ..sources.stored import StoredLayerSource
from ..trust.bound import ZinfoLater, fetch_zinfo
from ..trust.verifier import LayerIndexFiles, LayerVerification, verify_layer
from .kernel import (
    KernelMountError,
    attach_loop,
    detach_loop,
    drop_page_cache,
    mount_erofs,
    set_restricted,
    umount,
    users_of,
)
from .lifecycle import (
    READY_TIMEOUT_S,
    VIAS,
    DaemonBody,
    absolute_options,
    absolute_source,
    describe_holders,
    fs_mounted,
    initial_record,
    prepare_mount,
    registry_argv,
    serve_daemon,
    spawn_daemon,
)
from .nbdlink import disconnect_quietly
from .state import DISK_NAME, MountRecord, StatePaths
from .utab import forget_helper

log = logging.getLogger(__name__)

NO_READ_METRICS_ENV = "HYBRID_EROFS_NO_READ_METRICS"


def layer_label(device: ByteSource, fallback: str) -> str:
    """How metrics name a layer: its registry blob digest, else `fallback` (a file path)."""
    for stage in iter_stages(device):
        if isinstance(stage, RegistryBlobSource):
            return stage.descriptor.digest
    return fallback


class LayerMount:
    """One layer up: its device, the device's export (a FUSE file, or kernel NBD) and the
    kernel's EROFS mount of it on `target`. Used once by a layer mount, once per layer by an
    image mount (image.py). Stop: `unmount()`, then `release()`.
    """

    def __init__(self, source: str, target: Path, *, meta: Path, zinfo: Path | None,
                 registry: RegistryOptions, fuse_dir: Path, nbd_socket: Path,
                 backend: str, trust: str = LOCAL,
                 root_owner: tuple[int, int] | None = None,
                 fetch: FetchPolicy | None = None, prefetch: Path | None = None,
                 later: ZinfoLater | None = None) -> None:
        self.source = source
        self.trust = trust
        self.root_owner = root_owner  # what the root must be owned by (index --all-layers)
        self.gate: GateSource | None = None
        self.restricted = trust == UNBOUND  # nosuid,nodev until verified
        self._verifier: threading.Thread | None = None
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
        self.label = registry.blob or source  # metrics' layer label: the blob digest if known
        self.fetch = fetch  # background fetch policy; None: off
        self.prefetch = prefetch  # a prefetch profile from the (verified) image index
        self.later = later  # the zinfo is fetched here, after the profile's spans
        self.windows: LazyWindows | None = None
        self.fetcher: BackgroundFetcher | None = None

    def start(self, via: str) -> str:
        """Open the device, start the background fetch (a prefetch profile's spans at once:
        they come in while the device is exported and mounted), export it and mount it; the
        transport that runs."""
        first = profile_spans(self.prefetch, zinfo=self.zinfo)
        self.windows = self._lazy_windows(first)
        self.gate = GateSource(open_device(self.source, meta=self.meta, zinfo=self.zinfo,
                                           registry=self.registry, windows=self.windows,
                                           keep_decoded=self.trust != UNBOUND,
                                           # Decoded spans are kept (written to the layer
                                           # store) only while the layer is on its way to
                                           # local: without background fetch it stays lazy.
                                           store_reads=self.fetch is not None),
                               trust=self.trust, name=str(self.meta))
        # The benchmark of the metrics' own cost (tools/bench_metrics.py) turns the read
        # latency histogram off in one of its two daemons.
        self.device = MeteredSource(self.gate,
                                    latency=os.environ.get(NO_READ_METRICS_ENV) != "1")
        self.label = layer_label(self.device, self.registry.blob or self.source)
        self._start_fetch(first)  # stopped by release() if the mount fails
        return self._start_transport(via)

    def _lazy_windows(self, first: Sequence[int]) -> LazyWindows | None:
        """A layer whose zinfo is to come later (`later`, bound with its profile): started on
        the profile zinfo, the zinfo fetched after the profile's spans by the background
        fetch, or at once by a read that needs a window the profile zinfo lacks. Without a
        profile in use or a background fetch, the zinfo is fetched here, before anything.

        A daemon started again from its record (`mount --reattach`, the snapshotter's restore)
        goes the same way: a zinfo that came meanwhile is used when it has the digest the
        sidecar names (else it is fetched again, as the first mount would), and the profile
        zinfo only when it has its bound digest (else, or when it is gone, the zinfo is
        fetched first)."""
        later = self.later
        if later is None or self.zinfo is None:
            return None
        if self.zinfo.is_file():
            if has_content(self.zinfo, later.plain):
                return None
            log.warning("%s: not the zinfo its sidecar names (%s): fetched again", self.zinfo,
                        later.plain.digest)
        if self.fetch is None or not first or self.trust == UNBOUND:
            self._fetch_zinfo()
            return None
        path = later.profile_zinfo
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("%s: cannot read: %s; the zinfo is fetched first", path, exc.strerror)
            self._fetch_zinfo()
            return None
        digest = sha256_digest(data)
        if later.profile_digest is not None and digest != later.profile_digest:
            log.warning("%s: not the profile zinfo the image binds (%s, this file is %s): the "
                        "zinfo is fetched first", path, later.profile_digest, digest)
            self._fetch_zinfo()
            return None
        return LazyWindows(parse_index(data, name=str(path)), first, load=self._load_zinfo,
                           on_failure=self.fail, name=str(self.zinfo), digest=digest)

    def _fetch_zinfo(self) -> Path:
        assert self.later is not None and self.zinfo is not None
        with registry_client(self.source, self.registry, what="fetching the zinfo") as client:
            return fetch_zinfo(client, self.later, self.zinfo)

    def _load_zinfo(self) -> GzipIndex:
        path = self._fetch_zinfo()
        return parse_index(path.read_bytes(), name=str(path))

    def _start_fetch(self, first: Sequence[int]) -> None:
        if self.fetch is None or self.device is None:
            return
        windows = self.windows
        self.fetcher = attach_fetcher(self.device, policy=self.fetch, verify=self._verify_complete,
                                      on_failure=self.fail, first=first, name=self.label,
                                      before_rest=windows.load if windows is not None else None)
        if self.fetcher is not None:
            self.fetcher.start()

    def _verify_complete(self) -> None:
        """The background fetch's check of the complete layer: trust/verifier.py against the
        blob (local by now); a mismatch closes the gate (apply_verification) and raises."""
        result = self.verify_now()
        self.apply_verification(result)
        if not result.ok:
            raise LayerVerificationError(result.summary())

    def details(self) -> dict[str, Any]:
        """What `status` shows of this layer beyond its metrics: the spans reads touched
        (first read first, and when: what `profile` records) and why a background fetch
        stopped."""
        details: dict[str, Any] = {}
        stored = next((stage for stage in iter_stages(self.device)
                       if isinstance(stage, StoredLayerSource)), None)
        if stored is not None:
            reads = stored.first_reads()
            details["spans_read"] = [number for number, _when in reads]
            # time.monotonic(): comparable across the layers (and daemons) of one host
            details["spans_read_at"] = [when for _number, when in reads]
        if self.fetcher is not None:
            details["fetch_reason"] = self.fetcher.progress().reason
        return details

    def _mount_local(self) -> bool:
        """A layer complete and verified in the layer store: the kernel reads the meta and
        the stored layer data directly (file-backed EROFS, `-o device=`), no FUSE at all."""
        stored = next((stage for stage in iter_stages(self.device)
                       if isinstance(stage, StoredLayerSource)), None)
        if stored is None or not (stored.store.complete and stored.store.verified):
            return False
        try:
            mount_erofs(self.meta, self.target, restricted=self.restricted,
                        extra_device=stored.store.data_path)
        except KernelMountError as exc:
            log.info("%s; serving the stored layer through FUSE", exc)
            return False
        self.mounted = True
        return True

    def _start_transport(self, via: str) -> str:
        if via in ("auto", "fuse") and self._mount_local():
            return "local"
        transport = via
        if transport == "auto":
            from .nbdlink import nbd_devices
            transport = "nbd" if nbd_devices() else "fuse"
        if transport == "nbd":
            self._start_nbd()
            return transport
        return self._start_fuse(force_loop=transport == "loop")

    def _start_fuse(self, *, force_loop: bool) -> str:
        from ..export.fuse import FuseExport
        assert self.device is not None
        self.fuse_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The meta image is the device's head: EROFS reads it a block at a time.
        self.export = FuseExport(self.device, self.fuse_dir, name=DISK_NAME,
                                 head_bytes=self.meta.stat().st_size)
        self.export.start()
        disk = str(self.export.path)
        if not force_loop:
            try:
                mount_erofs(disk, self.target, restricted=self.restricted)
                self.mounted = True
                return "fuse"
            except KernelMountError as exc:
                # No file-backed EROFS in this kernel (ENOTBLK; some builds say EINVAL).
                if exc.errno not in (errno.ENOTBLK, errno.EINVAL):
                    raise
                log.info("%s; trying a loop device", exc)
        self.loop_device, fd = attach_loop(disk)
        try:
            mount_erofs(self.loop_device, self.target, restricted=self.restricted)
            self.mounted = True
        finally:
            os.close(fd)  # from here the mount holds the device; autoclear frees it at umount
        return "loop"

    def _start_nbd(self) -> None:
        from ..export.nbd import NbdServer
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
            mount_erofs(self.nbd_device, self.target, restricted=self.restricted)
            self.mounted = True
        finally:
            netlink.close()

    # -- trust at run time (docs/security.md) -------------------------------------------------

    def verify_in_background(self, *, on_done: Callable[[LayerMount], None] | None = None
                             ) -> threading.Thread:
        """Read the whole layer (through the shared chunk cache, so later reads hit it) and
        compare the index in use with it (trust/verifier.py) on a thread of its own; then
        `apply_verification`. `on_done(self)` is called after that."""
        assert self.gate is not None, "start() first"
        self.gate.set_state(VERIFYING, "reading the whole layer")

        def run() -> None:
            try:
                result = self.verify_now()
            except Exception as exc:  # noqa: BLE001 - reported in status and the log
                log.error("%s: could not verify the index against the layer: %s",
                          self.source, exc)
                if self.gate is not None:
                    self.gate.set_state(NOT_VERIFIED, f"verification could not run: {exc}")
            else:
                self.apply_verification(result)
            if on_done is not None:
                on_done(self)

        self._verifier = threading.Thread(target=run, name="verify-layer", daemon=True)
        self._verifier.start()
        return self._verifier

    def verify_now(self) -> LayerVerification:
        """Read the whole layer's blob and verify the index in use against it (blocking)."""
        blob, digest = open_layer_blob(self.source, self.registry)
        try:
            return verify_layer(blob, LayerIndexFiles(self.meta, self.zinfo),
                                blob_digest=digest, root_owner=self.root_owner,
                                name=self.registry.blob or self.source)
        finally:
            blob.close()

    def apply_verification(self, result: LayerVerification) -> None:
        """The verdict of trust/verifier.py on this layer's index (from `verify_now`, or the
        background fetch once the layer is complete): a mismatch closes the gate for good
        (`fail`); a match lifts nosuid,nodev from this layer's mount."""
        if not result.ok:
            self.fail(result.summary())
            return
        assert self.gate is not None
        self.gate.set_state(VERIFIED, result.summary())
        log.info("%s", result.summary())
        if self.restricted and self.mounted:
            set_restricted(self.target, False)
            self.restricted = False

    def fail(self, reason: str) -> None:
        """From now on every read of this layer fails with EIO (also pages the kernel had
        cached: the clean page cache is dropped); `status` and the log say why."""
        if self.gate is None or self.gate.is_closed:
            return
        self.gate.close_gate(reason)
        log.error("%s: the index does not describe the layer; every further read fails with "
                  "EIO: %s", self.source, reason)
        if self.mounted and not drop_page_cache():
            log.warning("could not drop the page cache: pages read before may still be served")

    def trust_state(self) -> dict[str, object]:
        """How this layer's index was obtained and what is known of it, for `status`."""
        state: dict[str, object] = {"layer": self.label}
        state.update(self.gate.to_json() if self.gate is not None else {"index": self.trust})
        return state

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
                    describe_holders(holders) or "no process found")
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
            disconnect_quietly(self.nbd_device)
        if self.nbd_server is not None:
            self.nbd_server.shutdown()
        if self.fetcher is not None:
            self.fetcher.stop()
        if self.export is not None:
            self._stop_export(signals)
        if self.device is not None:
            self.device.close()

    def _stop_export(self, signals: list[int] | None) -> None:
        from ..export.fuse import ExportBusy
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

class LayerDaemon:
    """Everything one layer mount holds while it is up, and its teardown in the right order."""

    def __init__(self, source: str, mountpoint: Path, *, meta: Path, zinfo: Path | None,
                 registry: RegistryOptions, via: str, paths: StatePaths,
                 trust: str = LOCAL, fetch: FetchPolicy | None = None,
                 prefetch: Path | None = None, later: ZinfoLater | None = None) -> None:
        self.source = source
        self.trust = trust
        self.mountpoint = mountpoint
        self.fetch = fetch
        self.meta = meta
        self.zinfo = zinfo
        self.registry = registry
        self.via = via
        self.paths = paths
        self.layer = LayerMount(source, mountpoint, meta=meta, zinfo=zinfo, registry=registry,
                                fuse_dir=paths.fuse_dir, nbd_socket=paths.nbd_socket,
                                backend=str(paths.record), trust=trust,
                                root_owner=discovered_root_owner(trust), fetch=fetch,
                                prefetch=prefetch, later=later)
        self.record: MountRecord | None = None

    def start(self) -> MountRecord:
        record = initial_record(self.source, self.mountpoint, meta=self.meta, zinfo=self.zinfo,
                                registry=self.registry, via=self.via,
                                paths=self.paths).with_changes(
            trust=self.trust, fetch=tuple(FetchPolicy.recorded(self.fetch)),
            prefetch=str(self.layer.prefetch) if self.layer.prefetch is not None else None,
            later=self.layer.later.to_json() if self.layer.later is not None else None)
        self.paths.save(record)  # first, so that umount can clean up after a crash from here on
        transport = self.layer.start(self.via)
        os.listdir(self.mountpoint)  # the mount answers
        self.record = record.with_changes(transport=transport, **self.layer.record_fields())
        self.paths.save(self.record)
        if self.trust == UNBOUND:
            # Mounted nosuid,nodev; reads fail with EIO once the index is found not to
            # describe the layer, and the restriction is lifted once it is found to.
            self.layer.verify_in_background()
        return self.record

    def trust_states(self) -> list[dict[str, object]]:
        return [self.layer.trust_state()]

    def layers(self) -> list[tuple[str, ByteSource]]:
        device = self.layer.device
        return [] if device is None else [(self.layer.label, device)]

    def layer_details(self) -> list[dict[str, Any]]:
        return [self.layer.details()]

    def gone(self) -> str | None:
        """The EROFS mount or the FUSE export is gone (someone ran a plain umount)."""
        if not fs_mounted(self.mountpoint, "erofs"):
            self.layer.mounted = False
            return f"{self.mountpoint} is no longer mounted"
        if not self.layer.export_running:
            return "the FUSE export ended"
        return None

    def teardown(self, *, signals: list[int] | None = None) -> None:
        """EROFS first, then loop / FUSE / NBD, then the device and the state files."""
        if self.layer.mounted:
            forget_helper(self.mountpoint)
        self.layer.unmount()
        self.layer.release(signals=signals)
        self.paths.remove()

def discovered_root_owner(trust: str) -> tuple[int, int] | None:
    """Indexes from a registry are made by `index --all-layers`, which gives a root without
    a tar entry to 0:0; files named on the command line are the user's (any owner)."""
    return None if trust == LOCAL else (0, 0)


def run_mount(source: str, mountpoint: str | os.PathLike[str], *, meta: Path,
              zinfo: Path | None = None, registry: RegistryOptions | None = None,
              via: str = "auto", ready_fd: int | None = None,
              ready: Callable[[MountRecord], None] | None = None,
              metrics_address: tuple[str, int] | None = None, trust: str = LOCAL,
              fetch: FetchPolicy | None = None, prefetch: Path | None = None,
              later: ZinfoLater | None = None) -> None:
    """Mount layer `source` in this process and serve until SIGTERM/SIGINT/SIGHUP or an outside
    umount, then unmount everything (the daemon's body, and `mount --foreground`).

    `ready_fd`: a pipe to the parent `mount`, told "ready" or "error: <reason>" once.
    `metrics_address`: (host, port) to serve Prometheus metrics on (lifecycle.serve_daemon).
    """
    def make(path: Path, paths: StatePaths) -> DaemonBody:
        return LayerDaemon(source, path, meta=meta, zinfo=zinfo,
                           registry=registry or RegistryOptions(), via=via, paths=paths,
                           trust=trust, fetch=fetch, prefetch=prefetch, later=later)

    serve_daemon(mountpoint, make, via=via, ready_fd=ready_fd, ready=ready,
                 metrics_address=metrics_address)

def mount_layer(source: str, mountpoint: str | os.PathLike[str], *, meta: Path,
                zinfo: Path | None = None, registry: RegistryOptions | None = None,
                via: str = "auto", foreground: bool = False,
                timeout_s: float = READY_TIMEOUT_S,
                metrics_address: tuple[str, int] | None = None,
                trust: str = LOCAL, fetch: FetchPolicy | None = None,
                prefetch: Path | None = None,
                later: ZinfoLater | None = None) -> MountRecord | None:
    """Mount layer `source` (a local layer file or a registry reference) on `mountpoint`.

    Background (default): start a daemon (`hybrid-erofs mount --foreground`, new session, its
    output in the mount's log file) and return its record once the mount answers. Any failure
    raises MountError (or the library error that caused it) with nothing left mounted or
    running. `foreground=True`: serve in this process until a stop signal (run_mount).
    A registry password travels to the daemon through a pipe, never argv or the state record.
    `trust`: how the index was obtained (sources/gate.py); UNBOUND mounts nosuid,nodev and
    verifies the index against the layer in the background (docs/security.md). `later`: the
    zinfo is not here yet; the daemon starts on the bound profile zinfo and fetches it.
    """
    registry = absolute_options(registry or RegistryOptions())
    if via not in VIAS:
        raise ValueError(f"'via' must be one of {', '.join(VIAS)} (got {via!r})")
    source = absolute_source(source)
    meta = Path(os.path.abspath(meta))
    zinfo = Path(os.path.abspath(zinfo)) if zinfo is not None else None
    if foreground:
        run_mount(source, mountpoint, meta=meta, zinfo=zinfo, registry=registry, via=via,
                  metrics_address=metrics_address, trust=trust, fetch=fetch, prefetch=prefetch,
                  later=later)
        return None
    path, paths = prepare_mount(mountpoint)

    def argv(ready_fd: int) -> list[str]:
        return daemon_argv(source, path, meta=meta, zinfo=zinfo, registry=registry, via=via,
                           ready_fd=ready_fd, metrics_address=metrics_address, trust=trust,
                           fetch=fetch, prefetch=prefetch, later=later)

    return spawn_daemon(argv, path, registry=registry, paths=paths, timeout_s=timeout_s)

def daemon_argv(source: str, mountpoint: Path, *, meta: Path, zinfo: Path | None,
                registry: RegistryOptions, via: str, ready_fd: int,
                metrics_address: tuple[str, int] | None = None,
                trust: str = LOCAL, fetch: FetchPolicy | None = None,
                prefetch: Path | None = None, later: ZinfoLater | None = None) -> list[str]:
    """The daemon's command line; holds no secret (the password goes through stdin)."""
    argv = [sys.executable, "-m", "hybrid_erofs", "-v", "mount", "--foreground",
            "--_daemon-ready-fd", str(ready_fd), "--meta", str(meta), "--_trust", trust,
            *FetchPolicy.argv(fetch),
            *(["--_prefetch", str(prefetch)] if prefetch is not None else []),
            *(later.argv() if later is not None else []), "--via", via]
    if zinfo is not None:
        argv += ["--zinfo", str(zinfo)]
    return [*argv, *registry_argv(registry, metrics_address=metrics_address), "--", source,
            str(mountpoint)]


__all__ = ["LayerMount", "daemon_argv", "discovered_root_owner", "mount_layer", "run_mount"]
