"""The one place byte-source stacks are assembled (CLI and tests share it).

open_layer(): a local layer file or a registry reference -> its uncompressed layer data:
  local .tar:    FileSource
  local .tar.gz: FileSource -> VerifiedSource -> GzipSource
  registry:      RegistryBlobSource -> RetrySource -> FailureMemorySource -> ChunkCacheSource
                 -> VerifiedSource -> GzipSource -> StoredLayerSource (decoded spans kept
                 beside the chunks)
  oci:DIR[:TAG]: FileSource (the layout's blob file) -> VerifiedSource -> GzipSource
open_device(): meta || layer data, checked against each other.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .erofs.reader import ErofsImage
from .errors import CacheError, ErofsFormatError, IndexFormatError, InvalidInput
from .filekind import EROFS_IMAGE, GZIP, TAR, ZINFO, check_kind, detect_format
from .gzindex.format import parse_index, validate_index
from .gzindex.lazy import LazyWindows, check_profile_index
from .gzindex.sidecar import load_sidecar, sha256_digest, sidecar_path
from .gzindex.source import GzipSource
from .oci.layout import is_layout_reference, open_layout_blob
from .source import ByteSource, FileSource
from .sources.cachedir import default_cache_dir, default_cache_limit
from .sources.chunkcache import ChunkCacheSource
from .sources.concat import open_disk
from .sources.failmemory import DEFAULT_TTL_S, FailureMemorySource
from .sources.layerstore import LayerStore, store_key
from .sources.registry import open_registry_blob
from .sources.retry import RetrySource
from .sources.stored import StoredLayerSource
from .sources.verify import VerifiedSource
from .trust.binding import BlobIdentity, check_binding

log = logging.getLogger("hybrid_erofs.device")

DEFAULT_MEMORY_CACHE = 64 << 20


def memory_shares(memory_cache_bytes: int) -> tuple[int, int, int, int]:
    """How one layer's memory bound is split: (decoded spans, verified compressed spans,
    chunks that could not be stored, chunks fetched ahead of a reader and not read yet)."""
    return (memory_cache_bytes, memory_cache_bytes // 4, memory_cache_bytes // 4,
            memory_cache_bytes // 2)


# Spans decoded ahead of a sequential reader, and the threads doing it (tools/bench_full_read.py:
# both cores busy on a whole-layer read).
DECODE_AHEAD = 3
DECODE_WORKERS = max(2, min(4, os.cpu_count() or 2))
# Spans past those whose compressed bytes a sequential reader has fetched (registry: into the
# chunk cache by its pool, HTTP and the disk write off the decoder's path) or read from disk
# (a local blob) ahead of the decoder.
FETCH_AHEAD = 8


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    """How to reach a layer in a registry and read it. `password` is used in memory only:
    never logged, never written to a state file (a remount reads it again from its source).

    `retries` and `retry_delay_s` shape RetrySource (tries after the first, first back-off);
    `failure_ttl_s` is how long FailureMemorySource remembers a range that failed anyway.
    `memory_cache_bytes` bounds the memory of one layer's caches: decoded spans (GzipSource)
    up to it, verified compressed spans and chunks that cannot be stored up to a quarter of
    it each, chunks fetched ahead of a reader and not read yet up to half of it
    (`memory_shares`).
    """

    platform: str | None = None
    layer: int | None = None
    blob: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    insecure: bool = False
    cache_dir: Path | None = None
    cache_max_bytes: int | None = None
    retries: int = 4
    retry_delay_s: float = 0.2
    failure_ttl_s: float = DEFAULT_TTL_S
    memory_cache_bytes: int = DEFAULT_MEMORY_CACHE
    transport: httpx.BaseTransport | None = field(default=None, repr=False, compare=False)


_LAYER_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".gz")


def is_local(source: str) -> bool:
    """A layer argument names a local file when such a file exists, it is "-", or it looks
    like a path (absolute, ./ or ../, or a layer file suffix); otherwise it is a reference
    (a registry's, or an OCI layout's `oci:DIR[:TAG]`)."""
    if is_layout_reference(source) and not os.path.exists(source):
        return False
    return (source == "-" or os.path.exists(source) or source.startswith(("/", "./", "../", "~"))
            or source.endswith(_LAYER_SUFFIXES))


def open_registry_layer_blob(reference: str, options: RegistryOptions) -> tuple[ByteSource, str]:
    """The compressed blob of a registry layer, as the stack below GzipSource:
    RegistryBlobSource -> RetrySource -> FailureMemorySource -> ChunkCacheSource. Returns it
    and the blob digest.
    An `oci:DIR[:TAG]` layer is its blob file as it is: local, so nothing to retry or cache."""
    if is_layout_reference(reference):
        local, found = open_layout_blob(reference, layer=options.layer, blob=options.blob,
                                        platform=options.platform)
        return local, found.digest
    blob, descriptor = open_registry_blob(
        reference, layer=options.layer, blob=options.blob, platform=options.platform,
        username=options.username, password=options.password, insecure=options.insecure,
        transport=options.transport,
    )
    try:
        retried = RetrySource(blob, attempts=options.retries + 1,
                              delay_s=options.retry_delay_s)
        remembered = FailureMemorySource(retried, name=descriptor.digest,
                                         ttl_s=options.failure_ttl_s)
        cache_dir = options.cache_dir or default_cache_dir()
        *_, unstored, handoff = memory_shares(options.memory_cache_bytes)
        cached = ChunkCacheSource(remembered, key=descriptor.digest, cache_dir=cache_dir,
                                  max_bytes=options.cache_max_bytes
                                  or default_cache_limit(cache_dir),
                                  memory_bytes=unstored, handoff_bytes=handoff)
    except BaseException:
        blob.close()
        raise
    return cached, descriptor.digest


def open_layer_blob(layer: str, registry: RegistryOptions | None = None
                    ) -> tuple[ByteSource, str | None]:
    """The compressed blob of `layer` as a ByteSource, and its digest when a manifest names
    it: a local file as it is, a registry layer through the retry and chunk-cache stages
    (what reads it fills the cache that mounts of the same blob use)."""
    if is_local(layer):
        return FileSource(layer), None
    return open_registry_layer_blob(layer, registry or RegistryOptions())


def open_image(meta: str | os.PathLike[str], *, layer: str | None = None,
               zinfo: str | os.PathLike[str] | None = None,
               registry: RegistryOptions | None = None) -> ErofsImage:
    """The meta image for reading without a mount, with LAYER (uncompressed through
    open_layer) as its device 1 when given. The meta, zinfo, sidecar and layer must belong
    together (trust/binding.py); with a zinfo but no layer, the meta is checked against the
    zinfo's sidecar. A file of the wrong kind is named ("x: is a zinfo file, not an EROFS
    image")."""
    check_kind(meta, EROFS_IMAGE)
    meta_path = Path(meta)
    if layer is None and zinfo is not None:
        check_kind(zinfo, ZINFO)
        zinfo_bytes = _read_zinfo(zinfo)
        side_path = sidecar_path(zinfo)
        if side_path.exists():
            sidecar = load_sidecar(side_path, zinfo_bytes=zinfo_bytes)
            check_binding(blob=None, meta=meta_path, zinfo=Path(zinfo), sidecar=sidecar)
    meta_source = FileSource(meta)
    devices: list[ByteSource] = []
    try:
        if layer is not None:
            devices.append(open_layer(layer, zinfo=zinfo, registry=registry, meta=meta_path))
        try:
            return ErofsImage(meta_source, devices=devices)
        except ErofsFormatError as exc:
            raise ErofsFormatError(f"{meta}: {exc}") from exc
    except BaseException:
        for source in (meta_source, *devices):
            source.close()
        raise


