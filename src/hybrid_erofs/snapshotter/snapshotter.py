"""The snapshotter itself, without gRPC: containerd's overlay snapshotter semantics over the
sqlite store, with lazily mounted EROFS layers (RemoteLayers) as committed snapshots.

Layout: ROOT/metadata.db, ROOT/snapshots/ID/{fs,work}; a remote layer's EROFS is mounted on
ROOT/snapshots/ID/fs.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import SnapshotExists, SnapshotInvalid, SnapshotPrecondition
from .filters import Filter, matches, snapshot_fields
from .store import Kind, Snapshot, SnapshotStore

log = logging.getLogger(__name__)

# containerd's labels (snapshots/snapshotter.go, pkg/snapshotters/annotations.go)
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_REMOTE = "containerd.io/snapshot/remote"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"


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
    """Lazily mounted layers: the seam between the snapshotter and the mount lifecycle.

    `mount` returns a record (JSON text, kept in the store) once the layer's EROFS answers on
    `mountpoint`, or None when the layer must be applied by containerd (fallback; the reason
    is logged and counted by the implementation). `unmount` takes a record's mount down;
    `alive` tells whether a record's mount still serves reads.
    """

    def mount(self, labels: Mapping[str, str], mountpoint: Path) -> str | None: ...

    def unmount(self, record: str, mountpoint: Path) -> None: ...

    def alive(self, record: str, mountpoint: Path) -> bool: ...


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
    """

    def __init__(self, root: Path, *, remote: RemoteLayers | None = None) -> None:
        self.root = root
        self.remote = remote
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (root / "snapshots").mkdir(exist_ok=True, mode=0o700)
        self.store = SnapshotStore(root / "metadata.db")
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
        known = self.store.ids()
        for entry in sorted((self.root / "snapshots").iterdir()):
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
        overlay with the parents as lowerdirs (nearest first) otherwise."""
        parents = self.store.parent_ids(snap)
        if not parents:
            flag = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs_dir(snap.id)), (flag, "rbind"))]
        options: list[str] = ["index=off"] if self._index_off else []
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.snapshot_dir(snap.id) / 'work'}",
                        f"upperdir={self.fs_dir(snap.id)}"]
        elif len(parents) == 1:
            return [Mount("bind", str(self.fs_dir(parents[0])), ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(str(self.fs_dir(p)) for p in parents))
        return [Mount("overlay", "overlay", tuple(options))]

    def _prepare_remote(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        """Mount the layer lazily and record it as committed snapshot `target`; False when
        containerd must apply the layer itself."""
        raise NotImplementedError  # slice 2

    def _discard(self, snap_id: int, remote: str | None) -> None:
        directory = self.snapshot_dir(snap_id)
        if remote is not None and self.remote is not None:
            try:
                self.remote.unmount(remote, directory / "fs")
            except OSError as exc:
                log.warning("snapshot %d: cannot unmount its layer (%s); Cleanup retries",
                            snap_id, exc)
                return
        self._discard_dir(directory)

    def _discard_dir(self, directory: Path) -> None:
        fs = directory / "fs"
        if fs.is_mount():
            log.warning("%s: still mounted; left for a later Cleanup", fs)
            return
        shutil.rmtree(directory, ignore_errors=True)
