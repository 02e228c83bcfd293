"""record_profile(): mount an image from its index directory, run a command against it, and
keep, per layer, the spans its reads touched first (`hybrid-erofs profile`).

The profiles go into the index directory and index.json lists them with their digests, so
`index --all-layers --push` publishes them in the artifact, bound like the zinfo and meta; so
does each profile's zinfo (gzindex/lazy.py: a node mounts on it and fetches the zinfo later).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..device import RegistryOptions
from ..errors import HybridErofsError, InvalidInput
from ..gzindex.format import dump_index, load_index
from ..gzindex.lazy import profile_index
from ..indexing.imageindex import (
    INDEXED,
    FileRef,
    ImageIndex,
    load_image_index,
    prefetch_file_name,
    prefetch_zinfo_file_name,
    write_image_index,
)
from ..mounting.discovery import plan_from_index
from ..mounting.image import mount_image
from ..mounting.lifecycle import STATS_INTERVAL_S, unmount
from ..mounting.state import StatePaths
from ..outfile import write_atomic
from .profile import PrefetchProfile, dump_profile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecordedLayer:
    """One layer's profile as written: its blob, spans read in order, of how many."""

    blob: str
    spans: tuple[int, ...]
    span_count: int
    path: Path | None  # None when the command read nothing of this layer


def record_profile(reference: str, index_dir: Path, command: Sequence[str], *,
                   registry: RegistryOptions | None = None, via: str = "auto",
                   timeout_s: float = 600.0,
                   progress: Callable[[str], None] | None = None) -> list[RecordedLayer]:
    """Mount `reference` as `index_dir` describes it (no background fetch), run `command`
    with ROOTFS set to the mounted tree, and write each layer's spans, first read first, as
    its prefetch profile in `index_dir` (listed in index.json). A command that fails, or
    does not end within `timeout_s`, leaves index_dir unchanged.
    """
    if not command:
        raise InvalidInput("profile: no command to run (give it after --)")
    registry = registry or RegistryOptions()
    plan = plan_from_index(index_dir, reference, registry=registry, progress=progress)
    registry = dataclasses.replace(registry, platform=registry.platform or plan.platform)
    mountpoint = Path(tempfile.mkdtemp(prefix="hybrid-erofs-profile-"))
    say = progress or (lambda line: None)
    try:
        mount_image(reference, mountpoint, plan.layers, registry=registry, via=via, fetch=None)
        try:
            say(f"running {' '.join(command)} with ROOTFS={mountpoint}")
            try:
                done = subprocess.run(list(command), env={**os.environ, "ROOTFS": str(mountpoint)},
                                      timeout=timeout_s, check=False)
            except FileNotFoundError as exc:
                raise InvalidInput(f"profile: {command[0]}: command not found") from exc
            except subprocess.TimeoutExpired as exc:
                raise HybridErofsError(f"profile: {command[0]} did not end within "
                                       f"{timeout_s:.0f}s; no profile written") from exc
            if done.returncode != 0:
                raise HybridErofsError(f"profile: {command[0]} exited with status "
                                       f"{done.returncode}; no profile written")
            time.sleep(STATS_INTERVAL_S + 0.5)  # the daemon's next stats carry every read
            stats = StatePaths.for_mountpoint(os.path.realpath(mountpoint)).load_stats()
        finally:
            unmount(mountpoint)
    finally:
        os.rmdir(mountpoint)
    per_layer = stats.get("layers") or []
    if len(per_layer) != len(plan.layers):
        raise HybridErofsError(f"profile: the mount reported {len(per_layer)} layers, "
                               f"expected {len(plan.layers)}")
    return _write(index_dir, plan.manifest, [layer.blob or "" for layer in plan.layers],
                  [list(layer.get("spans_read") or []) for layer in per_layer], command,
                  first_read_ms([layer.get("spans_read_at") for layer in per_layer]))


def first_read_ms(times: list[object]) -> list[tuple[int, ...] | None]:
    """Per layer, when each span was first read, in ms since the first read of any layer
    (the daemon's monotonic times); all None when a layer's times are missing (an older
    daemon): its profiles are written without them."""
    if not all(isinstance(one, list) and all(isinstance(t, (int, float)) for t in one)
               for one in times):
        return [None] * len(times)
    lists = [list(one) for one in times if isinstance(one, list)]
    start = min((min(one) for one in lists if one), default=0.0)
    return [tuple(max(0, round((t - start) * 1000)) for t in one) for one in lists]


def _write(index_dir: Path, manifest: str, blobs: list[str], spans_read: list[list[int]],
           command: Sequence[str],
           times: list[tuple[int, ...] | None]) -> list[RecordedLayer]:
    index = load_image_index(index_dir)
    image = next(image for image in index.images if image.manifest == manifest)
    refs: dict[str, FileRef | None] = {}
    zinfo_refs: dict[str, FileRef | None] = {}
    recorded = []
    for blob, spans, ms in zip(blobs, spans_read, times, strict=True):
        entry = next(layer for layer in image.layers if layer.digest == blob)
        assert entry.zinfo is not None and entry.status == INDEXED
        count = _span_count(index_dir / entry.zinfo.name)
        if not spans:
            refs[blob] = zinfo_refs[blob] = None
            recorded.append(RecordedLayer(blob, (), count, None))
            continue
        profile = PrefetchProfile(blob=blob, zinfo_sha256=entry.zinfo.digest.removeprefix(
            "sha256:"), spans=tuple(spans), command=tuple(command),
            first_read_ms=ms if ms is not None and len(ms) == len(spans) else None)
        data = dump_profile(profile)
        path = index_dir / prefetch_file_name(blob)
        write_atomic(path, data)
        refs[blob] = FileRef(path.name, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))
        zinfo_refs[blob] = _write_profile_zinfo(index_dir, blob, index_dir / entry.zinfo.name,
                                                spans)
        recorded.append(RecordedLayer(blob, tuple(spans), count, path))
    images = tuple(dataclasses.replace(one, layers=tuple(
        dataclasses.replace(layer, prefetch=refs[layer.digest],
                            prefetch_zinfo=zinfo_refs[layer.digest]) if layer.digest in refs
        else layer for layer in one.layers)) for one in index.images)
    write_image_index(ImageIndex(images, index.span, index.tool, index.whiteouts), index_dir)
    return recorded


def _write_profile_zinfo(index_dir: Path, blob: str, zinfo: Path,
                         spans: Sequence[int]) -> FileRef:
    """The layer's profile zinfo: its zinfo with only the windows of the profile's spans."""
    data = dump_index(profile_index(load_index(zinfo), spans))
    path = index_dir / prefetch_zinfo_file_name(blob)
    write_atomic(path, data)
    return FileRef(path.name, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))


def _span_count(zinfo: Path) -> int:
    with open(zinfo, "rb") as handle:
        return int.from_bytes(handle.read(4), "little")  # zinfo v2: <le32 count> first


__all__ = ["RecordedLayer", "first_read_ms", "record_profile"]
