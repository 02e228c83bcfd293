"""`index REF --all-layers -o DIR`: index every gzip layer of an image (one platform or all).

Each layer is streamed once from the registry (or read from an `oci:` layout) by `index_layer`,
its uncompressed sha256 checked against the config's diff_id, and written to DIR under names
derived from its blob digest (imageindex.py). Layers run in parallel worker processes (the tar
parsing holds the GIL); each worker holds one layer's metadata, so memory is bounded by `jobs`.
A layer whose outputs already exist and match their recorded digests is not indexed again, so
an interrupted run resumes. DIR/index.json is written last, atomically.

Outputs are deterministic: the meta UUID is derived from the blob digest, the build time is
$SOURCE_DATE_EPOCH or 0, the root directory (when a tar has no "./") belongs to 0:0, and
index.json holds no time or host.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

from ..device import RegistryOptions
from ..errors import HybridErofsError, IndexFormatError, OutputError, RegistryError
from ..fetching.profile import parse_profile
from ..gzindex.build import DEFAULT_SPAN
from ..gzindex.format import dump_index, parse_index
from ..gzindex.lazy import profile_index
from ..gzindex.sidecar import load_sidecar
from ..oci.client import (
    GZIP_LAYER_TYPES,
    MANIFEST_TYPES,
    Manifest,
    RegistryClient,
    parse_descriptor,
)
from ..oci.image import ImageInfo, inspect_manifest, open_image_client
from ..oci.layout import LayoutClient, is_layout_reference
from ..oci.platform import descriptor_platform
from ..units import counted, format_size
from .imageindex import (
    INDEXED,
    SKIPPED_FORMAT,
    SKIPPED_SMALL,
    FileRef,
    ImageEntry,
    ImageIndex,
    LayerEntry,
    file_digest,
    layer_file_names,
    prefetch_file_name,
    prefetch_zinfo_file_name,
    write_image_index,
)
from .layer import _version, index_layer

DEFAULT_MIN_LAYER_SIZE = 10 << 20  # as SOCI: smaller layers are cheaper to fetch whole
OVERLAY_WHITEOUTS = True  # meta images convert .wh.* for overlayfs (mkfs.erofs --aufs)


@dataclass(frozen=True, slots=True)
class LayerJob:
    """One blob to index, and how a worker reaches it."""

    digest: str
    size: int
    diff_id: str
    reference: str  # what index_layer opens: REPO@MANIFEST for a registry, oci:DIR:TAG else
    platform: str | None  # for oci: layouts (a tag may name an index)


@dataclass(frozen=True, slots=True)
class ImageIndexReport:
    """What index_image did."""

    index: ImageIndex
    directory: Path
    indexed: tuple[str, ...]  # blob digests indexed in this run
    reused: tuple[str, ...]  # outputs found complete from an earlier run
    skipped: tuple[tuple[str, str], ...]  # (digest, status) not indexed
    layer_bytes: int  # uncompressed bytes indexed in this run
    elapsed_s: float


def meta_uuid(blob_digest: str) -> bytes:
    """The meta image's UUID: a function of the layer blob (reproducible, and names it)."""
    return hashlib.sha256(f"hybrid-erofs meta {blob_digest}".encode()).digest()[:16]


def default_build_time() -> int:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return 0
    try:
        return int(epoch)
    except ValueError:
        raise HybridErofsError(f"SOURCE_DATE_EPOCH: not an integer ({epoch!r})") from None