def open_layer(path: str | os.PathLike[str], *, zinfo: str | os.PathLike[str] | None = None,
               size: int | None = None, cache_bytes: int | None = None,
               registry: RegistryOptions | None = None,
               meta: str | os.PathLike[str] | None = None,
               keep_decoded: bool = True, store_reads: bool = True,
               windows: LazyWindows | None = None) -> ByteSource:
    """Open a layer as uncompressed layer data: a local file, or a registry reference when
    no such file exists.

    A plain tar is read directly; a gzip layer needs its zinfo (see `open_gzip_layer`). With
    `meta`, the meta must belong to this layer too (trust/binding.py). `cache_bytes` (the
    layer's memory bound) defaults to `registry.memory_cache_bytes`. `keep_decoded=False`
    keeps the layer out of its blob's layer store; `store_reads=False` serves what is stored
    there but stores nothing new (StoredLayerSource.store_reads). `windows`: a registry
    layer mounted on a profile zinfo before its zinfo is here (open_gzip_layer).
    """
    meta_path = Path(meta) if meta is not None else None
    if cache_bytes is None:
        cache_bytes = (registry or RegistryOptions()).memory_cache_bytes
    if not is_local(str(path)):
        if zinfo is None:
            raise InvalidInput(f"{path}: a registry layer needs its zinfo (--zinfo FILE)")
        remote, digest = open_registry_layer_blob(str(path), registry or RegistryOptions())
        # Decoded spans are shared by every later mount of the blob: only an index that is
        # trusted may fill the store (a forged window would decode wrong bytes into it).
        store_dir = (remote.directory
                     if keep_decoded and isinstance(remote, ChunkCacheSource) else None)
        try:
            return open_gzip_layer(remote, zinfo=zinfo, name=str(path), blob_digest=digest,
                                   size=size, cache_bytes=cache_bytes, store_dir=store_dir,
                                   meta=meta_path, store_reads=store_reads, windows=windows)
        except BaseException:
            remote.close()
            raise
    blob = FileSource(path)
    try:
        check_kind(path, "a gzip or tar layer", accept=(GZIP, TAR))  # m.erofs starts like a tar
        kind = detect_format(blob.pread(min(512, blob.size), 0))
        if kind == "tar":
            identity = BlobIdentity(str(path), blob.size, local_path=Path(path))
            check_binding(blob=identity, meta=meta_path)
            return blob
        if kind != "gzip":
            raise InvalidInput(f"{path}: {kind} file, not a gzip or tar layer")
        if zinfo is None:
            raise InvalidInput(f"{path}: gzip layer: give its zinfo (--zinfo FILE)")
        return open_gzip_layer(blob, zinfo=zinfo, name=str(path), size=size,
                               cache_bytes=cache_bytes, meta=meta_path, local_path=Path(path))
    except BaseException:
        blob.close()
        raise


