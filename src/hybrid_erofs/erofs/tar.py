"""Push-based streaming tar parser: feed() uncompressed chunks, get one TarMember per entry.

It sits beside the gzip checkpoint builder on the same decompressed stream; file data is
skipped by arithmetic and never buffered.  The archive is read exactly as Go's archive/tar
reads it (the reader containerd unpacks layers with): ustar, v7, star, GNU (L/K, base-256,
old sparse), PAX (x/g, GNU sparse 0.0/0.1/1.0); see docs/tar.md.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import NamedTuple
from zlib import adler32

from hybrid_erofs.errors import TarFormatError
from hybrid_erofs.printable import printable

BLOCK = 512

# Normalised member kinds: the ustar typeflag byte ('\0' becomes REGULAR or DIRECTORY, as in
# Go). GLOBAL is a 'g' header, which containerd "applies" as an entry without content.
REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = b"0123456"
GLOBAL = ord("g")
_HEADER_ONLY = frozenset(b"123456")  # Go's isHeaderOnlyType: no data, whatever `size` says
_META_TYPES = frozenset(b"xgLK")

# POSIX ustar header fields (pax spec, "ustar Interchange Format"): offsets 0..499.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
MAX_SPECIAL = 1 << 20         # Go's maxSpecialFileSize: x / g / L / K payloads
MAX_SPARSE_ENTRIES = 1 << 20  # sparse map entries held per member (8 MB as tuples)
_MAX_SIZE = (1 << 63) - 1
_DIGITS = re.compile(rb"[+-]?[0-9]+")
_OCTAL = re.compile(rb"[0-7]+")
_ZERO_BLOCK = bytes(BLOCK)
_PLAIN_NUMBERS = re.compile(rb"[0-7 \0]*")
_FAST_TYPES = frozenset(b"\x000123456")

# Old GNU sparse header (GNU tar's tar.h, "struct oldgnu_header"): 4 map entries at 386,
# isextended at 482, realsize at 483; extension blocks hold 21 entries and isextended at 504.
_GNU_SPARSE_AT, _GNU_SPARSE_COUNT, _GNU_EXTENDED_AT = 386, 4, 482
_EXT_SPARSE_COUNT, _EXT_EXTENDED_AT = 21, 504


class TarMember(NamedTuple):
    """One archive entry, after PAX / GNU long-name overrides.

    `data_offset` is the offset of the member's data in the uncompressed tar (a multiple of
    512); `size` is the file's logical size.  `sparse` is None for a plain member; for a
    sparse one it lists the (logical offset, length) data segments, stored one after
    another from `data_offset`, holes between them read as zeros.  `mode` holds the
    permission bits only; `mtime_nsec` is 0..999999999 (mtime may be negative).
    A NamedTuple rather than a frozen dataclass: one is built per entry, 7x faster.
    """

    name: bytes
    kind: int
    header_offset: int
    data_offset: int
    size: int
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[bytes, bytes], ...]
    sparse: tuple[tuple[int, int], ...] | None = None


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated header string (Go's parseString)."""
    return field.partition(b"\0")[0]


def _byte_sum(block: bytes) -> int:
    """Sum of the bytes of a 512-byte block.

    adler32's low half is 1 + the byte sum modulo 65521, which is exact for 256 bytes (at
    most 65280): two C calls instead of summing 512 ints in Python.
    """
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _plain_numbers(block: bytes, fields: tuple[bytes, ...]
                   ) -> tuple[int, int, int, int, int, int, int] | None:
    """(mode, uid, gid, size, mtime, devmajor, devminor) when every field is plain octal
    (what Go's parseOctal reads to the same value), else None: `_numeric` decides then."""
    if not (_PLAIN_NUMBERS.fullmatch(block, 100, 148) and _PLAIN_NUMBERS.fullmatch(
            block, 329, 345)):
        return None
    try:
        return (int(fields[1].rstrip(b"\0 ") or b"0", 8), int(fields[2].rstrip(b"\0 ") or b"0", 8),
                int(fields[3].rstrip(b"\0 ") or b"0", 8), int(fields[4].rstrip(b"\0 ") or b"0", 8),
                int(fields[5].rstrip(b"\0 ") or b"0", 8), int(fields[13].rstrip(b"\0 ") or b"0", 8),
                int(fields[14].rstrip(b"\0 ") or b"0", 8))
    except ValueError:
        return None


