"""The only place that touches an inflate library through ctypes: inflate(Z_BLOCK) for the builder.

Two engines with the same z_stream layout up to `data_type`: the zlib-ng wheel's exported
`zng_*` API (fast path, a private export of that wheel) and the system libz.so.1 (fallback).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

Z_NO_FLUSH = 0
Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_BUF_ERROR = -5
Z_BLOCK = 5
# windowBits 15 + 16: gzip wrapper only (a zlib or raw stream is not a layer blob).
GZIP_WBITS = 31


class _ZStream(ctypes.Structure):
    # zlib.h z_stream. zlib-ng's zng_stream has the same offsets up to `data_type` (88 on LP64)
    # and is 8 bytes shorter after it (uint32 adler); the tail is never touched here, and the
    # allocation is the larger of the two.
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


class InflateLib:
    """One loaded engine: `init(strm)`, `inflate(strm, flush)`, `reset(strm)`, `end(strm)`."""

    def __init__(self, name: str, init: Callable[[Any], int], inflate: Any, reset: Any,
                 end: Any) -> None:
        self.name = name
        self.init = init
        self.inflate = inflate
        self.reset = reset
        self.end = end


def _declare(lib: Any, prefix: str) -> tuple[Any, Any, Any]:
    pointer = ctypes.POINTER(_ZStream)
    inflate = getattr(lib, prefix + "inflate")
    inflate.argtypes = [pointer, ctypes.c_int]
    inflate.restype = ctypes.c_int
    reset = getattr(lib, prefix + "inflateReset")
    reset.argtypes = [pointer]
    reset.restype = ctypes.c_int
    end = getattr(lib, prefix + "inflateEnd")
    end.argtypes = [pointer]
    end.restype = ctypes.c_int
    return inflate, reset, end


def _load_zlib_ng() -> InflateLib | None:
    try:
        from zlib_ng import zlib_ng as module
    except ImportError:
        return None
    try:
        lib = ctypes.CDLL(module.__file__)
        init2 = lib.zng_inflateInit2
    except (OSError, AttributeError):
        return None
    init2.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int]
    init2.restype = ctypes.c_int
    inflate, reset, end = _declare(lib, "zng_")
    return InflateLib("zlib-ng", lambda strm: int(init2(strm, GZIP_WBITS)), inflate, reset, end)


def _load_zlib() -> InflateLib | None:
    path = ctypes.util.find_library("z") or "libz.so.1"
    try:
        lib = ctypes.CDLL(path)
        init2 = lib.inflateInit2_
        version = lib.zlibVersion
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    init2.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    init2.restype = ctypes.c_int
    ver = version()
    size = ctypes.sizeof(_ZStream)
    inflate, reset, end = _declare(lib, "")
    return InflateLib(
        "zlib", lambda strm: int(init2(strm, GZIP_WBITS, ver, size)), inflate, reset, end
    )


_CACHE: dict[str, InflateLib | None] = {}


def load_engine(engine: str = "auto") -> InflateLib:
    """Return an inflate engine: "zlib-ng", "zlib", or "auto" (zlib-ng when importable)."""
    from ..errors import HybridErofsError

    order = {"auto": ("zlib-ng", "zlib"), "zlib-ng": ("zlib-ng",), "zlib": ("zlib",)}
    if engine not in order:
        raise HybridErofsError(f"inflate engine {engine!r}: unknown (auto, zlib-ng or zlib)")
    for name in order[engine]:
        if name not in _CACHE:
            _CACHE[name] = _load_zlib_ng() if name == "zlib-ng" else _load_zlib()
        lib = _CACHE[name]
        if lib is not None:
            return lib
    raise HybridErofsError(f"inflate engine {engine!r}: not available on this system")


def new_stream() -> Any:
    """A zeroed z_stream (zalloc/zfree/opaque NULL = library defaults)."""
    return _ZStream()