def open_gzip_layer(blob: ByteSource, *, zinfo: str | os.PathLike[str], name: str,
                    blob_digest: str | None = None, size: int | None = None,
                    cache_bytes: int = DEFAULT_MEMORY_CACHE, store_dir: Path | None = None,
                    meta: Path | None = None, local_path: Path | None = None,
                    store_reads: bool = True,
                    windows: LazyWindows | None = None) -> GzipSource | StoredLayerSource:
    """Layer data of a gzip `blob` through its zinfo.

    With `store_dir` (a registry blob's cache directory) and a sidecar, spans decoded in
    full are kept there (LayerStore) and served from local disk from then on.

    With the zinfo's sidecar (`layer.zinfo.json`, written by `index`), a blob of another size
    or digest than the one indexed is refused here, every span is verified against its
    sha256 before it is decoded (VerifiedSource), and the layer size needs no I/O. Without
    it (a zinfo from erofs-utils or SOCI) reads are not verified: a warning says so. `meta`
    (when given) must belong to the same layer; `local_path` lets the binding check hash a
    local blob that has no sidecar.

    With `windows` (gzindex/lazy.py), the zinfo file need not be here yet: the layer is read
    through the profile zinfo's checkpoint table (`windows.index`, which must fit the
    sidecar), and its windows come from `windows`.
    """
    zinfo_bytes = b""
    if windows is None:
        zinfo_bytes = _read_zinfo(zinfo)
        check_kind(zinfo, ZINFO)  # "m.erofs: is an EROFS image, not a zinfo file"
    side_path = sidecar_path(zinfo)
    identity = BlobIdentity(name, blob.size, digest=blob_digest, local_path=local_path)
    inner: ByteSource = blob
    if windows is not None:
        sidecar = load_sidecar(side_path)
        check_binding(blob=identity, meta=meta, zinfo=Path(zinfo), sidecar=sidecar)
        index = windows.index
        validate_index(index, name=windows.name, blob_size=blob.size,
                       layer_size=sidecar.layer_size)
        if len(index) != len(sidecar.spans):
            raise IndexFormatError(f"{windows.name}: {len(index)} checkpoints, the sidecar "
                                   f"{side_path} has {len(sidecar.spans)} spans")
        inner = VerifiedSource(blob, sidecar.spans, name=name,
                               cache_bytes=memory_shares(cache_bytes)[1])
        size = sidecar.layer_size if size is None else size
    elif side_path.exists():
        sidecar = load_sidecar(side_path, zinfo_bytes=zinfo_bytes)
        check_binding(blob=identity, meta=meta, zinfo=Path(zinfo), sidecar=sidecar)
        index = parse_index(zinfo_bytes, name=str(zinfo), blob_size=blob.size,
                            layer_size=sidecar.layer_size)
        inner = VerifiedSource(blob, sidecar.spans, name=name,
                               cache_bytes=memory_shares(cache_bytes)[1])
        size = sidecar.layer_size if size is None else size
    else:
        # A zinfo of another tool (erofs-utils, SOCI): runs of checkpoints at one offset
        # (empty gzip members) are folded; ours are refused for them (a forgery).
        index = parse_index(zinfo_bytes, name=str(zinfo), blob_size=blob.size, strict=False)
        check_binding(blob=identity, meta=meta, zinfo=Path(zinfo))
        log.warning("%s: no %s beside the zinfo: spans are not verified", name, side_path.name)
    layer = GzipSource(inner, index, size=size, cache_bytes=cache_bytes,
                       decode_ahead=DECODE_AHEAD, decode_workers=DECODE_WORKERS,
                       fetch_ahead=FETCH_AHEAD, windows=windows)
    if store_dir is None or not side_path.exists():
        return layer
    limit = blob.room if isinstance(blob, ChunkCacheSource) else None
    if isinstance(blob, ChunkCacheSource) and limit is not None and (
            blob.size + layer.size > limit):
        # The cache cannot hold the layer in full (its chunks and its decoded data): it stays
        # lazy, spans are decoded from the chunks each time (docs/fetch.md, the cache limit).
        log.info("%s: the cache limit (%d bytes, of which eviction keeps %d) cannot hold the "
                 "layer: decoded spans are not kept", name, blob.max_bytes, limit)
        return layer
    try:
        # Keyed by the index that decodes it: spans decoded through another index of this
        # blob (a forged window in an index bound to some other image) are never served here.
        key = store_key(sidecar.zinfo_digest, *([windows.digest] if windows is not None else []))
        store = LayerStore(store_dir, size=layer.size,
                           starts=[cp.out_offset for cp in index.checkpoints],
                           budget=blob.reserve if isinstance(blob, ChunkCacheSource) else None,
                           index=key)
    except CacheError as exc:
        log.warning("%s; decoded spans are not kept", exc)
        return layer
    if windows is not None:
        windows.when_complete(functools.partial(_adopt_zinfo_store, store, layer,
                                                Path(zinfo), sidecar.zinfo_digest, windows))
        # Refused: its spans may be wrong bytes, and this mount fails every read from now on.
        windows.when_refused(store.discard)
    return StoredLayerSource(layer, store, store_reads=store_reads)


