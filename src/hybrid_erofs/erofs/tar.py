"""Push-based streaming tar parser: feed() uncompressed chunks, get one TarMember per entry.

It sits beside the gzip checkpoint builder on the same decompressed stream; file data is
skipped by arithmetic and never buffered.  Formats: ustar, GNU (L/K, base-256), PAX (x/g).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import unquote_to_bytes
from zlib import adler32

from hybrid_erofs.errors import TarFormatError

BLOCK = 512

# Normalised member kinds (the ustar typeflag byte; '7' and V7 '\0' become REGULAR).
REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = b"0123456"

# POSIX ustar header fields (pax spec, "ustar Interchange Format"): offsets 0..499.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
_MAX_META_PAYLOAD = 64 << 20  # PAX / GNU long-name payloads are held in memory
_MAX_SIZE = 1 << 63
_PAX_INT = re.compile(rb"[0-9]+")
_PAX_TIME = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")
_ZERO_BLOCK = bytes(BLOCK)


class TarMember(NamedTuple):
    """One archive entry, after PAX / GNU long-name overrides.

    `data_offset` is the offset of the member's data in the uncompressed tar (always a
    multiple of 512); `size` is the data length.  `mode` holds permission bits only.
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


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated header string."""
    return field.partition(b"\0")[0]


def _byte_sum(block: bytes) -> int:
    """Sum of the bytes of a 512-byte block.

    adler32's low half is 1 + the byte sum modulo 65521, which is exact for 256 bytes (at
    most 65280): two C calls instead of summing 512 ints in Python.
    """
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _number(field: bytes, what: str, name: bytes, offset: int) -> int:
    """Octal (NUL/space terminated) or GNU base-256 (lead byte 0x80 / 0xff) header number."""
    lead = field[0]
    if lead & 0x80:
        if lead == 0x80:
            return int.from_bytes(field[1:], "big")
        if lead == 0xFF:
            return int.from_bytes(field, "big", signed=True)
    else:
        try:  # fast path: "0000644\0", "00000001234 ", all NULs
            return int(field.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            text = _cstr(field).strip(b" ")  # tolerate junk after the terminating NUL
            if text.isdigit():
                try:
                    return int(text or b"0", 8)
                except ValueError:
                    pass
            elif not text:
                return 0
    raise TarFormatError(
        f"{_show(name)}: bad {what} field {field!r} in tar header at offset {offset}"
    )


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace") or "<unnamed>"


class _Pending:
    """Per-entry overrides collected from x / L / K headers before the real header."""

    __slots__ = ("first_offset", "gid", "linkpath", "mtime", "path", "size", "uid", "xattrs")

    def __init__(self) -> None:
        self.path: bytes | None = None
        self.linkpath: bytes | None = None
        self.size: int | None = None
        self.uid: int | None = None
        self.gid: int | None = None
        self.mtime: tuple[int, int] | None = None
        self.xattrs: dict[bytes, bytes] = {}
        self.first_offset = -1


class TarParser:
    """Incremental tar reader calling `on_member(member)` for each entry, in archive order.

    Feed the uncompressed stream with `feed(chunk)` (any chunk sizes; a memoryview is only
    read during the call) and call `close()` at EOF.  After the end-of-archive marker the
    rest of the stream is accepted and ignored.  Errors raise `TarFormatError` naming the
    entry and its header offset.  Not thread-safe.
    """

    def __init__(self, on_member: Callable[[TarMember], None]) -> None:
        self._on_member = on_member
        self._offset = 0          # bytes consumed so far (uncompressed tar offset)
        self._skip = 0            # data + padding still to skip
        self._partial = bytearray()  # an incomplete header block
        self._payload: bytearray | None = None  # x/g/L/K data being collected
        self._payload_need = 0
        self._payload_kind = 0
        self._payload_header: tuple[bytes, int] = (b"", 0)
        self._zero_blocks = 0
        self._done = False
        self._closed = False
        self._pending = _Pending()
        self._global = _Pending()
        self._has_global = False  # a 'g' header was seen: self._global may override fields
        self._end_offset = 0
        self._last_name = b""
        self._last_header = 0
        self.volume_label = b""
        self.members = 0

    @property
    def offset(self) -> int:
        """Bytes of layer data consumed so far."""
        return self._offset

    @property
    def end_offset(self) -> int:
        """Offset just past the end-of-archive marker (or the last member if it is missing)."""
        return self._end_offset

    @property
    def finished(self) -> bool:
        """True once the end-of-archive marker has been seen."""
        return self._done

    @property
    def needed_offset(self) -> int:
        """The parser will not look at the bytes before this offset (member data, padding, or
        everything after the end-of-archive marker): `skip()` may stand in for feeding them."""
        return 1 << 64 if self._done else self._offset + self._skip

    def skip(self, length: int) -> None:
        """Consume the next `length` bytes unseen; they must end by `needed_offset`."""
        if self._closed:
            raise ValueError("skip() after close()")
        if not self._done:
            if not 0 <= length <= self._skip:
                raise ValueError(f"'length' must be 0..{self._skip} (got {length})")
            self._skip -= length
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
                self._skip -= take
                pos += take
                self._offset += take
                continue
            if self._payload is not None:
                take = min(self._payload_need - len(self._payload), length - pos)
                self._payload += view[pos:pos + take]
                pos += take
                self._offset += take
                if len(self._payload) == self._payload_need:
                    self._finish_payload()
                continue
            if self._partial or length - pos < BLOCK:
                take = min(BLOCK - len(self._partial), length - pos)
                self._partial += view[pos:pos + take]
                pos += take
                self._offset += take
                if len(self._partial) == BLOCK:
                    block = bytes(self._partial)
                    self._partial.clear()
                    self._header(block, self._offset - BLOCK)
                continue
            self._offset += BLOCK
            self._header(bytes(view[pos:pos + BLOCK]), self._offset - BLOCK)
            pos += BLOCK
            if self._done:
                self._offset += length - pos
                return

    def close(self) -> None:
        """Signal EOF; raise if the stream stopped inside a header or a member's data."""
        if self._closed:
            return
        self._closed = True
        if self._done:
            return
        if self._skip or self._payload is not None or self._partial:
            name, header = self._payload_header if self._payload is not None else (
                self._last_name, self._last_header)
            raise TarFormatError(
                f"{_show(name)}: truncated tar: stream ends at offset {self._offset} "
                f"inside the entry whose header is at offset {header}"
            )
        if self._pending.first_offset >= 0:
            raise TarFormatError(
                f"{_show(self._pending.path or b'')}: truncated tar: extended header at "
                f"offset {self._pending.first_offset} has no following entry"
            )
        # A missing end-of-archive marker is tolerated (mkfs only warns).
        self._end_offset = self._offset

    # -- per-header work -------------------------------------------------------------

    def _header(self, block: bytes, offset: int) -> None:
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._done = True
                self._end_offset = offset + BLOCK
            return
        self._zero_blocks = 0
        fields = _HEADER.unpack_from(block)
        raw_name = _cstr(fields[0])
        self._last_name, self._last_header = raw_name, offset
        self._check_sum(block, fields[6], raw_name, offset)
        typeflag = fields[7][0]
        magic = fields[9]
        if magic[:5] != b"ustar" and magic != b"\0\0\0\0\0\0":
            raise TarFormatError(
                f"{_show(raw_name)}: not a tar header (magic {magic!r}) at offset {offset}"
            )
        pending = self._pending
        if typeflag in b"xgLK":
            size = _number(fields[4], "size", raw_name, offset)
            if size < 0 or size > _MAX_META_PAYLOAD:
                raise TarFormatError(
                    f"{_show(raw_name)}: extended header of {size} bytes at offset {offset} "
                    f"is out of range (0..{_MAX_META_PAYLOAD})"
                )
            if typeflag != 0x67 and pending.first_offset < 0:
                pending.first_offset = offset
            self._payload = bytearray()
            self._payload_need = size
            self._payload_kind = typeflag
            self._payload_header = (raw_name, offset)
            if size == 0:
                self._finish_payload()
            return
        pax_size = pending.size if pending.size is not None else self._global.size
        size = pax_size if pax_size is not None else _number(fields[4], "size", raw_name, offset)
        if size < 0 or size > _MAX_SIZE:
            raise TarFormatError(f"{_show(raw_name)}: absurd size {size} at offset {offset}")
        data_offset = offset + BLOCK
        self._skip = size + (-size % BLOCK)
        if typeflag == 0x56:  # 'V' volume label: goes to the superblock (mkfs)
            self.volume_label = raw_name[:16]
            self._pending = _Pending()
            return
        if typeflag == 0x53:  # 'S'
            raise TarFormatError(
                f"{_show(pending.path or raw_name)}: GNU sparse file at offset {offset} is not "
                "supported"
            )
        if typeflag in b"07\0":
            kind = REGULAR
        elif typeflag in b"123456":
            kind = typeflag
        else:
            # Vendor extensions (GNU 'D', 'M', 'N', Solaris 'A', 'X'...): skipped like mkfs.
            self._pending = _Pending()
            return
        name = pending.path if pending.path is not None else self._global.path
        if name is None:
            name = raw_name
            prefix = _cstr(fields[15])
            if prefix and magic == b"ustar\0":
                name = prefix + b"/" + name
        self._emit(fields, kind, name, size, data_offset, offset)

    def _check_sum(self, block: bytes, field: bytes, name: bytes, offset: int) -> None:
        # The checksum treats its own 8 bytes as spaces (0x20 * 8 = 256); old writers
        # summed signed chars, so accept either sum (pax spec; mkfs does the same).
        stored = _number(field, "checksum", name, offset)
        unsigned = _byte_sum(block) - sum(field) + 256
        if stored == unsigned:
            return
        high = sum(1 for b in block[:148] if b > 127) + sum(1 for b in block[156:] if b > 127)
        if stored == unsigned - 256 * high:
            return
        raise TarFormatError(
            f"{_show(name)}: bad tar header checksum at offset {offset} "
            f"(stored {stored}, computed {unsigned})"
        )

    def _emit(self, fields: tuple[bytes, ...], kind: int, name: bytes, size: int,
              data_offset: int, offset: int) -> None:
        # Precedence: this entry's x/L/K overrides, then the global PAX header, then ustar.
        pending, glob = self._pending, self._global
        if pending.first_offset < 0 and not self._has_global and self._emit_plain(
                fields, kind, name, size, data_offset, offset):
            return
        if b"\0" in name:
            raise TarFormatError(f"{_show(name)}: NUL byte in path at offset {offset}")
        linkname = pending.linkpath if pending.linkpath is not None else glob.linkpath
        if linkname is None:
            linkname = _cstr(fields[8])
        uid = pending.uid if pending.uid is not None else glob.uid
        if uid is None:
            uid = _number(fields[2], "uid", name, offset)
        gid = pending.gid if pending.gid is not None else glob.gid
        if gid is None:
            gid = _number(fields[3], "gid", name, offset)
        mtime_pair = pending.mtime if pending.mtime is not None else glob.mtime
        if mtime_pair is None:
            mtime_pair = (_number(fields[5], "mtime", name, offset), 0)
        devmajor = devminor = 0
        if kind in (CHARDEV, BLOCKDEV):
            devmajor = _number(fields[13], "devmajor", name, offset)
            devminor = _number(fields[14], "devminor", name, offset)
        xattrs = {**glob.xattrs, **pending.xattrs} if glob.xattrs else pending.xattrs
        member = TarMember(
            name=name, kind=kind, header_offset=offset, data_offset=data_offset, size=size,
            mode=_number(fields[1], "mode", name, offset) & 0o7777, uid=uid, gid=gid,
            mtime=mtime_pair[0], mtime_nsec=mtime_pair[1], linkname=linkname,
            devmajor=devmajor, devminor=devminor, xattrs=tuple(xattrs.items()),
        )
        if pending.first_offset >= 0:
            self._pending = _Pending()
        self.members += 1
        self._on_member(member)

    def _emit_plain(self, fields: tuple[bytes, ...], kind: int, name: bytes, size: int,
                    data_offset: int, offset: int) -> bool:
        """Emit an entry without overrides (most of them) from its header's own fields,
        parsed inline; False when a field is odd (base-256, junk): `_emit` then decides."""
        try:
            uid = int(fields[2].rstrip(b"\0 ") or b"0", 8)
            gid = int(fields[3].rstrip(b"\0 ") or b"0", 8)
            mtime = int(fields[5].rstrip(b"\0 ") or b"0", 8)
            mode = int(fields[1].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            return False
        devmajor = devminor = 0
        if kind in (CHARDEV, BLOCKDEV):
            devmajor = _number(fields[13], "devmajor", name, offset)
            devminor = _number(fields[14], "devminor", name, offset)
        self.members += 1
        self._on_member(TarMember(name, kind, offset, data_offset, size, mode & 0o7777, uid, gid,
                                  mtime, 0, _cstr(fields[8]), devmajor, devminor, ()))
        return True

    # -- extended headers --------------------------------------------------------------

    def _finish_payload(self) -> None:
        assert self._payload is not None
        data = bytes(self._payload)
        kind = self._payload_kind
        size = self._payload_need
        self._payload = None
        self._skip = -size % BLOCK
        name, offset = self._payload_header
        if kind == 0x4C or kind == 0x4B:  # 'L' / 'K': GNU long name / link
            value = _cstr(data)
            if kind == 0x4C:
                self._pending.path = value
            else:
                self._pending.linkpath = value
            return
        records = self._parse_pax(data, name, offset)
        # 'g' applies to every later entry (POSIX; mkfs's first-entry quirk is not copied).
        self._has_global = self._has_global or kind == 0x67
        self._apply_pax(records, self._global if kind == 0x67 else self._pending, name, offset)

    def _parse_pax(self, data: bytes, name: bytes, offset: int) -> dict[bytes, bytes]:
        """Split "LEN KEY=VALUE\\n" records (pax spec, "pax Extended Header")."""
        records: dict[bytes, bytes] = {}
        pos = 0
        while pos < len(data):
            if data[pos] == 0:  # some writers pad the payload with NULs
                break
            space = data.find(b" ", pos)
            try:
                length = int(data[pos:space]) if space > pos else -1
            except ValueError:
                length = -1
            end = pos + length
            if length <= space - pos or end > len(data) or data[end - 1] != 0x0A:
                raise TarFormatError(
                    f"{_show(name)}: malformed pax record at offset {pos} in the extended "
                    f"header at offset {offset}"
                )
            key, eq, value = data[space + 1:end - 1].partition(b"=")
            if not eq:
                raise TarFormatError(
                    f"{_show(name)}: pax record without '=' in the extended header at "
                    f"offset {offset}"
                )
            records[key] = value
            pos = end
        return records

    def _apply_pax(self, records: dict[bytes, bytes], into: _Pending, name: bytes,
                   offset: int) -> None:
        label = records.get(b"path", name).split(b"\0")[0]
        for key, value in records.items():
            if key.startswith(b"GNU.sparse."):
                raise TarFormatError(
                    f"{_show(label)}: PAX sparse file (key {key.decode('ascii', 'replace')}) "
                    f"at offset {offset} is not supported"
                )
            if key.startswith(b"SCHILY.xattr."):
                into.xattrs[key[13:]] = value
            elif key.startswith(b"LIBARCHIVE.xattr."):
                xname = unquote_to_bytes(key[17:])
                try:
                    into.xattrs[xname] = base64.b64decode(
                        value + b"=" * (-len(value) % 4), validate=True)
                except binascii.Error as exc:
                    raise TarFormatError(
                        f"{_show(label)}: bad base64 xattr value for "
                        f"{xname.decode('utf-8', 'replace')} at offset {offset}"
                    ) from exc
            else:
                self._apply_key(key, value, into, label, offset)

    def _apply_key(self, key: bytes, value: bytes, into: _Pending, label: bytes,
                   offset: int) -> None:
        if key == b"path":
            if b"\0" in value:
                raise TarFormatError(f"{_show(label)}: NUL byte in pax path at offset {offset}")
            into.path = value or None
        elif key == b"linkpath":
            if b"\0" in value:
                raise TarFormatError(f"{_show(label)}: NUL byte in pax linkpath at offset {offset}")
            into.linkpath = value or None
        elif key in (b"size", b"uid", b"gid"):
            if not _PAX_INT.fullmatch(value) or int(value) > _MAX_SIZE:
                raise TarFormatError(
                    f"{_show(label)}: bad pax {key.decode()} {value[:40]!r} at offset {offset}")
            setattr(into, key.decode(), int(value))
        elif key == b"mtime":
            match = _PAX_TIME.fullmatch(value)
            if not match:
                raise TarFormatError(
                    f"{_show(label)}: bad pax mtime {value[:40]!r} at offset {offset}")
            sign, whole, frac = match.groups()
            total_ns = int(whole) * 1_000_000_000 + int((frac or b"")[:9].ljust(9, b"0"))
            if sign:
                total_ns = -total_ns
            into.mtime = divmod(total_ns, 1_000_000_000)
