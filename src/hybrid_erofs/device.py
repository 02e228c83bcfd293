"""The one place byte-source stacks are assembled (CLI and tests share it).

open_layer(): a local layer file -> its uncompressed layer data (FileSource, or GzipSource
over a FileSource with the layer's zinfo). open_device(): meta || layer data, checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from .erofs.reader import ErofsImage
from .errors import InvalidInput
from .gzindex.build import detect_format
from .gzindex.format import load_index
from .gzindex.source import GzipSource
from .source import ByteSource, FileSource
from .sources.concat import open_disk


def open_image(meta: str | os.PathLike[str], *, layer: str | None = None,
               zinfo: str | os.PathLike[str] | None = None) -> ErofsImage:
    """The meta image for reading without a mount, with LAYER (uncompressed through
    open_layer) as its device 1 when given."""
    meta_source = FileSource(meta)
    devices: list[ByteSource] = []
    try:
        if layer is not None:
            devices.append(open_layer(layer, zinfo=zinfo))
        return ErofsImage(meta_source, devices=devices)
    except BaseException:
        for source in (meta_source, *devices):
            source.close()
        raise


def open_layer(path: str | os.PathLike[str], *, zinfo: str | os.PathLike[str] | None = None,
               size: int | None = None, cache_bytes: int = 64 << 20) -> ByteSource:
    """Open a local layer as uncompressed layer data.

    A plain tar is read directly; a gzip layer needs its zinfo. `size` (the layer data size,
    when known from elsewhere) saves decoding the last span once to learn it.
    """
    blob = FileSource(path)
    try:
        kind = detect_format(blob.pread(min(512, blob.size), 0))
        if kind == "tar":
            return blob
        if kind != "gzip":
            raise InvalidInput(f"{path}: {kind} file, not a gzip or tar layer")
        if zinfo is None:
            raise InvalidInput(f"{path}: gzip layer: give its zinfo (--zinfo FILE)")
        index = load_index(zinfo, blob_size=blob.size)
        return GzipSource(blob, index, size=size, cache_bytes=cache_bytes)
    except BaseException:
        blob.close()
        raise


def open_device(layer: str, *, meta: Path, zinfo: Path | None = None) -> ByteSource:
    """Open the device the kernel mounts: the meta image followed by the layer's data.

    `meta` is checked against the layer (device table, sizes) before anything is served;
    closing the result closes both files.
    """
    meta_source = FileSource(meta)
    try:
        layer_source = open_layer(layer, zinfo=zinfo)
    except BaseException:
        meta_source.close()
        raise
    try:
        return open_disk(meta_source, layer_source, name=str(meta))
    except BaseException:
        layer_source.close()
        meta_source.close()
        raise


__all__ = ["open_device", "open_image", "open_layer"]
