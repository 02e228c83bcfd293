"""hybrid-erofs: mount gzip container image layers lazily as EROFS.

Public API: byte sources (the one interface and its stages), the gzip index (zinfo format,
builder, reader) and the EROFS meta builder.
"""

from __future__ import annotations

from .errors import (
    ErofsFormatError,
    GzipFormatError,
    HybridErofsError,
    IndexFormatError,
    InvalidInput,
    OutputError,
    SourceIOError,
    TarFormatError,
)
from .gzindex.build import BuildResult, build_index
from .gzindex.format import Checkpoint, GzipIndex, dump_index, load_index, parse_index, write_index
from .gzindex.source import GzipSource
from .source import ByteSource, FileSource, MemorySource

__all__ = [
    "BuildResult",
    "ByteSource",
    "Checkpoint",
    "ErofsFormatError",
    "FileSource",
    "GzipFormatError",
    "GzipIndex",
    "GzipSource",
    "HybridErofsError",
    "IndexFormatError",
    "InvalidInput",
    "MemorySource",
    "OutputError",
    "SourceIOError",
    "TarFormatError",
    "build_index",
    "dump_index",
    "load_index",
    "parse_index",
    "write_index",
]
