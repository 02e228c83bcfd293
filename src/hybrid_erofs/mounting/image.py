"""Whole-image mounts: one daemon mounts every layer's EROFS (mount.LayerMount) on a private
directory and stacks them read-only with overlayfs on the mountpoint.

Up: layers bottom first, then the overlay. Down: the overlay, then each layer (EROFS, loop/FUSE/
NBD, device), then the state. Layer plans come from an image index directory (indexing/imageindex.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..device import RegistryOptions
from ..errors import HybridErofsError, InvalidInput, MountBusy, MountError
from ..fetching.background import FetchPolicy
from ..indexing.imageindex import (
    ImageEntry,
)
from ..outfile import write_atomic
from ..source import ByteSource
from ..sources.gate import LOCAL, UNBOUND
from .kernel import mount_overlay, mounted_at, set_restricted, umount, users_of
from .layer import LayerMount, discovered_root_owner
from .lifecycle import (
    READY_TIMEOUT_S,
    VIAS,
    DaemonBody,
    absolute_options,
    absolute_source,
    initial_record,
    prepare_mount,
    registry_argv,
    serve_daemon,
    spawn_daemon,
)
from .state import IMAGE, LayerState, MountRecord, StatePaths
from .utab import forget_helper

log = logging.getLogger(__name__)

PLAN_FORMAT = "hybrid-erofs/image-plan"
PLAN_VERSION = 1


@dataclass(frozen=True, slots=True)
class ImageLayer:
    """One layer of an image to mount.

    Args:
        source: a local layer file (.tar.gz or .tar), a registry reference or `oci:DIR[:TAG]`.
        meta: the layer's EROFS meta, built with overlay whiteouts (`index --aufs`).
        zinfo: its gzip checkpoints (None for a plain tar).
        blob: the layer's blob digest, which selects it among the layers of a reference
            (RegistryOptions.blob); None for a local file.
        trust: how its index was obtained: LOCAL (files the user named, or indexed on this
            node), BOUND, SIGNED, or UNBOUND (mounted nosuid,nodev and verified in the
            background; the overlay too, until every such layer is verified).
        prefetch: its prefetch profile, when the index lists one (checked against index.json
            like the zinfo and meta).
    """

    source: str
    meta: Path
    zinfo: Path | None
    blob: str | None = None
    trust: str = LOCAL  # how the index was obtained (sources/gate.py)
    prefetch: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "meta": str(self.meta),
                "zinfo": str(self.zinfo) if self.zinfo is not None else None,
                "blob": self.blob, "trust": self.trust,
                "prefetch": str(self.prefetch) if self.prefetch is not None else None}


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """What an index directory says to mount for one platform: its layers, bottom first."""

    platform: str
    manifest: str
    layers: tuple[ImageLayer, ...]


# -- where layers come from -----------------------------------------------------------------------

def select_image(images: Sequence[ImageEntry], platform: str | None, *, where: str) -> ImageEntry:
    """The only image, or the one for `platform`; InvalidInput listing the platforms else."""
    available = ", ".join(image.platform for image in images) or "none"
    if platform is None:
        if len(images) == 1:
            return images[0]
        raise InvalidInput(f"{where}: {len(images)} platforms ({available}): pick one with "
                           f"--platform")
    for image in images:
        if image.platform == platform:
            return image
    raise InvalidInput(f"{where}: no image for platform {platform} (it has: {available})")


# -- the plan file that travels to the daemon -------------------------------------------------------

def write_plan(path: Path, layers: Sequence[ImageLayer]) -> None:
    """The layer list as the daemon reads it (mode 0600; no secret is part of a layer)."""
    data = {"format": PLAN_FORMAT, "version": PLAN_VERSION,
            "layers": [layer.to_json() for layer in layers]}
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)


def load_plan(path: str | os.PathLike[str]) -> list[ImageLayer]:
    try:
        raw = json.loads(Path(path).read_bytes())
        if raw.get("format") != PLAN_FORMAT or raw.get("version") != PLAN_VERSION:
            raise ValueError(f"not a {PLAN_FORMAT} version {PLAN_VERSION} file")
        return [ImageLayer(source=str(layer["source"]), meta=Path(layer["meta"]),
                           zinfo=Path(layer["zinfo"]) if layer["zinfo"] is not None else None,
                           blob=layer["blob"], trust=str(layer.get("trust", LOCAL)),
                           prefetch=Path(layer["prefetch"]) if layer.get("prefetch") else None)
                for layer in raw["layers"]]
    except OSError as exc:
        raise MountError(f"{path}: cannot read the layer plan: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MountError(f"{path}: unreadable layer plan: {exc}") from exc


# -- the daemon -------------------------------------------------------------------------------------

class _ImageDaemon:
    """Every layer's LayerMount plus the overlay on top, and their teardown in order."""

    def __init__(self, source: str, mountpoint: Path, layers: Sequence[ImageLayer], *,
                 registry: RegistryOptions, via: str, paths: StatePaths,
                 fetch: FetchPolicy | None = None) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.fetch = fetch
        self.planned = list(layers)
        self.registry = registry
        self.via = via
        self.paths = paths
        self.mounts: list[LayerMount] = []
        self.overlay_mounted = False
        self.overlay_restricted = False
        self._lock = threading.Lock()

    def start(self) -> MountRecord:
        paths = self.paths
        states = tuple(LayerState(source=layer.source, meta=str(layer.meta),
                                  zinfo=str(layer.zinfo) if layer.zinfo else None,
                                  blob=layer.blob, erofs_dir=str(paths.layer_dir(n)),
                                  trust=layer.trust,
                                  prefetch=str(layer.prefetch) if layer.prefetch else None)
                       for n, layer in enumerate(self.planned))
        record = initial_record(self.source, self.mountpoint, meta=None, zinfo=None,
                                registry=self.registry, via=self.via, paths=paths).with_changes(
            kind=IMAGE, image_dir=str(paths.image_dir), layers=states,
            fetch=tuple(FetchPolicy.recorded(self.fetch)))
        paths.save(record)  # first, so that umount can clean up after a crash from here on
        transports: list[str] = []
        for n, layer in enumerate(self.planned):
            transports.append(self._start_layer(n, layer))
        # overlayfs lists the TOP layer first; without an upperdir it needs two lower dirs.
        lowers = [f"l/{n}" for n in reversed(range(len(self.planned)))]
        if len(lowers) == 1:
            paths.empty_dir.mkdir(mode=0o755, exist_ok=True)
            lowers.append(f"l/{paths.empty_dir.name}")
        # Relative to the image dir: a page of option data then holds hundreds of layers.
        # nosuid,nodev on the overlay too while any layer's index is unverified: that is the
        # mount processes exec from.
        self.overlay_restricted = any(mount.restricted for mount in self.mounts)
        mount_overlay(lowers, self.mountpoint, cwd=paths.image_dir,
                      restricted=self.overlay_restricted)
        self.overlay_mounted = True
        os.listdir(self.mountpoint)  # the mount answers
        states = tuple(replace(state, transport=transport, **mount.record_fields())
                       for state, transport, mount in zip(states, transports, self.mounts,
                                                          strict=True))
        record = record.with_changes(transport=",".join(sorted(set(transports))),
                                     layers=states)
        paths.save(record)
        for mount in self.mounts:
            if mount.trust == UNBOUND:
                mount.verify_in_background(on_done=self._verified)
        return record

    def _verified(self, _mount: LayerMount) -> None:
        """A layer's verification ended: once no layer is restricted, lift nosuid,nodev
        from the overlay."""
        with self._lock:
            if (self.overlay_restricted and self.overlay_mounted
                    and not any(mount.restricted for mount in self.mounts)):
                set_restricted(self.mountpoint, False)
                self.overlay_restricted = False
                log.info("%s: every layer's index verified: nosuid,nodev lifted",
                         self.mountpoint)

    def trust_states(self) -> list[dict[str, object]]:
        return [mount.trust_state() for mount in self.mounts]

    def _start_layer(self, n: int, layer: ImageLayer) -> str:
        target = self.paths.layer_dir(n)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        registry = (replace(self.registry, blob=layer.blob, layer=None)
                    if layer.blob is not None else self.registry)
        mount = LayerMount(layer.source, target, meta=layer.meta, zinfo=layer.zinfo,
                           registry=registry, fuse_dir=self.paths.layer_fuse_dir(n),
                           nbd_socket=self.paths.layer_nbd_socket(n),
                           backend=f"{self.paths.record}#{n}", trust=layer.trust,
                           root_owner=discovered_root_owner(layer.trust), fetch=self.fetch,
                           prefetch=layer.prefetch)
        self.mounts.append(mount)  # before start(): teardown releases what start() got to
        try:
            return mount.start(self.via)
        except (HybridErofsError, OSError) as exc:
            what = layer.blob or layer.source
            reason = str(exc) if isinstance(exc, HybridErofsError) else exc.strerror or str(exc)
            raise MountError(f"{self.mountpoint}: layer {n + 1} of {len(self.planned)} "
                             f"({what}): {reason}") from exc

    def layers(self) -> list[tuple[str, ByteSource]]:
        return [(mount.label, mount.device) for mount in self.mounts if mount.device is not None]

    def gone(self) -> str | None:
        """The overlay or a layer's FUSE export is gone (someone ran a plain umount)."""
        entry = mounted_at(self.mountpoint)
        if entry is None or entry.fstype != "overlay":
            self.overlay_mounted = False
            return f"{self.mountpoint} is no longer mounted"
        if not all(mount.export_running for mount in self.mounts):
            return "a layer's FUSE export ended"
        return None

    def layer_details(self) -> list[dict[str, Any]]:
        return [mount.details() for mount in self.mounts]

    def teardown(self, *, signals: list[int] | None = None) -> None:
        """The overlay, then every layer's EROFS, then their loop / FUSE / NBD and devices,
        then the state files. A busy overlay is detached lazily (a stop was requested); the
        layers' exports then serve it until its last user is gone, as for a layer mount."""
        if self.overlay_mounted:
            forget_helper(self.mountpoint)
            try:
                umount(self.mountpoint)
            except MountBusy:
                holders = users_of(str(self.mountpoint))
                log.warning("%s is busy (%s): detaching lazily", self.mountpoint,
                            ", ".join(f"{pid} ({name})" for pid, name in sorted(holders.items()))
                            or "no process found")
                umount(self.mountpoint, lazy=True)
            self.overlay_mounted = False
        for mount in reversed(self.mounts):
            mount.unmount()
        for mount in reversed(self.mounts):
            mount.release(signals=signals)
        self.paths.remove()