def platform_manifests(client: RegistryClient | LayoutClient, *, platform: str | None,
                       all_platforms: bool, subject: str) -> list[Manifest]:
    """The image manifests to index: the one for `platform`, or every platform of an index
    (attestation manifests, platform unknown/unknown, are not images and are left out)."""
    if not all_platforms:
        return [client.resolve(platform)]
    top = client.top() if isinstance(client, LayoutClient) else client.get_manifest()
    if not top.is_index:
        return [top]
    entries = top.data.get("manifests")
    chosen: list[Manifest] = []
    for raw in entries if isinstance(entries, list) else []:
        if not isinstance(raw, dict) or raw.get("mediaType", "") not in MANIFEST_TYPES:
            continue
        if str(descriptor_platform(raw)).startswith("unknown/"):
            continue
        descriptor = parse_descriptor(raw, subject)
        if isinstance(client, LayoutClient):
            chosen.append(client.get_manifest(descriptor.digest,
                                              media_type=descriptor.media_type or None))
        else:
            chosen.append(client.get_manifest(descriptor.digest,
                                              expected_digest=descriptor.digest))
    if not chosen:
        raise RegistryError(f"{subject}: the index lists no image manifests")
    return chosen


def _platform_of(info: ImageInfo) -> str:
    c = info.config
    return "/".join(p for p in (c.os, c.architecture, c.variant) if p)


def _layer_reference(reference: str, manifest_digest: str) -> str:
    if is_layout_reference(reference):
        return reference
    from ..oci.reference import parse_reference

    ref = parse_reference(reference)
    return f"{ref.registry}/{ref.repository}@{manifest_digest}"


def existing_outputs(directory: Path, digest: str, *, span: int) -> dict[str, FileRef] | None:
    """The file refs of a layer's complete outputs from an earlier run, else None.

    Complete: the sidecar (written last) names this blob and span, and the zinfo and meta
    hash to the digests it records.
    """
    names = layer_file_names(digest)
    paths = {kind: directory / name for kind, name in names.items()}
    if not all(path.is_file() for path in paths.values()):
        return None
    try:
        zinfo_bytes = paths["zinfo"].read_bytes()
        sidecar = load_sidecar(paths["sidecar"], zinfo_bytes=zinfo_bytes)
        if (sidecar.blob_digest != digest or sidecar.span != span or not sidecar.meta_digest
                or sidecar.whiteouts != ("overlay" if OVERLAY_WHITEOUTS else "tar")):
            return None
        meta_digest, meta_size = file_digest(paths["meta"])
        if meta_digest != sidecar.meta_digest:
            return None
        side_digest, side_size = file_digest(paths["sidecar"])
    except (IndexFormatError, OSError):
        return None
    refs = {
        "zinfo": FileRef(names["zinfo"], sidecar.zinfo_digest, len(zinfo_bytes)),
        "sidecar": FileRef(names["sidecar"], side_digest, side_size),
        "meta": FileRef(names["meta"], meta_digest, meta_size),
    }
    prefetch = prefetch_ref(directory / prefetch_file_name(digest),
                            zinfo_sha256=sidecar.zinfo_digest.removeprefix("sha256:"))
    if prefetch is not None:  # recorded by `hybrid-erofs profile`: published with the rest
        refs["prefetch"] = prefetch
        profile_zinfo = prefetch_zinfo_ref(directory / prefetch_zinfo_file_name(digest),
                                           zinfo_bytes=zinfo_bytes,
                                           profile=directory / prefetch.name)
        if profile_zinfo is not None:
            refs["prefetch_zinfo"] = profile_zinfo
    return refs


def prefetch_ref(path: Path, *, zinfo_sha256: str) -> FileRef | None:
    """The ref of a prefetch profile for the zinfo with this sha256, if `path` is one."""
    try:
        data = path.read_bytes()
        if parse_profile(data, name=str(path)).zinfo_sha256 != zinfo_sha256:
            return None
    except (OSError, IndexFormatError):
        return None
    return FileRef(path.name, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))


def prefetch_zinfo_ref(path: Path, *, zinfo_bytes: bytes, profile: Path) -> FileRef | None:
    """The ref of the profile zinfo at `path` when it is the one of that zinfo and profile
    (gzindex/lazy.py), else None."""
    try:
        data = path.read_bytes()
        spans = parse_profile(profile.read_bytes(), name=str(profile)).spans
        if data != dump_index(profile_index(parse_index(zinfo_bytes, name="zinfo"), spans)):
            return None
    except (OSError, IndexFormatError):
        return None
    return FileRef(path.name, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))