def _numeric(field: bytes) -> int | None:
    """A header number as Go's parseNumeric reads it; None where Go sets ErrHeader.

    Base-256 when the lead byte has 0x80 set (two's complement, 0x40 = negative), else
    octal after trimming NULs and spaces at both ends, cut at the first NUL.
    """
    lead = field[0] if field else 0
    if lead & 0x80:
        inv = 0xFF if lead & 0x40 else 0
        value = 0
        for index, byte in enumerate(field):
            byte ^= inv
            if index == 0:
                byte &= 0x7F
            if value >> 56:
                return None
            value = value << 8 | byte
        if value >> 63:
            return None
        return ~value if inv else value
    text = _cstr(field.strip(b" \0"))
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        return None
    value = int(text, 8)
    return value if value >> 64 == 0 else None


def show(name: bytes) -> str:
    """A name for an error message: control characters and bytes that are not UTF-8
    escaped (hybrid_erofs.printable)."""
    return printable(name) or "<unnamed>"


class _Want(NamedTuple):
    """Bytes to collect before `handler` runs, and what the stream is in if it ends early."""

    length: int
    handler: Callable[[bytes, int], None]
    what: str           # "" = the stream may end cleanly here (a header boundary)


class TarParser:
    """Incremental tar reader calling `on_member(member)` for each entry, in archive order.

    Feed the uncompressed stream with `feed(chunk)` (any chunk sizes; a memoryview is only
    read during the call) and call `close()` at EOF.  After the end-of-archive marker the
    rest of the stream is accepted and ignored; like Go, a stream may also end right after
    the last member's data (no padding, no end blocks).  Errors raise `TarFormatError`
    naming the entry and its header offset.  Not thread-safe.
    """

    def __init__(self, on_member: Callable[[TarMember], None]) -> None:
        self._on_member = on_member
        self._offset = 0          # bytes consumed so far (uncompressed tar offset)
        self._skip = 0            # data + padding still to skip
        self._skip_data = 0       # of which data (the stream may not end inside it)
        self._buffer = bytearray()
        self._want: _Want | None = None   # None: the next 512-byte header
        self._zero_block = False  # the previous block was all zeros
        self._done = False
        self._closed = False
        self._pax: dict[bytes, bytes] = {}  # records of the last 'x' header (Go: last wins)
        self._long_name = b""
        self._long_link = b""
        self._end_offset = 0
        self._last_name = b""
        self._last_header = 0
        self._entry: tuple[bytes, int] = (b"", 0)  # name and header offset of the entry
        # Member data the consumer asked to see: (tar offset, length, sink), in tar order.
        self._captures: list[tuple[int, int, Callable[[int, bytes], None]]] = []
        self.members = 0

    @property
    def offset(self) -> int:
        """Bytes of layer data consumed so far."""
        return self._offset

    @property
    def end_offset(self) -> int:
        """Offset just past the end-of-archive marker (or where the stream ended)."""
        return self._end_offset

    @property
    def finished(self) -> bool:
        """True once the end-of-archive marker has been seen."""
        return self._done

    @property
    def needed_offset(self) -> int:
        """The parser will not look at the bytes before this offset (member data, padding, or
        everything after the end-of-archive marker): `skip()` may stand in for feeding them."""
        if self._done:
            return 1 << 64
        if self._captures:
            return min(self._offset + self._skip, max(self._offset, self._captures[0][0]))
        return self._offset + self._skip

    def capture(self, offset: int, length: int, sink: Callable[[int, bytes], None]) -> None:
        """Hand the layer data [offset, offset + length) of the member just emitted to
        `sink(offset, piece)` (in pieces) as it streams by; call from `on_member`, in order."""
        if length <= 0:
            return
        if offset < self._offset or offset + length > self._offset + self._skip_data or (
                self._captures and offset < sum(self._captures[-1][:2])):
            raise ValueError(f"capture of {length} bytes at {offset} is outside the member data")
        self._captures.append((offset, length, sink))

    def skip(self, length: int) -> None:
        """Consume the next `length` bytes unseen; they must end by `needed_offset`."""
        if self._closed:
            raise ValueError("skip() after close()")
        if not self._done:
            if not 0 <= length <= self.needed_offset - self._offset:
                raise ValueError(f"'length' must be 0..{self.needed_offset - self._offset} "
                                 f"(got {length})")
            self._skip -= length
            self._skip_data = max(0, self._skip_data - length)
        self._offset += length

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Consume the next `len(chunk)` bytes of the uncompressed tar."""
        if self._closed:
            raise ValueError("feed() after close()")
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else chunk
        length = len(view)
        if self._done:
            self._offset += length
            return
        pos = 0
        while pos < length:
            if self._skip:
                take = min(self._skip, length - pos)
                if self._captures:
                    start, size, sink = self._captures[0]
                    if start > self._offset:
                        take = min(take, start - self._offset)
                    elif start + size > self._offset:
                        take = min(take, start + size - self._offset)
                        sink(self._offset, bytes(view[pos:pos + take]))
                        if self._offset + take == start + size:
                            del self._captures[0]
                self._skip -= take
                self._skip_data = max(0, self._skip_data - take)
                pos += take
                self._offset += take
                continue
            want = self._want
            need = BLOCK if want is None else want.length
            if self._buffer or length - pos < need:
                take = min(need - len(self._buffer), length - pos)
                self._buffer += view[pos:pos + take]
                pos += take
                self._offset += take
                if len(self._buffer) < need:
                    continue
                data = bytes(self._buffer)
                self._buffer.clear()
            else:
                data = bytes(view[pos:pos + need])
                pos += need
                self._offset += need
            if want is None:
                self._header(data, self._offset - BLOCK)
            else:
                self._want = None
                want.handler(data, self._offset - need)
            if self._done:
                self._offset += length - pos
                return

    def close(self) -> None:
        """Signal EOF; raise if the stream stopped where Go's reader fails (inside a header,
        an extended header or a member's data)."""
        if self._closed:
            return
        self._closed = True
        if self._done:
            return
        want = self._want
        if self._skip_data or self._buffer or (want is not None and want.what):
            name, header = self._entry if want is not None or self._skip_data else (
                self._last_name, self._last_header)
            where = want.what if want is not None and want.what else (
                "its data" if self._skip_data else "a header")
            raise TarFormatError(
                f"{show(name)}: truncated tar: stream ends at offset {self._offset} "
                f"inside {where} of the entry whose header is at offset {header}"
            )
        # Go's reader: EOF at a header boundary, after one zero block, inside the padding
        # of the last member, or after extended headers with no entry is a clean end.
        self._end_offset = self._offset

    # -- per-header work -------------------------------------------------------------

    def _fail(self, message: str, offset: int, name: bytes = b"") -> TarFormatError:
        return TarFormatError(f"{show(name or self._last_name)}: {message} "
                              f"(tar header at offset {offset})")

    def _header(self, block: bytes, offset: int) -> None:
        if block == _ZERO_BLOCK:
            if self._zero_block:
                self._done = True
                self._end_offset = offset + BLOCK
            self._zero_block = True
            return
        if self._zero_block:
            # Go: a zero block followed by anything but a second one is ErrHeader.
            raise TarFormatError(
                f"tar: a single zero block at offset {offset - BLOCK} is followed by a "
                f"header at offset {offset} (Go's archive/tar, and so containerd, refuse it)"
            )
        fields = _HEADER.unpack_from(block)
        raw_name = _cstr(fields[0])
        self._last_name, self._last_header = raw_name, offset
        numbers = _plain_numbers(block, fields)
        self._check_sum(block, fields[6], raw_name, offset)
        typeflag = fields[7][0]
        magic = fields[9]
        if magic == b"ustar\0":
            fmt = "star" if block[508:512] == b"tar\0" else "ustar"
        elif magic == b"ustar " and fields[10] == b" \0":
            fmt = "gnu"
        else:
            fmt = "v7"
        if numbers is not None and typeflag in _FAST_TYPES and not self._pax \
                and not self._long_name and not self._long_link \
                and (fmt == "ustar" or fmt == "gnu" and not block[345] and not block[357]):
            # The common case: octal fields, no overrides; Go's rules without the detours.
            mode, uid, gid, size, mtime, devmajor, devminor = numbers
            if fmt == "ustar" and fields[15][0]:
                raw_name = _cstr(fields[15]) + b"/" + raw_name
            if typeflag == 0:
                typeflag = DIRECTORY if raw_name.endswith(b"/") else REGULAR
            if typeflag in _HEADER_ONLY:
                size = 0
            if typeflag != CHARDEV and typeflag != BLOCKDEV:
                devmajor = devminor = 0
            self._entry = (raw_name, offset)
            self._skip = self._skip_data = size
            self._skip += -size % BLOCK
            self.members += 1
            self._on_member(TarMember(raw_name, typeflag, offset, offset + BLOCK, size,
                                      mode & 0o7777, uid, gid, mtime, 0, _cstr(fields[8]),
                                      devmajor, devminor, (), None))
            return
        header_size = numbers[3] if numbers is not None else _numeric(fields[4])
        if header_size is None or header_size < 0 and typeflag not in _HEADER_ONLY:
            raise self._fail(f"bad size field {fields[4]!r}", offset, raw_name)
        size = header_size
        name = self._full_name(block, fields, fmt, offset, checked=numbers is not None)
        if typeflag in _META_TYPES:
            self._entry = (name, offset)
            if size > MAX_SPECIAL:
                raise self._fail(f"extended header of {size} bytes is larger than "
                                 f"{MAX_SPECIAL} (Go's limit)", offset, raw_name)
            handler = self._special(typeflag, name, size)
            self._want = _Want(size, handler, "an extended header")
            if size == 0:
                self._want = None
                handler(b"", offset + BLOCK)
            return
        self._general(block, fields, typeflag, name, fmt, size, offset, numbers)

    def _full_name(self, block: bytes, fields: tuple[bytes, ...], fmt: str,
                   offset: int, *, checked: bool) -> bytes:
        """The header's name with its ustar / star prefix; checks the numeric fields as
        Go's readHeader does (any that does not parse is ErrHeader) unless `checked`."""
        name = _cstr(fields[0])
        if not checked:
            for index, what in ((1, "mode"), (2, "uid"), (3, "gid"), (5, "mtime")):
                if _numeric(fields[index]) is None:
                    raise self._fail(f"bad {what} field {fields[index]!r}", offset, name)
        if fmt == "v7":
            return name
        if not checked and (_numeric(fields[13]) is None or _numeric(fields[14]) is None):
            raise self._fail("bad device number field", offset, name)
        prefix = b""
        if fmt == "ustar":
            prefix = _cstr(fields[15])
        elif fmt == "star":
            if _numeric(block[476:488]) is None or _numeric(block[488:500]) is None:
                raise self._fail("bad star atime / ctime field", offset, name)
            prefix = _cstr(block[345:476])
        else:
            # GNU: Go reads atime/ctime here; when they do not parse it assumes a pre-Go1.8
            # writer that put a ustar prefix there instead.
            bad = any(block[at] and _numeric(block[at:at + 12]) is None for at in (345, 357))
            if bad and _cstr(fields[15]).isascii():
                prefix = _cstr(fields[15])
        return prefix + b"/" + name if prefix else name

    def _check_sum(self, block: bytes, field: bytes, name: bytes, offset: int) -> None:
        # The checksum treats its own 8 bytes as spaces (0x20 * 8 = 256); old writers
        # summed signed chars, so accept either sum (pax spec; Go does the same).
        stored: int | None = None
        if _PLAIN_NUMBERS.fullmatch(field):
            try:
                stored = int(field.rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                stored = _numeric(field)
        unsigned = _byte_sum(block) - sum(field) + 256
        if stored == unsigned:
            return
        high = sum(1 for b in block[:148] if b > 127) + sum(1 for b in block[156:] if b > 127)
        if stored is not None and stored == unsigned - 256 * high:
            return
        raise self._fail(f"not a tar header: bad checksum (stored {field!r}, computed "
                         f"{unsigned})", offset, name)

    def _general(self, block: bytes, fields: tuple[bytes, ...], typeflag: int, name: bytes,
                 fmt: str, size: int, offset: int,
                 numbers: tuple[int, int, int, int, int, int, int] | None) -> None:
        """Any entry, in Go's Reader.next() order: ustar fields, PAX records, GNU long names,
        the v7 directory rule, sparse maps."""
        if numbers is not None:
            mode, uid, gid, _, mtime, devmajor, devminor = numbers
        else:
            mode, uid, gid, mtime, devmajor, devminor = (
                _numeric(fields[i]) or 0 for i in (1, 2, 3, 5, 13, 14))
        mtime_ns = mtime * 1_000_000_000
        if fmt == "v7":
            devmajor = devminor = 0
        linkname = _cstr(fields[8])
        pax = self._pax
        xattrs: dict[bytes, bytes] = {}
        if pax:
            for key, value in pax.items():
                if key.startswith(b"SCHILY.xattr."):
                    xattrs[key[13:]] = value
                elif not value:
                    continue  # Go: an empty value keeps the ustar field
                elif key == b"path":
                    name = value
                elif key == b"linkpath":
                    linkname = value
                elif key in (b"uid", b"gid", b"size"):
                    if not _DIGITS.fullmatch(value) or not -(1 << 63) <= int(value) <= _MAX_SIZE:
                        raise self._fail(f"bad pax {key.decode()} {value[:40]!r}", offset, name)
                    if key == b"uid":
                        uid = int(value)
                    elif key == b"gid":
                        gid = int(value)
                    else:
                        size = int(value)
                elif key == b"mtime":
                    parsed = _pax_time(value)
                    if parsed is None:
                        raise self._fail(f"bad pax mtime {value[:40]!r}", offset, name)
                    mtime_ns = parsed
        if self._long_name:
            name = self._long_name
        if self._long_link:
            linkname = self._long_link
        if typeflag == 0:
            typeflag = DIRECTORY if name.endswith(b"/") else REGULAR
        header_only = typeflag in _HEADER_ONLY
        if size < 0 and not header_only:
            raise self._fail(f"negative size {size}", offset, name)
        self._pax, self._long_name, self._long_link = {}, b"", b""
        self._entry = (name, offset)
        mtime, nsec = divmod(mtime_ns, 1_000_000_000)
        base = _Base(name, typeflag, offset, mode & 0o7777, uid, gid, mtime, nsec, linkname,
                     devmajor, devminor, tuple(xattrs.items()))
        physical = 0 if header_only else size
        if typeflag == ord("S"):
            if fmt != "gnu":
                raise self._fail("old GNU sparse entry in a non-GNU header", offset, name)
            real = _numeric(block[483:495])
            if real is None:
                raise self._fail("bad realsize field of the GNU sparse header", offset, name)
            entries = self._old_sparse_entries(block, _GNU_SPARSE_AT, _GNU_SPARSE_COUNT, [],
                                               offset, name)
            pending = _SparsePending(base, physical, real, entries)
            if block[_GNU_EXTENDED_AT]:
                self._want_extension(pending)
                return
            self._finish_sparse(pending, offset + BLOCK)
            return
        sparse = _pax_sparse(pax)
        if sparse is not None:
            if header_only:
                raise self._fail("a header-only entry cannot be sparse", offset, name)
            version, sparse_name, real_text, pax_entries = sparse
            if sparse_name:
                base = base._replace(name=sparse_name)
                self._entry = (sparse_name, offset)
            real = size
            if real_text:
                if not _DIGITS.fullmatch(real_text) or int(real_text) > _MAX_SIZE:
                    raise self._fail(f"bad GNU.sparse size {real_text[:40]!r}", offset, name)
                real = int(real_text)
            if version == 1:
                pending = _SparsePending(base, physical, real, [])
                self._read_map_1x0(pending)
                return
            if pax_entries is None:
                raise self._fail("malformed GNU.sparse.map", offset, name)
            self._finish_sparse(_SparsePending(base, physical, real, pax_entries),
                                offset + BLOCK)
            return
        self._emit(base, offset + BLOCK, physical, None, logical=size)

    def _emit(self, base: _Base, data_offset: int, physical: int,
              sparse: tuple[tuple[int, int], ...] | None, *, logical: int | None = None) -> None:
        """Hand the member on; `physical` bytes of data (and padding) follow at data_offset."""
        self._skip = self._skip_data = physical
        self._skip += -physical % BLOCK
        kind = base.kind
        size = physical if logical is None else logical
        if kind in _HEADER_ONLY:
            size = 0
        self.members += 1
        self._on_member(TarMember(base.name, kind, base.header_offset, data_offset, size,
                                  base.mode, base.uid, base.gid, base.mtime, base.nsec,
                                  base.linkname, base.devmajor, base.devminor, base.xattrs,
                                  sparse))

    # -- sparse maps ---------------------------------------------------------------------

    def _old_sparse_entries(self, block: bytes, at: int, count: int, out: list[tuple[int, int]],
                            offset: int, name: bytes) -> list[tuple[int, int]]:
        for index in range(count):
            entry = at + 24 * index
            if block[entry] == 0:
                break  # "identical to GNU and BSD tar"
            start, length = _numeric(block[entry:entry + 12]), _numeric(
                block[entry + 12:entry + 24])
            if start is None or length is None:
                raise self._fail("bad GNU sparse map entry", offset, name)
            out.append((start, length))
            if len(out) > MAX_SPARSE_ENTRIES:
                raise self._fail(f"sparse map of more than {MAX_SPARSE_ENTRIES} entries",
                                 offset, name)
        return out

    def _want_extension(self, pending: _SparsePending) -> None:
        def handler(block: bytes, at: int) -> None:
            name = pending.base.name
            self._old_sparse_entries(block, 0, _EXT_SPARSE_COUNT, pending.entries,
                                     pending.base.header_offset, name)
            if block[_EXT_EXTENDED_AT]:
                self._want_extension(pending)
            else:
                self._finish_sparse(pending, at + BLOCK)
        self._want = _Want(BLOCK, handler, "the GNU sparse extension headers")

    def _read_map_1x0(self, pending: _SparsePending) -> None:
        """GNU sparse 1.0: a newline-separated map in whole blocks at the start of the data
        (Go's readGNUSparseMap1x0: blocks are read until they hold enough newlines)."""
        text = bytearray()
        state = {"newlines": 0, "entries": -1, "used": 0}

        def handler(block: bytes, at: int) -> None:
            pending.physical -= BLOCK
            if pending.physical < 0:
                raise self._fail("GNU sparse 1.0 map runs past the entry's data",
                                 pending.base.header_offset, pending.base.name)
            text.extend(block)
            state["newlines"] += block.count(b"\n")
            if state["entries"] < 0:
                if state["newlines"] < 1:
                    self._want = _Want(BLOCK, handler, "the GNU sparse 1.0 map")
                    return
                token = self._token(text, state)
                if not _DIGITS.fullmatch(token) or int(token) < 0:
                    raise self._fail("bad GNU sparse 1.0 entry count",
                                     pending.base.header_offset, pending.base.name)
                state["entries"] = int(token)
                if state["entries"] > MAX_SPARSE_ENTRIES:
                    raise self._fail(f"sparse map of more than {MAX_SPARSE_ENTRIES} entries",
                                     pending.base.header_offset, pending.base.name)
            if state["newlines"] < 2 * state["entries"]:
                self._want = _Want(BLOCK, handler, "the GNU sparse 1.0 map")
                return
            for _ in range(state["entries"]):
                start, length = self._token(text, state), self._token(text, state)
                if not (_DIGITS.fullmatch(start) and _DIGITS.fullmatch(length)):
                    raise self._fail("bad GNU sparse 1.0 map entry",
                                     pending.base.header_offset, pending.base.name)
                pending.entries.append((int(start), int(length)))
            self._finish_sparse(pending, at + BLOCK)

        if pending.physical <= 0:
            raise self._fail("GNU sparse 1.0 entry without a map", pending.base.header_offset,
                             pending.base.name)
        self._want = _Want(BLOCK, handler, "the GNU sparse 1.0 map")

    @staticmethod
    def _token(text: bytearray, state: dict[str, int]) -> bytes:
        used = state["used"]
        end = text.index(b"\n", used)
        state["used"] = end + 1
        state["newlines"] -= 1
        return bytes(text[used:end])

    def _finish_sparse(self, pending: _SparsePending, data_offset: int) -> None:
        base, real = pending.base, pending.real
        entries = pending.entries
        # Go's validateSparseEntries (the checks of BSD tar), then the data must be exactly
        # the segments (errMissData / errUnrefData when reading).
        end = 0
        for start, length in entries:
            if start < 0 or length < 0 or start > _MAX_SIZE - length or start + length > real \
                    or end > start:
                raise self._fail(f"invalid sparse map entry ({start}, {length}) for a file of "
                                 f"{real} bytes", base.header_offset, base.name)
            end = start + length
        stored = sum(length for _, length in entries)
        if stored != pending.physical:
            raise self._fail(f"sparse map names {stored} bytes of data but the entry stores "
                             f"{pending.physical}", base.header_offset, base.name)
        kind = REGULAR if base.kind == ord("S") else base.kind
        self._emit(base._replace(kind=kind), data_offset, pending.physical,
                   tuple((s, n) for s, n in entries if n), logical=real)

    # -- extended headers --------------------------------------------------------------

    def _special(self, typeflag: int, name: bytes, size: int) -> Callable[[bytes, int], None]:
        def handler(data: bytes, at: int) -> None:
            self._skip = -size % BLOCK
            header = at - BLOCK
            if typeflag == 0x4C:  # 'L': GNU long name (Go: the last one wins)
                self._long_name = _cstr(data)
            elif typeflag == 0x4B:  # 'K': GNU long link name
                self._long_link = _cstr(data)
            elif typeflag == 0x78:  # 'x': replaces the records of an earlier 'x' (Go)
                self._pax = _parse_pax(data, name, header)
            else:  # 'g': Go returns it as an entry of its own, applied to no other
                records = _parse_pax(data, name, header)
                self._pax, self._long_name, self._long_link = {}, b"", b""
                self._entry = (records.get(b"path") or name, header)
                self._emit(_Base(records.get(b"path") or name, GLOBAL, header, 0, 0, 0, 0, 0,
                                 b"", 0, 0, ()), at, 0, None)
                self._skip = -size % BLOCK
        return handler


class _Base(NamedTuple):
    """The parts of a member known once its header (and PAX records) are read."""

    name: bytes
    kind: int
    header_offset: int
    mode: int
    uid: int
    gid: int
    mtime: int
    nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[bytes, bytes], ...]