def run_image_mount(source: str, mountpoint: str | os.PathLike[str],
                    layers: Sequence[ImageLayer], *, registry: RegistryOptions | None = None,
                    via: str = "auto", ready_fd: int | None = None,
                    ready: Callable[[MountRecord], None] | None = None,
                    metrics_address: tuple[str, int] | None = None,
                    fetch: FetchPolicy | None = None) -> None:
    """Mount the image in this process and serve until SIGTERM/SIGINT/SIGHUP or an outside
    umount, then unmount everything (the daemon's body, and `mount-image --foreground`)."""
    def make(path: Path, paths: StatePaths) -> DaemonBody:
        return _ImageDaemon(source, path, layers, registry=registry or RegistryOptions(),
                            via=via, paths=paths, fetch=fetch)

    serve_daemon(mountpoint, make, via=via, ready_fd=ready_fd, ready=ready,
                 metrics_address=metrics_address, command="mount-image")


# -- the parent -------------------------------------------------------------------------------------

def image_daemon_argv(source: str, mountpoint: Path, *, plan: Path, registry: RegistryOptions,
                      via: str, ready_fd: int,
                      metrics_address: tuple[str, int] | None = None,
                      fetch: FetchPolicy | None = None) -> list[str]:
    """The image daemon's command line: the layers are in `plan`, the password on stdin."""
    return [sys.executable, "-m", "hybrid_erofs", "-v", "mount-image", "--foreground",
            "--_daemon-ready-fd", str(ready_fd), "--_plan", str(plan), *FetchPolicy.argv(fetch),
            "--via", via, *registry_argv(registry, metrics_address=metrics_address), "--",
            source, str(mountpoint)]