def _adopt_zinfo_store(store: LayerStore, layer: GzipSource, zinfo: Path, zinfo_digest: str,
                       windows: LazyWindows) -> None:
    """A store started on a profile zinfo, once the full zinfo came and agrees with it
    (LazyWindows.when_complete, never when it was refused): every span decoded through the
    profile zinfo is what the zinfo decodes, so the store becomes the zinfo's own
    (store_key of its digest alone), where later mounts through the zinfo find it: no
    second decode, and a complete verified layer mounts `via local`. Checked once more on
    the file those mounts read: the digest the sidecar names, and agreement with the
    profile zinfo's table and windows (gzindex/lazy.py check_profile_index). Spans whose end
    was not checked (the next window was not in the profile zinfo) count for the zinfo's
    store only once the complete layer is verified (LayerStore.rekey `unchecked`)."""
    data = zinfo.read_bytes()
    if sha256_digest(data) != zinfo_digest:
        log.warning("%s: not the zinfo the sidecar names: the decoded spans stay apart", zinfo)
        return
    check_profile_index(windows.index, parse_index(data, name=str(zinfo)), windows.real,
                        name=str(zinfo))
    # Every window is known by now: no span is added to unchecked_ends() after this.
    store.rekey(store_key(zinfo_digest), unchecked=layer.unchecked_ends())


def _read_zinfo(zinfo: str | os.PathLike[str]) -> bytes:
    try:
        return Path(zinfo).read_bytes()
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{zinfo}: no such file") from exc
    except IsADirectoryError as exc:
        raise IndexFormatError(f"{zinfo}: is a directory, not a zinfo file") from exc
    except OSError as exc:
        raise IndexFormatError(f"{zinfo}: cannot read: {exc.strerror}") from exc


def open_device(layer: str, *, meta: Path, zinfo: Path | None = None,
                registry: RegistryOptions | None = None,
                keep_decoded: bool = True, store_reads: bool = True,
                windows: LazyWindows | None = None) -> ByteSource:
    """Open the device the kernel mounts: the meta image followed by the layer's data.

    `meta` is checked against the layer (device table, sizes, the blob it records) and the
    zinfo's sidecar (trust/binding.py) before anything is served; closing the result
    closes both files. `keep_decoded=False` (an unbound index) keeps decoded spans out of
    the blob's shared layer store; `store_reads=False` stores no decoded spans (a mount
    without background fetch), still serving those stored.
    """
    check_kind(meta, EROFS_IMAGE)
    meta_source = FileSource(meta)
    try:
        layer_source = open_layer(layer, zinfo=zinfo, registry=registry, meta=meta,
                                  keep_decoded=keep_decoded, store_reads=store_reads,
                                  windows=windows)
    except BaseException:
        meta_source.close()
        raise
    try:
        return open_disk(meta_source, layer_source, name=str(meta))
    except BaseException:
        layer_source.close()
        meta_source.close()
        raise


__all__ = [
    "RegistryOptions",
    "is_local",
    "open_device",
    "open_gzip_layer",
    "open_image",
    "open_layer",
    "open_layer_blob",
    "open_registry_layer_blob",
    "memory_shares",
]
