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

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .erofs.reader import ErofsImage
from .errors import CacheError, IndexFormatError, InvalidInput
from .gzindex.build import detect_format
from .gzindex.format import parse_index
from .gzindex.sidecar import load_sidecar, sidecar_path
from .gzindex.source import GzipSource
from .indexing.imageindex import file_digest
from .oci.layout import is_layout_reference, open_layout_blob
from .source import ByteSource, FileSource
from .sources.cachedir import default_cache_dir, default_cache_limit
from .sources.chunkcache import ChunkCacheSource
from .sources.chunkstore import blob_dir
from .sources.concat import open_disk
from .sources.failmemory import DEFAULT_TTL_S, FailureMemorySource
from .sources.layerstore import LayerStore
from .sources.registry import open_registry_blob
from .sources.retry import RetrySource
from .sources.stored import StoredLayerSource
from .sources.verify import VerifiedSource

log = logging.getLogger("hybrid_erofs.device")

# Spans decoded ahead of a sequential reader, and the threads doing it (tools/bench_full_read.py:
# both cores busy on a whole-layer read).
DECODE_AHEAD = 3
DECODE_WORKERS = max(2, min(4, os.cpu_count() or 2))


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    """How to reach a layer in a registry and read it. `password` is used in memory only:
    never logged, never written to a state file (a remount reads it again from its source).

    `retries` and `retry_delay_s` shape RetrySource (tries after the first, first back-off);
    `failure_ttl_s` is how long FailureMemorySource remembers a range that failed anyway.
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
        cached = ChunkCacheSource(remembered, key=descriptor.digest, cache_dir=cache_dir,
                                  max_bytes=options.cache_max_bytes
                                  or default_cache_limit(cache_dir))
    except BaseException:
        blob.close()
        raise
    return cached, descriptor.digest


def open_image(meta: str | os.PathLike[str], *, layer: str | None = None,
               zinfo: str | os.PathLike[str] | None = None,
               registry: RegistryOptions | None = None) -> ErofsImage:
    """The meta image for reading without a mount, with LAYER (uncompressed through
    open_layer) as its device 1 when given."""
    meta_source = FileSource(meta)
    devices: list[ByteSource] = []
    try:
        if layer is not None:
            devices.append(open_layer(layer, zinfo=zinfo, registry=registry))
        return ErofsImage(meta_source, devices=devices)
    except BaseException:
        for source in (meta_source, *devices):
            source.close()
        raise


def open_layer(path: str | os.PathLike[str], *, zinfo: str | os.PathLike[str] | None = None,
               size: int | None = None, cache_bytes: int = 64 << 20,
               registry: RegistryOptions | None = None) -> ByteSource:
    """Open a layer as uncompressed layer data: a local file, or a registry reference when
    no such file exists.

    A plain tar is read directly; a gzip layer needs its zinfo (see `open_gzip_layer`).
    """
    if not is_local(str(path)):
        if zinfo is None:
            raise InvalidInput(f"{path}: a registry layer needs its zinfo (--zinfo FILE)")
        remote, digest = open_registry_layer_blob(str(path), registry or RegistryOptions())
        store_dir = (blob_dir(remote.cache_dir, digest) if isinstance(remote, ChunkCacheSource)
                     else None)
        try:
            return open_gzip_layer(remote, zinfo=zinfo, name=str(path), blob_digest=digest,
                                   size=size, cache_bytes=cache_bytes, store_dir=store_dir)
        except BaseException:
            remote.close()
            raise
    blob = FileSource(path)
    try:
        kind = detect_format(blob.pread(min(512, blob.size), 0))
        if kind == "tar":
            return blob
        if kind != "gzip":
            raise InvalidInput(f"{path}: {kind} file, not a gzip or tar layer")
        if zinfo is None:
            raise InvalidInput(f"{path}: gzip layer: give its zinfo (--zinfo FILE)")
        return open_gzip_layer(blob, zinfo=zinfo, name=str(path), size=size,
                               cache_bytes=cache_bytes)
    except BaseException:
        blob.close()
        raise


def open_gzip_layer(blob: ByteSource, *, zinfo: str | os.PathLike[str], name: str,
                    blob_digest: str | None = None, size: int | None = None,
                    cache_bytes: int = 64 << 20,
                    store_dir: Path | None = None) -> GzipSource | StoredLayerSource:
    """Layer data of a gzip `blob` through its zinfo.

    With `store_dir` (a registry blob's cache directory) and a sidecar, spans decoded in
    full are kept there (LayerStore) and served from local disk from then on.

    With the zinfo's sidecar (`layer.zinfo.json`, written by `index`), a blob of another size
    or digest than the one indexed is refused here, every span is verified against its
    sha256 before it is decoded (VerifiedSource), and the layer size needs no I/O. Without
    it (a zinfo from erofs-utils or SOCI) reads are not verified: a warning says so.
    """
    zinfo_bytes = _read_zinfo(zinfo)
    index = parse_index(zinfo_bytes, name=str(zinfo), blob_size=blob.size)
    side_path = sidecar_path(zinfo)
    inner: ByteSource = blob
    if side_path.exists():
        sidecar = load_sidecar(side_path, zinfo_bytes=zinfo_bytes)
        if sidecar.blob_size != blob.size or (blob_digest and blob_digest != sidecar.blob_digest):
            actual = f"{blob_digest} " if blob_digest else ""
            raise InvalidInput(
                f"{name}: not the layer {zinfo} was built for: that was {sidecar.blob_digest} "
                f"({sidecar.blob_size} bytes), this is {actual}({blob.size} bytes)"
            )
        inner = VerifiedSource(blob, sidecar.spans, name=name)
        size = sidecar.layer_size if size is None else size
    else:
        log.warning("%s: no %s beside the zinfo: spans are not verified", name, side_path.name)
    layer = GzipSource(inner, index, size=size, cache_bytes=cache_bytes,
                       decode_ahead=DECODE_AHEAD, decode_workers=DECODE_WORKERS)
    if store_dir is None or not side_path.exists():
        return layer
    try:
        store = LayerStore(store_dir, size=layer.size, starts=[cp.out_offset for cp in index.checkpoints])
    except CacheError as exc:
        log.warning("%s; decoded spans are not kept", exc)
        return layer
    return StoredLayerSource(layer, store)


def _read_zinfo(zinfo: str | os.PathLike[str]) -> bytes:
    try:
        return Path(zinfo).read_bytes()
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{zinfo}: no such file") from exc
    except IsADirectoryError as exc:
        raise IndexFormatError(f"{zinfo}: is a directory, not a zinfo file") from exc
    except OSError as exc:
        raise IndexFormatError(f"{zinfo}: cannot read: {exc.strerror}") from exc


def check_meta_binding(meta: str | os.PathLike[str], zinfo: str | os.PathLike[str]) -> None:
    """Refuse a meta that is not the one built with `zinfo` (when its sidecar says which)."""
    side_path = sidecar_path(zinfo)
    if not side_path.exists():
        return
    expected = load_sidecar(side_path).meta_sha256
    if expected is None:
        return
    try:
        actual, _ = file_digest(meta)
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{meta}: no such file") from exc
    except OSError as exc:
        raise IndexFormatError(f"{meta}: cannot read: {exc.strerror}") from exc
    if actual != f"sha256:{expected}":
        raise IndexFormatError(
            f"{meta}: not the meta built with {zinfo} (its sha256 is {actual[7:19]}..., "
            f"{side_path.name} records {expected[:12]}...): index the layer again or pass "
            f"the matching --meta"
        )


def open_device(layer: str, *, meta: Path, zinfo: Path | None = None,
                registry: RegistryOptions | None = None) -> ByteSource:
    """Open the device the kernel mounts: the meta image followed by the layer's data.

    `meta` is checked against the layer (device table, sizes) before anything is served, and
    against the sha256 the zinfo's sidecar records when `index` built both in one pass (a meta
    of another layer is refused); closing the result closes both files.
    """
    meta_source = FileSource(meta)
    try:
        layer_source = open_layer(layer, zinfo=zinfo, registry=registry)
    except BaseException:
        meta_source.close()
        raise
    try:
        if zinfo is not None:
            check_meta_binding(meta, zinfo)
    except BaseException:
        layer_source.close()
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
    "check_meta_binding",
    "is_local",
    "open_device",
    "open_gzip_layer",
    "open_image",
    "open_layer",
    "open_registry_layer_blob",
]