def _absolute(layer: ImageLayer) -> ImageLayer:
    return ImageLayer(absolute_source(layer.source), Path(os.path.abspath(layer.meta)),
                      Path(os.path.abspath(layer.zinfo)) if layer.zinfo is not None else None,
                      layer.blob, layer.trust,
                      Path(os.path.abspath(layer.prefetch)) if layer.prefetch else None)


def mount_image(source: str, mountpoint: str | os.PathLike[str], layers: Sequence[ImageLayer],
                *, registry: RegistryOptions | None = None, via: str = "auto",
                foreground: bool = False, timeout_s: float = READY_TIMEOUT_S,
                metrics_address: tuple[str, int] | None = None,
                fetch: FetchPolicy | None = None) -> MountRecord | None:
    """Mount every layer of an image lazily and stack them read-only on `mountpoint`.

    `layers` are bottom first, as in the manifest. One daemon serves them all: each layer's
    device is exported (a FUSE file, or kernel NBD) and mounted as EROFS on a private
    directory, and overlayfs (lower layers only, no upperdir) merges them on `mountpoint`,
    applying the whiteouts and opaque directories of the metas (`index --aufs`).

    Background (default): start the daemon and return its record once the mount answers.
    Any failure (say, layer 3 of 4 cannot be opened) raises with nothing left mounted or
    running. `foreground=True`: serve in this process until a stop signal. The layer plan
    travels to the daemon as a file in the state directory, a registry password through a
    pipe; neither argv nor the state record carries a secret.
    """
    registry = absolute_options(registry or RegistryOptions())
    if via not in VIAS:
        raise ValueError(f"'via' must be one of {', '.join(VIAS)} (got {via!r})")
    if not layers:
        raise InvalidInput(f"{source}: an image needs at least one layer")
    source = absolute_source(source)
    planned = [_absolute(layer) for layer in layers]
    if foreground:
        run_image_mount(source, mountpoint, planned, registry=registry, via=via,
                        metrics_address=metrics_address, fetch=fetch)
        return None
    path, paths = prepare_mount(mountpoint, command="mount-image")
    try:
        paths.image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_plan(paths.plan, planned)
    except BaseException:
        paths.remove()
        raise

    def argv(ready_fd: int) -> list[str]:
        return image_daemon_argv(source, path, plan=paths.plan, registry=registry, via=via,
                                 ready_fd=ready_fd, metrics_address=metrics_address,
                                 fetch=fetch)

    return spawn_daemon(argv, path, registry=registry, paths=paths, timeout_s=timeout_s)


__all__ = [
    "ImageLayer",
    "ImagePlan",
    "image_daemon_argv",
    "load_plan",
    "mount_image",
    "run_image_mount",
    "select_image",
    "write_plan",
]