class _SparsePending:
    """A sparse member whose map is still being read."""

    __slots__ = ("base", "entries", "physical", "real")

    def __init__(self, base: _Base, physical: int, real: int,
                 entries: list[tuple[int, int]]) -> None:
        self.base, self.physical, self.real, self.entries = base, physical, real, entries


def _pax_time(value: bytes) -> int | None:
    """Go's parsePAXTime in nanoseconds: "[-]SECONDS[.FRACTION]", fraction cut at 9 digits."""
    whole, _, frac = value.partition(b".")
    if not _DIGITS.fullmatch(whole) or not -(1 << 63) <= int(whole) < 1 << 63:
        return None
    if frac and not frac.isdigit():
        return None
    seconds = int(whole)
    nanos = int(frac[:9].ljust(9, b"0")) if frac else 0
    return seconds * 1_000_000_000 + (-nanos if whole.startswith(b"-") else nanos)


def _parse_pax(data: bytes, name: bytes, offset: int) -> dict[bytes, bytes]:
    """Split "LEN KEY=VALUE\\n" records exactly as Go's parsePAX (pax spec, "pax Extended
    Header"); GNU sparse 0.0's repeated offset/numbytes records become one GNU.sparse.map."""
    records: dict[bytes, bytes] = {}
    sparse_map: list[bytes] = []
    pos = 0
    size = len(data)
    while pos < size:
        space = data.find(b" ", pos)
        length = data[pos:space]
        if space < 0 or not _DIGITS.fullmatch(length) or int(length) < 5 \
                or int(length) > size - pos or int(length) <= space + 1 - pos \
                or data[pos + int(length) - 1] != 0x0A:
            raise TarFormatError(
                f"{show(name)}: malformed pax record at byte {pos} of the extended header "
                f"(tar header at offset {offset})"
            )
        end = pos + int(length)
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        nul_checked = value if key in (b"path", b"linkpath", b"uname", b"gname") else key
        if not eq or not key or b"\0" in nul_checked:
            raise TarFormatError(
                f"{show(name)}: invalid pax record {show(key[:60])} in the extended header "
                f"(tar header at offset {offset})"
            )
        pos = end
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            expect = b"GNU.sparse.offset" if len(sparse_map) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != expect or b"," in value:
                raise TarFormatError(
                    f"{show(name)}: GNU sparse 0.0 records out of order in the extended header "
                    f"(tar header at offset {offset})"
                )
            sparse_map.append(value)
            continue
        records[key] = value
    if sparse_map:
        records[b"GNU.sparse.map"] = b",".join(sparse_map)
    return records


