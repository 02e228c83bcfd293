"""The snapshotter itself, without gRPC: containerd's overlay snapshotter semantics over the
sqlite store, with lazily mounted EROFS layers (RemoteLayers) as committed snapshots.

Layout: ROOT/metadata.db, ROOT/snapshots/ID/{fs,work}; a remote layer's EROFS is mounted on
ROOT/snapshots/ID/fs. Layers mounted ahead of containerd's Prepare wait as rows named
AHEAD_PREFIX + chain ID until their Prepare adopts them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import (
    HybridErofsError,
    LayerFallback,
    SnapshotError,
    SnapshotExists,
    SnapshotInvalid,
    SnapshotPrecondition,
    SnapshotUnavailable,
)
from .filters import Filter, matches, snapshot_fields
from .metrics import SnapshotterMetrics
from .remote import LABEL_LAYER_DIGEST, LABEL_SNAPSHOT_REF, LayerRequest, RemoteLayer
from .store import Kind, Snapshot, SnapshotStore

log = logging.getLogger(__name__)

LABEL_REMOTE = "containerd.io/snapshot/remote"  # as stargz and soci mark their snapshots
LABEL_INDEX = "containerd.io/snapshot/hybrid-erofs.index"  # the artifact a layer's index is from
LABEL_RESTRICTED = "containerd.io/snapshot/hybrid-erofs.restricted"  # "nosuid,nodev"
_PENDING = ""  # the store's `remote` while a layer is being mounted
AHEAD_PREFIX = "hybrid-erofs/ahead/"  # rows of layers mounted before containerd asks for them
AHEAD_TTL_S = 600.0  # a layer mounted ahead that no Prepare adopts by then is taken down
_BINDING = "containerd.io/snapshot/hybrid-erofs/"  # the labels that name a layer's index


class _Ahead:
    """A layer being mounted, or mounted, before containerd prepares it (its own thread)."""

    __slots__ = ("done", "failure", "layer", "request")

    def __init__(self, request: LayerRequest) -> None:
        self.request = request
        self.done = threading.Event()
        self.layer: RemoteLayer | None = None
        self.failure = ""


@dataclass(frozen=True, slots=True)
class Mount:
    """containerd.types.Mount: what containerd (or the shim) passes to mount(2)."""

    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    size: int
    inodes: int


class RemoteLayers(Protocol):
    """Lazily mounted layers: the seam between the snapshotter and the mount lifecycle
    (remote.LazyLayers; tests swap in their own).

    `mount` returns once the layer's EROFS answers on `mountpoint`, or raises LayerFallback
    (containerd then applies the layer). `alive` tells whether a mount still serves reads;
    `restore` mounts a layer again whose daemon died (`labels`: the snapshot's, to find its
    index again when its files are gone); `unmount` takes a mount down (a `layer` of None:
    whatever a crash left on `mountpoint`). `ahead` tells which Prepare calls will follow
    for the layers above the requested one, with the labels containerd will give (the
    image's manifest says): those layers are mounted in parallel before they are asked for.
    """

    def mount(self, request: LayerRequest, mountpoint: Path) -> RemoteLayer: ...

    def unmount(self, layer: RemoteLayer | None, mountpoint: Path) -> None: ...

    def alive(self, layer: RemoteLayer, mountpoint: Path) -> bool: ...

    def restore(self, layer: RemoteLayer, mountpoint: Path,
                labels: Mapping[str, str]) -> RemoteLayer: ...

    def ahead(self, request: LayerRequest) -> Sequence[LayerRequest]: ...


def _disk_usage(path: Path) -> Usage:
    """Bytes allocated and inodes below `path`, hard links once (containerd's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, ""]:
            if name == "" and dirpath != str(path):
                continue
            st = os.lstat(os.path.join(dirpath, name) if name else dirpath)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
    return Usage(size=size, inodes=len(seen))


class Snapshotter:
    """containerd's Snapshotter interface (Prepare, View, Mounts, Commit, Remove, Stat,
    Update, Walk, Usage, Cleanup) on ROOT. Thread-safe (the store serializes).

    Args:
        root: the state directory (created 0700).
        remote: lazily mounted layers; None makes this a plain overlay snapshotter.
        ahead: on a lazy layer's Prepare, mount the image's layers above it at once, in
            parallel, so that their own Prepare (containerd asks one layer after the other)
            finds them mounted; each is adopted only if its Prepare's labels bind the same
            index, else mounted again as asked; one not adopted within `ahead_ttl_s` is
            taken down.

    `lazy` counts layers mounted lazily, `fallbacks` layers left to containerd by reason.
    """

    def __init__(self, root: Path, *, remote: RemoteLayers | None = None,
                 metrics: SnapshotterMetrics | None = None, ahead: bool = True,
                 ahead_ttl_s: float = AHEAD_TTL_S) -> None:
        self.root = root
        self.remote = remote
        self.metrics = metrics
        self.lazy = 0
        self.fallbacks: Counter[str] = Counter()
        self._remote_lock = threading.Lock()  # one remote Prepare or restore at a time
        self.mount_ahead = ahead and remote is not None
        self.ahead_ttl_s = ahead_ttl_s
        self._ahead: dict[str, _Ahead] = {}  # chain ID -> a layer mounted ahead
        self._ahead_lock = threading.Lock()
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            (root / "snapshots").mkdir(exist_ok=True, mode=0o700)
            self.store = SnapshotStore(root / "metadata.db")
        except (OSError, sqlite3.Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SnapshotError(f"{root}: cannot keep the snapshotter's state there: "
                                f"{reason}") from exc
        if metrics is not None:
            metrics.attach(self.store)
        self._index_off = Path("/sys/module/overlay/parameters/index").exists()

    def close(self) -> None:
        self.store.close()

    # paths -----------------------------------------------------------------------------------
    def snapshot_dir(self, snap_id: int) -> Path:
        return self.root / "snapshots" / str(snap_id)

    def fs_dir(self, snap_id: int) -> Path:
        return self.snapshot_dir(snap_id) / "fs"

    # the API ---------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        target = labels.get(LABEL_SNAPSHOT_REF, "")
        if target and self.remote is not None and self._prepare_remote(key, parent, labels):
            raise SnapshotExists(f"target snapshot {target!r}: already exists")
        return self._create(key, parent, Kind.ACTIVE, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(key, parent, Kind.VIEW, labels)

    def mounts(self, key: str) -> list[Mount]:
        snap = self.store.get(key)
        if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise SnapshotPrecondition(f"snapshot {key!r}: not active or view "
                                       f"({snap.kind.label})")
        return self._mounts(snap)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        snap = self.store.get(key)
        if snap.kind != Kind.ACTIVE:
            raise SnapshotPrecondition(f"snapshot {key!r}: not active ({snap.kind.label})")
        usage = _disk_usage(self.fs_dir(snap.id))
        self.store.commit(key, name, labels, size=usage.size, inodes=usage.inodes)

    def remove(self, key: str) -> None:
        snap = self.store.remove(key)
        self._discard(snap.id, snap.remote)

    def stat(self, key: str) -> Snapshot:
        return self.store.get(key)

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Snapshot:
        """containerd's metastore rule: only labels change; no paths = replace all labels."""
        snap = self.store.get(name)
        new = dict(snap.labels)
        if not fieldpaths:
            new = dict(labels)
        for path in fieldpaths:
            if path == "labels":
                new = dict(labels)
            elif path.startswith("labels."):
                label = path.removeprefix("labels.")
                if label in labels:
                    new[label] = labels[label]
                else:
                    new.pop(label, None)
            else:
                raise SnapshotInvalid(f"snapshot {name!r}: cannot update field {path!r}")
        return self.store.set_labels(name, new)

    def walk(self, filters: Sequence[Filter]) -> Iterator[Snapshot]:
        for snap in self.store.all():
            if snap.name.startswith(AHEAD_PREFIX):
                continue  # not containerd's until a Prepare adopts it
            fields = snapshot_fields(name=snap.name, parent=snap.parent, kind=snap.kind.label,
                                     labels=snap.labels)
            if matches(tuple(filters), fields):
                yield snap

    def usage(self, key: str) -> Usage:
        snap = self.store.get(key)
        if snap.kind == Kind.ACTIVE:
            return _disk_usage(self.fs_dir(snap.id))
        return Usage(size=snap.size, inodes=snap.inodes)

    def cleanup(self) -> None:
        """Remove directories no snapshot owns (left by a Remove that failed or a crash)."""
        # Directories first, then ids: a snapshot's row exists before its directory, so a
        # Prepare racing with this cannot lose its directory.
        entries = sorted((self.root / "snapshots").iterdir())
        known = self.store.ids()
        for entry in entries:
            if entry.name.isdigit() and int(entry.name) in known:
                continue
            self._discard_dir(entry)

    # internals -------------------------------------------------------------------------------
    def _create(self, key: str, parent: str, kind: Kind, labels: Mapping[str, str],
                *, remote: str | None = None) -> list[Mount]:
        snap = self.store.create(key, parent, kind, labels, remote=remote)
        try:
            directory = self.snapshot_dir(snap.id)
            directory.mkdir(mode=0o700)
            (directory / "fs").mkdir(mode=0o755)
            if kind == Kind.ACTIVE:
                (directory / "work").mkdir(mode=0o711)
        except OSError:
            self.store.remove(key)
            shutil.rmtree(self.snapshot_dir(snap.id), ignore_errors=True)
            raise
        return self._mounts(snap)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        """As containerd's overlay snapshotter: bind for no parents (or a view of one),
        overlay with the parents as lowerdirs (nearest first) otherwise. Lazily mounted
        parents must answer (else UNAVAILABLE, as stargz); nosuid,nodev when one is
        restricted."""
        parents = self.store.ancestors(snap)
        remote = [self._check_remote(p) for p in parents if p.remote]  # every one, no short cut
        restricted = any(layer.restricted for layer in remote)
        guard = ("nosuid", "nodev") if restricted else ()
        if not parents:
            flag = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs_dir(snap.id)), (flag, "rbind"))]
        options: list[str] = ["index=off"] if self._index_off else []
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.snapshot_dir(snap.id) / 'work'}",
                        f"upperdir={self.fs_dir(snap.id)}"]
        elif len(parents) == 1:
            return [Mount("bind", str(self.fs_dir(parents[0].id)), ("ro", "rbind", *guard))]
        options.append("lowerdir=" + ":".join(str(self.fs_dir(p.id)) for p in parents))
        return [Mount("overlay", "overlay", (*options, *guard))]

    def _check_remote(self, snap: Snapshot) -> RemoteLayer:
        """A lazily mounted layer that answers, mounted again if its daemon died."""
        assert snap.remote
        layer = RemoteLayer.from_json(snap.remote)
        if self.remote is None:
            raise SnapshotUnavailable(f"snapshot {snap.name!r}: a lazily mounted layer, but "
                                      f"this snapshotter runs without remote layers")
        fs = self.fs_dir(snap.id)
        if self.remote.alive(layer, fs):
            return layer
        with self._remote_lock:
            if self.remote.alive(layer, fs):
                return layer
            log.warning("layer %s (snapshot %s): its mount daemon is gone; mounting it again",
                        layer.blob, snap.name)
            try:
                again = self.remote.restore(layer, fs, snap.labels)
            except (HybridErofsError, OSError) as exc:
                raise SnapshotUnavailable(f"snapshot {snap.name!r}: layer {layer.blob} cannot "
                                          f"be mounted again: {exc}") from exc
            if again != layer:
                self.store.set_remote(snap.name, again.to_json())
            if self.metrics is not None:
                self.metrics.remounted.inc()
        return again

    def _prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        """Mount the layer lazily and record it as committed snapshot `target` (the chain ID):
        True. False (logged, counted) when containerd must apply the layer itself."""
        target = labels[LABEL_SNAPSHOT_REF]
        what = labels.get(LABEL_LAYER_DIGEST) or target
        try:
            request = LayerRequest.from_labels(labels)
            # An index bound in the manifest: the layers above are indexed too, go ahead now.
            bound = any(name.startswith(_BINDING) for name in labels)
            if bound:
                self._go_ahead(request)
            with self._remote_lock:
                existing = self.store.find(target)
                if existing is not None:
                    if existing.kind == Kind.COMMITTED and existing.parent == parent:
                        return True
                    raise LayerFallback(f"snapshot {target} exists with another parent "
                                        f"({existing.parent!r})", reason="conflict")
                layer = (self._adopt(target, parent, labels, request)
                         or self._mount_remote(target, parent, labels, request))
            if not bound:
                self._go_ahead(request)
        except LayerFallback as exc:
            self.fallbacks[exc.reason] += 1
            if self.metrics is not None:
                self.metrics.fallbacks.labels(reason=exc.reason).inc()
            log.info("layer %s: containerd applies it (fallback, %s): %s", what, exc.reason, exc)
            return False
        self.lazy += 1
        if self.metrics is not None:
            self.metrics.lazy.inc()
        log.info("layer %s: mounted lazily as snapshot %s (index %s%s)", what, target,
                 layer.index, ", nosuid,nodev" if layer.restricted else "")
        return True

    def _mount_remote(self, target: str, parent: str, labels: Mapping[str, str],
                      request: LayerRequest) -> RemoteLayer:
        assert self.remote is not None
        snap = self.store.create(target, parent, Kind.COMMITTED,
                                 {**labels, LABEL_REMOTE: "remote snapshot"}, remote=_PENDING)
        directory = self.snapshot_dir(snap.id)
        try:
            directory.mkdir(mode=0o700)
            (directory / "fs").mkdir(mode=0o755)
            layer = self.remote.mount(request, directory / "fs")
        except BaseException as exc:
            self.store.remove(target)
            self._discard_dir(directory)
            if isinstance(exc, (HybridErofsError, OSError)) and not isinstance(exc,
                                                                               LayerFallback):
                raise LayerFallback(f"{request.layer_digest}: {exc}",
                                    reason="mount-failed") from exc
            raise
        extra = {LABEL_INDEX: layer.index}
        if layer.restricted:
            extra[LABEL_RESTRICTED] = "nosuid,nodev"
        self.store.set_remote(target, layer.to_json())
        self.store.set_labels(target, {**snap.labels, **extra})
        return layer

    # layers mounted ahead -------------------------------------------------------------------
    def _go_ahead(self, request: LayerRequest) -> None:
        """Mount the image's layers above `request`'s in the background, each in a thread of
        its own (the ones not mounted yet nor being mounted)."""
        if self.mount_ahead:
            threading.Thread(target=self._plan_ahead, args=(request,), name="mount-ahead",
                             daemon=True).start()

    def _plan_ahead(self, request: LayerRequest) -> None:
        assert self.remote is not None
        try:
            requests = self.remote.ahead(request)
        except Exception as exc:  # a thread's error would otherwise end as a traceback
            log.info("layer %s: the layers above it are not mounted ahead: %s",
                     request.layer_digest, exc)
            return
        for upper in requests:
            with self._ahead_lock:
                if upper.chain_id in self._ahead or self.store.find(upper.chain_id):
                    continue
                entry = self._ahead[upper.chain_id] = _Ahead(upper)
            threading.Thread(target=self._mount_ahead, args=(entry,), name="mount-ahead",
                             daemon=True).start()

    def _mount_ahead(self, entry: _Ahead) -> None:
        assert self.remote is not None
        name = AHEAD_PREFIX + entry.request.chain_id
        try:
            snap = self.store.create(name, "", Kind.COMMITTED, entry.request.labels,
                                     remote=_PENDING)
            directory = self.snapshot_dir(snap.id)
            try:
                directory.mkdir(mode=0o700)
                (directory / "fs").mkdir(mode=0o755)
                entry.layer = self.remote.mount(entry.request, directory / "fs")
                self.store.set_remote(name, entry.layer.to_json())
            except BaseException:
                with contextlib.suppress(HybridErofsError):
                    self.store.remove(name)
                self._discard_dir(directory)
                raise
            timer = threading.Timer(self.ahead_ttl_s, self._expire_ahead, args=(entry,))
            timer.daemon = True
            timer.start()
        except Exception as exc:
            entry.layer, entry.failure = None, str(exc)
            log.info("layer %s: not mounted ahead: %s", entry.request.layer_digest, exc)
        finally:
            entry.done.set()

    def _adopt(self, target: str, parent: str, labels: Mapping[str, str],
               request: LayerRequest) -> RemoteLayer | None:
        """The layer mounted ahead for `target`, now committed as containerd asked; None
        when there is none, it failed, or containerd's labels bind another index."""
        with self._ahead_lock:
            entry = self._ahead.pop(target, None)
        if entry is None:
            return None
        entry.done.wait()
        layer, name = entry.layer, AHEAD_PREFIX + target
        if layer is None:
            return None

        def binding(given: Mapping[str, str]) -> dict[str, str]:
            return {k: v for k, v in given.items() if k.startswith(_BINDING)}

        if (entry.request.layer_digest != request.layer_digest
                or entry.request.image_ref != request.image_ref
                or binding(entry.request.labels) != binding(labels)):
            log.info("layer %s: its Prepare names another index than the layer mounted ahead;"
                     " mounting it as asked", request.layer_digest)
            self._drop_ahead(name)
            return None
        extra = {LABEL_REMOTE: "remote snapshot", LABEL_INDEX: layer.index}
        if layer.restricted:
            extra[LABEL_RESTRICTED] = "nosuid,nodev"
        try:
            self.store.adopt(name, target, parent, {**labels, **extra})
        except HybridErofsError as exc:
            log.info("layer %s: cannot adopt the layer mounted ahead (%s); mounting it as "
                     "asked", request.layer_digest, exc)
            self._drop_ahead(name)
            return None
        return layer

    def _expire_ahead(self, entry: _Ahead) -> None:
        with self._ahead_lock:
            if self._ahead.get(entry.request.chain_id) is not entry:
                return  # adopted (or dropped) meanwhile
            del self._ahead[entry.request.chain_id]
        log.info("layer %s: mounted ahead but never prepared; taking it down",
                 entry.request.layer_digest)
        self._drop_ahead(AHEAD_PREFIX + entry.request.chain_id)

    def _drop_ahead(self, name: str) -> None:
        try:
            snap = self.store.remove(name)
        except HybridErofsError:
            return
        self._discard(snap.id, snap.remote)

    def restore(self) -> None:
        """At start: a layer whose mount was under way when the last instance died is
        forgotten; lazily mounted layers whose daemon died are mounted again; directories
        no snapshot owns are removed. Running containers are left alone. Safe while serving:
        a Prepare holds the remote lock while its row is pending, so pending rows seen under
        the lock are a dead instance's."""
        with self._remote_lock:
            for snap in self.store.all():
                if snap.name.startswith(AHEAD_PREFIX):
                    with self._ahead_lock:
                        if snap.name.removeprefix(AHEAD_PREFIX) in self._ahead:
                            continue  # this instance's
                    log.info("snapshot %s: mounted ahead by the last instance; taking it "
                             "down", snap.name)
                    with contextlib.suppress(HybridErofsError):
                        self.store.remove(snap.name)
                    self._discard(snap.id, snap.remote)
                elif snap.remote == _PENDING:
                    log.warning("snapshot %s: its layer was being mounted when the snapshotter "
                                "stopped; forgetting it", snap.name)
                    with contextlib.suppress(HybridErofsError):
                        self.store.remove(snap.name)
                    self._discard(snap.id, snap.remote)
        for snap in self.store.all():
            if snap.remote and not snap.name.startswith(AHEAD_PREFIX):
                try:
                    self._check_remote(snap)
                except SnapshotUnavailable as exc:
                    log.warning("%s", exc)
        self.cleanup()

    def _discard(self, snap_id: int, remote: str | None) -> None:
        directory = self.snapshot_dir(snap_id)
        if remote and self.remote is not None:
            try:
                self.remote.unmount(RemoteLayer.from_json(remote), directory / "fs")
            except (HybridErofsError, OSError) as exc:
                log.warning("snapshot %d: cannot unmount its layer (%s); Cleanup retries",
                            snap_id, exc)
                return
        self._discard_dir(directory)

    def _discard_dir(self, directory: Path) -> None:
        fs = directory / "fs"
        if fs.is_mount() and self.remote is not None:
            try:
                self.remote.unmount(None, fs)
            except (HybridErofsError, OSError) as exc:
                log.warning("%s: cannot unmount (%s); Cleanup retries", fs, exc)
        if fs.is_mount():
            log.warning("%s: still mounted; left for a later Cleanup", fs)
            return
        shutil.rmtree(directory, ignore_errors=True)
