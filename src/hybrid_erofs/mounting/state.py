"""State records of `hybrid-erofs mount` and `mount-image`: one JSON per mount (no secrets), the
daemon's stats file beside it, its log, and its FUSE and layer directories, all under the runtime
directory.

Layout: RUNTIME/mounts/ID.json, ID.stats.json, ID.sock (live stats), ID.log; RUNTIME/fuse/ID/disk.img (a layer mount);
RUNTIME/images/ID/{plan.json, f/N/disk.img, l/N, l/empty} (an image mount: layer N's FUSE file and
EROFS mount, N = 0 at the bottom).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import MountError
from ..outfile import write_atomic

RECORD_VERSION = 1
DISK_NAME = "disk.img"  # the FUSE file a layer's device is exported as
RUNTIME_ENV = "HYBRID_EROFS_RUNTIME_DIR"  # tests and unusual hosts point it elsewhere


def runtime_dir() -> Path:
    """$HYBRID_EROFS_RUNTIME_DIR, else /run/hybrid-erofs (also inside a login session, so
    systemd units and shells agree). Mounts are root's; anyone may read their records."""
    override = os.environ.get(RUNTIME_ENV)
    if override:
        return Path(os.path.abspath(override))
    return Path("/run/hybrid-erofs")


def mount_id(mountpoint: str | os.PathLike[str]) -> str:
    """A file name for a mountpoint: readable, and unique through a hash of the full path."""
    path = os.fspath(mountpoint)
    readable = re.sub(r"[^A-Za-z0-9_.]+", "-", path)[-40:].strip("-") or "root"
    return f"{readable}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:8]}"


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """The non-secret registry options of a mount; a password is never recorded, only where it
    came from (`password_from`: "stdin" means a reattach must be given it again)."""

    platform: str | None = None
    layer: int | None = None
    blob: str | None = None
    username: str | None = None
    insecure: bool = False
    cache_dir: str | None = None
    password_from: str | None = None
    cache_max_bytes: int | None = None
    retries: int = 4
    retry_delay_s: float = 0.2
    failure_ttl_s: float = 5.0
    memory_cache_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class LayerState:
    """One layer of an image mount: what it serves, where its FUSE file and EROFS mount are."""

    source: str
    meta: str
    zinfo: str | None
    blob: str | None = None
    erofs_dir: str = ""  # the layer's private EROFS mount, IMAGE_DIR/l/N
    transport: str | None = None
    fuse_dir: str | None = None
    disk_path: str | None = None
    loop_device: str | None = None
    nbd_device: str | None = None
    nbd_socket: str | None = None
    trust: str = "local"  # how its index was obtained (sources/gate.py, docs/security.md)
    prefetch: str | None = None  # its prefetch profile (fetching/profile.py), if one is used


LAYER = "layer"  # MountRecord.kind: one layer's EROFS on the mountpoint (`mount`)
IMAGE = "image"  # overlayfs of every layer's EROFS on the mountpoint (`mount-image`)