def _pax_sparse(pax: dict[bytes, bytes]) -> tuple[
        int, bytes, bytes, list[tuple[int, int]] | None] | None:
    """(major version, GNU.sparse.name, size text, 0.x entries) of a PAX sparse member, or
    None for a plain one (Go's readGNUSparsePAXHeaders)."""
    if not pax:
        return None
    major, minor = pax.get(b"GNU.sparse.major", b""), pax.get(b"GNU.sparse.minor", b"")
    if major == b"0" and minor in (b"0", b"1"):
        version = 0
    elif major == b"1" and minor == b"0":
        version = 1
    elif major or minor:
        return None  # an unknown version: Go reads the member as a plain file
    elif pax.get(b"GNU.sparse.map"):
        version = 0
    else:
        return None
    size = pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize") or b""
    name = pax.get(b"GNU.sparse.name", b"")
    if version == 1:
        return 1, name, size, []
    count = pax.get(b"GNU.sparse.numblocks", b"")
    if not _DIGITS.fullmatch(count) or int(count) < 0 or int(count) > MAX_SPARSE_ENTRIES:
        return 0, name, size, None
    numbers = pax.get(b"GNU.sparse.map", b"").split(b",")
    if numbers == [b""]:
        numbers = []
    if len(numbers) != 2 * int(count) or not all(_DIGITS.fullmatch(n) for n in numbers):
        return 0, name, size, None
    values = [int(n) for n in numbers]
    return 0, name, size, list(zip(values[::2], values[1::2], strict=True))
