"""MetaBuilder: uncompressed tar chunks in, EROFS tar-index meta image out (`mkfs.erofs --tar=i`).

The indexer feeds it the same decompressed chunks as the checkpoint builder, in one pass.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable

from hybrid_erofs.erofs.image import MAX_TAR_SIZE, ImageWriter
from hybrid_erofs.erofs.sparse import (
    MAX_COPY_PER_FILE,
    MAX_COPY_PER_IMAGE,
    SparseLayout,
    plan_sparse,
)
from hybrid_erofs.erofs.tar import REGULAR, TarMember, TarParser, show
from hybrid_erofs.erofs.tree import Tree
from hybrid_erofs.errors import TarFormatError


def _default_build_time() -> int:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return int(epoch)
        except ValueError:
            raise ValueError(f"SOURCE_DATE_EPOCH: not an integer ({epoch!r})") from None
    return int(time.time())


class MetaBuilder:
    """Build the meta image of a tar streamed through `feed()`; `finish()` returns it.

    The image mounts as `meta || tar` (flat device table, erofs-tarindex.md §1.4).  Output is
    a pure function of the tar and the options (children sorted, BFS inode order).

    Args:
        aufs: convert aufs whiteouts like `mkfs.erofs --aufs`.
        uuid: 16 bytes for the superblock; None -> zeros (reproducible).
        build_time: superblock epoch; None -> $SOURCE_DATE_EPOCH, else now.
        root_uid / root_gid: owner of the root directory (0755; containerd ignores a './'
            entry) [default: 0, root, as containerd's snapshot directories].

    Memory: metadata only (about a few hundred bytes per entry); file data is skipped.
    Not thread-safe.
    """

    def __init__(self, *, aufs: bool = False, uuid: bytes | None = None,
                 build_time: int | None = None, root_uid: int | None = None,
                 root_gid: int | None = None) -> None:
        if uuid is not None and len(uuid) != 16:
            raise ValueError(f"'uuid' must be 16 bytes (got {len(uuid)})")
        self._uuid = uuid if uuid is not None else bytes(16)
        self._epoch = build_time if build_time is not None else _default_build_time()
        if not 0 <= self._epoch < 1 << 64:
            raise ValueError(f"'build_time' must be >= 0 (got {self._epoch})")
        self._tree = Tree(
            aufs=aufs,
            root_uid=0 if root_uid is None else root_uid,
            root_gid=0 if root_gid is None else root_gid,
            root_mtime=self._epoch,
        )
        self._parser = TarParser(self._add)
        self._sparse: dict[int, tuple[SparseLayout, list[bytearray]]] = {}
        self._copied = 0
        self._inodes = 0
        self._image: bytes | None = None

    def _add(self, member: TarMember) -> None:
        stored = member.size if member.sparse is None else sum(n for _, n in member.sparse)
        if member.data_offset + stored > MAX_TAR_SIZE:
            raise TarFormatError(
                f"{show(member.name)}: data ends past 2 TiB "
                f"(offset {member.data_offset}, size {stored}); 48-bit EROFS images "
                "are not supported"
            )
        if member.sparse is not None and member.kind == REGULAR and member.size:
            self._add_sparse(member)
        self._tree.add(member)

    def _add_sparse(self, member: TarMember) -> None:
        """Plan the chunks of a sparse file and collect the bytes of those copied into the
        meta as they stream by (bounded per file and per image)."""
        assert member.sparse is not None
        layout = plan_sparse(member.size, member.data_offset, member.sparse)
        copied = layout.copied_bytes
        self._copied += copied
        if copied > MAX_COPY_PER_FILE or self._copied > MAX_COPY_PER_IMAGE:
            raise TarFormatError(
                f"{show(member.name)}: sparse file needs {copied} bytes of its data copied "
                f"into the meta (bounds: {MAX_COPY_PER_FILE} per file, {MAX_COPY_PER_IMAGE} "
                f"per image; tar header at offset {member.header_offset})"
            )
        buffers = [bytearray(-(-copy.length // 512) * 512) for copy in layout.copies]
        pieces = sorted((at, length, index, inside) for index, copy in enumerate(layout.copies)
                        for at, length, inside in copy.pieces)
        for at, length, index, inside in pieces:
            def sink(offset: int, data: bytes, *, at: int = at, buffer: bytearray = buffers[index],
                     inside: int = inside) -> None:
                start = inside + offset - at
                buffer[start:start + len(data)] = data
            self._parser.capture(at, length, sink)
        self._sparse[member.data_offset] = (layout, buffers)

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Consume the next uncompressed tar bytes (a memoryview is not kept)."""
        if self._image is not None:
            raise ValueError("feed() after finish()")
        self._parser.feed(chunk)

    def skip(self, length: int) -> None:
        """Consume the next `length` bytes without them; they must end by `needed_offset`."""
        if self._image is not None:
            raise ValueError("skip() after finish()")
        self._parser.skip(length)

    @property
    def needed_offset(self) -> int:
        """The builder does not need the layer data before this offset (file contents)."""
        return self._parser.needed_offset

    def finish(self) -> bytes:
        """Signal EOF and return the meta image (a multiple of 512 bytes)."""
        if self._image is None:
            self._parser.close()
            writer = ImageWriter(
                self._tree.root, epoch=self._epoch, uuid=self._uuid,
                volume_label=b"", tar_size=self._parser.end_offset, sparse=self._sparse,
            )
            # Laying out makes no garbage cycles, and full collections would walk the whole
            # tree several times: pause the cyclic GC (a third of the time on big layers).
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                self._image = writer.build()
            finally:
                if gc_was_enabled:
                    gc.enable()
            self._inodes = writer.inodes
        return self._image

    @property
    def entries(self) -> int:
        """Tar entries seen so far (extended headers not counted)."""
        return self._parser.members

    @property
    def inodes(self) -> int:
        """Inodes in the image (0 until finish())."""
        return self._inodes

    @property
    def layer_size(self) -> int:
        """Bytes of layer data (uncompressed tar) consumed so far."""
        return self._parser.offset


def build_meta(chunks: Iterable[bytes | bytearray | memoryview], *, aufs: bool = False,
               uuid: bytes | None = None, build_time: int | None = None,
               root_uid: int | None = None, root_gid: int | None = None) -> bytes:
    """Convenience: feed every chunk of an uncompressed tar and return the meta image."""
    builder = MetaBuilder(aufs=aufs, uuid=uuid, build_time=build_time, root_uid=root_uid,
                          root_gid=root_gid)
    for chunk in chunks:
        builder.feed(chunk)
    return builder.finish()