def _index_job(job: LayerJob, directory: Path, span: int, registry: RegistryOptions,
               build_time: int) -> int:
    """Index one layer (in a worker process); return its uncompressed size."""
    names = layer_file_names(job.digest)
    options = replace(registry, layer=None, blob=job.digest, platform=job.platform)
    report = index_layer(
        job.reference, zinfo=directory / names["zinfo"], meta=directory / names["meta"],
        span=span, aufs=OVERLAY_WHITEOUTS, uuid=meta_uuid(job.digest), build_time=build_time,
        registry=options, diff_id=job.diff_id, root_owner=(0, 0),
    )
    return report.layer_size


def _run_job(job: LayerJob, directory: Path, span: int, registry: RegistryOptions,
             build_time: int) -> tuple[int, str | None]:
    """Worker entry point: (layer size, None) or (0, one-line error); errors cross the
    process boundary as text (exception classes with extra state do not all pickle)."""
    try:
        return _index_job(job, directory, span, registry, build_time), None
    except HybridErofsError as exc:
        return 0, str(exc)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent alone decides (and stops workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the workers now (a layer can take minutes); no API for it but the pool's
    process table."""
    for process in list(getattr(pool, "_processes", {}).values()):
        with contextlib.suppress(OSError, AttributeError):
            process.terminate()


def _mp_context() -> multiprocessing.context.BaseContext:
    # Never fork: the parent has threads (httpx pools); forkserver starts clean and fast.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _run_jobs(jobs: Sequence[LayerJob], directory: Path, *, span: int,
              registry: RegistryOptions, workers: int, build_time: int,
              progress: Callable[[str], None]) -> dict[str, int]:
    """Index `jobs` (largest first) with `workers` processes; the first error stops the rest."""
    ordered = sorted(jobs, key=lambda j: (-j.size, j.digest))
    done: dict[str, int] = {}
    total = len(ordered)

    def finished(job: LayerJob, size: int, started: float) -> None:
        done[job.digest] = size
        elapsed = time.perf_counter() - started
        progress(f"[{len(done)}/{total}] {job.digest[:19]}... {format_size(job.size)} -> "
                 f"{format_size(size)} of layer data, done after {elapsed:.1f}s")

    if workers <= 1 or total <= 1:
        for job in ordered:
            started = time.perf_counter()
            finished(job, _index_job(job, directory, span, registry, build_time), started)
        return done
    started_all = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(workers, total), mp_context=_mp_context(),
                             initializer=_worker_init) as pool:
        futures: dict[Future[tuple[int, str | None]], LayerJob] = {
            pool.submit(_run_job, job, directory, span, registry, build_time): job
            for job in ordered}
        pending = set(futures)
        try:
            while pending:
                finished_now, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished_now:
                    size, error = future.result()
                    if error is not None:
                        raise HybridErofsError(error)
                    finished(futures[future], size, started_all)
        except BaseException:
            for future in pending:
                future.cancel()
            _stop_workers(pool)
            raise
    return done


def index_image(
    reference: str,
    directory: str | os.PathLike[str],
    *,
    all_platforms: bool = False,
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE,
    jobs: int | None = None,
    span: int = DEFAULT_SPAN,
    registry: RegistryOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImageIndexReport:
    """Index every gzip layer of image `reference` into `directory` and write its index.json.

    Malformed images (config, rootfs, diff_ids) are refused before any layer is read; a layer
    whose data does not hash to its diff_id fails the run (outputs of the layers done so far
    stay, complete, for the next run to reuse).
    """
    registry = registry or RegistryOptions()
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the directory: {exc.strerror}") from exc
    if not os.access(out, os.W_OK):
        raise OutputError(f"{out}: not writable")
    build_time = default_build_time()
    workers = jobs if jobs is not None else min(os.cpu_count() or 1, 4)
    if workers < 1:
        raise HybridErofsError(f"--jobs must be at least 1 (got {workers})")

    client = open_image_client(reference, username=registry.username,
                               password=registry.password, insecure=registry.insecure,
                               transport=registry.transport)
    with client:
        manifests = platform_manifests(client, platform=registry.platform,
                                       all_platforms=all_platforms, subject=reference)
        infos = [inspect_manifest(client, manifest, reference) for manifest in manifests]
    say(f"{reference}: {counted(len(infos), 'platform')}: "
        + ", ".join(f"{_platform_of(i)} ({counted(len(i.layers), 'layer')})" for i in infos))

    jobs_by_digest: dict[str, LayerJob] = {}
    status: dict[str, str] = {}
    for info in infos:
        for descriptor, diff_id in zip(info.layers, info.config.diff_ids, strict=True):
            if descriptor.digest in status:
                continue
            if descriptor.media_type not in GZIP_LAYER_TYPES:
                status[descriptor.digest] = SKIPPED_FORMAT
            elif descriptor.size < min_layer_size:
                status[descriptor.digest] = SKIPPED_SMALL
            else:
                status[descriptor.digest] = INDEXED
                jobs_by_digest[descriptor.digest] = LayerJob(
                    descriptor.digest, descriptor.size, diff_id,
                    _layer_reference(reference, info.manifest_digest),
                    _platform_of(info) if is_layout_reference(reference) else None)

    files: dict[str, dict[str, FileRef]] = {}
    todo: list[LayerJob] = []
    for digest, job in jobs_by_digest.items():
        found = existing_outputs(out, digest, span=span)
        if found is None:
            todo.append(job)
        else:
            files[digest] = found
    reused = tuple(sorted(files))
    if reused:
        say(f"{counted(len(reused), 'layer')} already indexed in {out}: kept")
    done = _run_jobs(todo, out, span=span, registry=registry, workers=workers,
                     build_time=build_time, progress=say)
    for job in todo:
        found = existing_outputs(out, job.digest, span=span)
        if found is None:  # pragma: no cover - index_layer wrote them a moment ago
            raise OutputError(f"{out}: the outputs of {job.digest} are incomplete")
        files[job.digest] = found

    layer_sizes = {digest: load_sidecar(out / refs["sidecar"].name).layer_size
                   for digest, refs in files.items()}
    images = []
    for manifest, info in zip(manifests, infos, strict=True):
        layers = []
        for descriptor, diff_id in zip(info.layers, info.config.diff_ids, strict=True):
            refs = files.get(descriptor.digest, {})
            layers.append(LayerEntry(
                digest=descriptor.digest, media_type=descriptor.media_type,
                size=descriptor.size, diff_id=diff_id, status=status[descriptor.digest],
                layer_size=layer_sizes.get(descriptor.digest, 0), **refs))
        images.append(ImageEntry(
            manifest=info.manifest_digest, manifest_media_type=info.manifest_media_type,
            manifest_size=len(manifest.body), platform=_platform_of(info),
            config=info.config_descriptor.digest, layers=tuple(layers)))
    index = ImageIndex(tuple(images), span=span, tool=f"hybrid-erofs {_version()}")
    write_image_index(index, out)
    skipped = tuple(sorted((d, s) for d, s in status.items() if s != INDEXED))
    return ImageIndexReport(index, out, tuple(sorted(done)), reused, skipped,
                            sum(done.values()), time.perf_counter() - started)


__all__ = [
    "DEFAULT_MIN_LAYER_SIZE",
    "ImageIndexReport",
    "LayerJob",
    "default_build_time",
    "existing_outputs",
    "index_image",
    "meta_uuid",
    "platform_manifests",
]