@dataclass(frozen=True, slots=True)
class MountRecord:
    """What `umount`, `status` and `mount --reattach` need to know about one mount."""

    mountpoint: str
    source: str
    meta: str | None  # None for an image mount (each of its layers has one)
    zinfo: str | None
    via: str  # what was asked: auto, fuse, loop or nbd
    transport: str  # what runs: "fuse" (file-backed mount(2)), "loop" (FUSE file + loop), "nbd"
    daemon_pid: int
    daemon_start_time: int | None
    log_file: str
    created: float
    fuse_dir: str | None = None
    disk_path: str | None = None
    loop_device: str | None = None
    nbd_device: str | None = None
    nbd_socket: str | None = None
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    version: int = RECORD_VERSION
    kind: str = LAYER
    image_dir: str | None = None
    layers: tuple[LayerState, ...] = ()  # an image's layers, bottom first
    metrics_address: str | None = None  # HOST:PORT of /metrics (the port bound, when 0 asked)
    trust: str = "local"  # a layer mount's: how its index was obtained (sources/gate.py)
    fetch: tuple[str, ...] = ()  # the background fetch options (FetchPolicy.recorded)
    prefetch: str | None = None  # a layer mount's prefetch profile, if one is used
    # A layer mount started on its profile zinfo (ZinfoLater.to_json()): a restart before
    # the zinfo came starts on it again and fetches the zinfo by its bound digest.
    later: dict[str, Any] | None = None

    @property
    def is_image(self) -> bool:
        return self.kind == IMAGE

    @property
    def fstype(self) -> str:
        """What the kernel shows on the mountpoint while this mount is up."""
        return "overlay" if self.is_image else "erofs"

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, name: str) -> MountRecord:
        try:
            raw: dict[str, Any] = json.loads(data)
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in raw.items() if k in known}
            values["registry"] = RegistrySettings(**values.get("registry", {}))
            values["layers"] = tuple(LayerState(**layer) for layer in values.get("layers", ()))
            values["fetch"] = tuple(str(option) for option in values.get("fetch", ()))
            if not isinstance(values.get("later") or {}, dict):
                raise TypeError(f"'later' must be an object (got {values['later']!r})")
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise MountError(f"{name}: unreadable state record: {exc}") from exc

    def with_changes(self, **changes: Any) -> MountRecord:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class StatePaths:
    """Where the files of one mount live."""

    root: Path
    id: str

    @classmethod
    def for_mountpoint(cls, mountpoint: str | os.PathLike[str], *,
                       root: Path | None = None) -> StatePaths:
        return cls(root if root is not None else runtime_dir(), mount_id(mountpoint))

    @property
    def record(self) -> Path:
        return self.root / "mounts" / f"{self.id}.json"

    @property
    def stats(self) -> Path:
        return self.root / "mounts" / f"{self.id}.stats.json"

    @property
    def stats_socket(self) -> Path:
        """Where the daemon answers `status` with its counters as they are now."""
        return self.root / "mounts" / f"{self.id}.sock"

    @property
    def log(self) -> Path:
        return self.root / "mounts" / f"{self.id}.log"

    @property
    def fuse_dir(self) -> Path:
        return self.root / "fuse" / self.id

    @property
    def nbd_socket(self) -> Path:
        return self.root / "nbd" / f"{self.id}.sock"

    @property
    def image_dir(self) -> Path:
        """An image mount's directory: its plan, and each layer's FUSE and EROFS directories."""
        return self.root / "images" / self.id

    @property
    def plan(self) -> Path:
        return self.image_dir / "plan.json"

    def layer_dir(self, n: int) -> Path:
        """Layer `n`'s EROFS mount; short, since overlayfs gets `l/N` paths in one page."""
        return self.image_dir / "l" / str(n)

    @property
    def empty_dir(self) -> Path:
        """The empty bottom layer that lets a one-layer image satisfy overlayfs."""
        return self.image_dir / "l" / "empty"

    def layer_fuse_dir(self, n: int) -> Path:
        return self.image_dir / "f" / str(n)

    def layer_nbd_socket(self, n: int) -> Path:
        return self.root / "nbd" / f"{self.id}.{n}.sock"

    def prepare(self) -> None:
        # Records and stats hold no secret: `status` works for every user (the FUSE, NBD and
        # image directories below stay private).
        for directory in (self.root, self.record.parent):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                directory.chmod(0o755)  # made private by an earlier version

    def save(self, record: MountRecord) -> None:
        self.prepare()
        write_atomic(self.record, record.to_json(), mode=0o644)

    def load(self) -> MountRecord | None:
        try:
            data = self.record.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MountError(f"{self.record}: cannot read: {exc.strerror}") from exc
        return MountRecord.from_json(data, name=str(self.record))

    def save_stats(self, stats: dict[str, Any]) -> None:
        write_atomic(self.stats, (json.dumps(stats, sort_keys=True) + "\n").encode(), mode=0o644)

    def load_stats(self) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = json.loads(self.stats.read_bytes())
            return loaded
        except (OSError, ValueError):
            return {}

    def remove(self, *, keep_log: bool = False) -> None:
        """Delete the record, stats, FUSE directory, sockets and an image's directory (and the
        log unless kept). Only empty directories are removed: never anything under a mount."""
        for path in (self.record, self.stats, self.stats_socket, self.nbd_socket, self.plan,
                     *self.nbd_socket.parent.glob(f"{self.id}.*.sock"),
                     *(() if keep_log else (self.log,))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        directories = [self.fuse_dir]
        for sub in ("l", "f"):
            with contextlib.suppress(OSError):
                directories += list((self.image_dir / sub).iterdir())
            directories.append(self.image_dir / sub)
        for directory in (*directories, self.image_dir):
            with contextlib.suppress(OSError):
                directory.rmdir()


def list_records(root: Path | None = None) -> list[tuple[StatePaths, MountRecord]]:
    """Every state record under the runtime directory, by mountpoint; unreadable ones skipped."""
    base = root if root is not None else runtime_dir()
    try:
        names = sorted(os.listdir(base / "mounts"))
    except FileNotFoundError:
        return []
    except PermissionError as exc:
        raise MountError(f"{base / 'mounts'}: readable by root only (mounts are root's): run "
                         f"`sudo hybrid-erofs status`") from exc
    except OSError as exc:
        raise MountError(f"{base / 'mounts'}: cannot list: {exc.strerror}") from exc
    found: list[tuple[StatePaths, MountRecord]] = []
    for name in names:
        if not name.endswith(".json") or name.endswith(".stats.json"):
            continue
        paths = StatePaths(base, name.removesuffix(".json"))
        with contextlib.suppress(MountError):
            record = paths.load()
            if record is not None:
                found.append((paths, record))
    return sorted(found, key=lambda item: item[1].mountpoint)


__all__ = [
    "IMAGE",
    "LAYER",
    "LayerState",
    "MountRecord",
    "RegistrySettings",
    "StatePaths",
    "list_records",
    "mount_id",
    "runtime_dir",
]
