"""In-memory file tree built from tar members with mkfs.erofs --tar rules (erofs-tarindex.md §2).

Sits between the tar parser (tar.py) and the image serialiser (image.py); holds metadata only.
"""

from __future__ import annotations

import stat

from hybrid_erofs.erofs.tar import (
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    FIFO,
    HARDLINK,
    SYMLINK,
    TarMember,
)
from hybrid_erofs.errors import TarFormatError

MAX_NAME = 255  # EROFS dirent name limit; mkfs fails with ENAMETOOLONG at 256
_WHITEOUT_PREFIX = b".wh."
_OPAQUE_NAME = b".wh..wh..opq"
_XATTR_PREFIXES = ((b"user.", 1), (b"trusted.", 4), (b"security.", 6))
_ACL_NAMES = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}


def encode_dev(major: int, minor: int) -> int:
    """Linux new_encode_dev(): the i_u of a chr/blk inode (erofs-tarindex.md §1.5)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """(e_name_index, stored suffix) for an xattr name (erofs-tarindex.md §1.7)."""
    acl = _ACL_NAMES.get(name)
    if acl is not None:
        return acl, b""
    for prefix, index in _XATTR_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    return 0, name


class Node:
    """One inode: attributes, plus children (dirs), data offset (files) or target (symlinks)."""

    __slots__ = ("children", "data_offset", "gid", "mode", "mtime", "nid", "nsec", "parent",
                 "rdev", "size", "target", "uid", "xattrs")

    def __init__(self, mode: int, uid: int, gid: int, mtime: int, nsec: int) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.nsec = nsec
        self.size = 0
        self.data_offset = 0
        self.target = b""
        self.rdev = 0
        self.xattrs: dict[bytes, bytes] = {}
        self.children: dict[bytes, Node] | None = None
        self.parent: Node | None = None
        self.nid = 0  # set by the image writer

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def _new_dir(parent: Node | None, mode: int, uid: int, gid: int, mtime: int, nsec: int) -> Node:
    node = Node(mode, uid, gid, mtime, nsec)
    node.children = {}
    node.parent = parent if parent is not None else node
    return node


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


class Tree:
    """Applies tar members to a tree: later entries win, implicit parents, hard links, aufs.

    Args:
        aufs: convert `.wh.NAME` / `.wh..wh..opq` like `mkfs.erofs --aufs`.
        root_uid / root_gid / root_mtime: attributes of the root when the tar has no `./`.
    """

    def __init__(self, *, aufs: bool, root_uid: int, root_gid: int, root_mtime: int) -> None:
        self.aufs = aufs
        # mkfs: a root without a './' entry is 040777 owned by the builder (§2).
        self.root = _new_dir(None, stat.S_IFDIR | 0o777, root_uid, root_gid, root_mtime, 0)
        self._dirs: dict[bytes, Node] = {b"": self.root}  # parent-path cache, no '..' paths

    # -- path resolution ------------------------------------------------------------------

    def _parent_of(self, member: TarMember) -> tuple[Node, bytes | None]:
        """Resolve the member's parent dir (creating implicit dirs) and its last component.

        The component is None when the path names the root (or resolves to a dir via '..').
        """
        parts = [c for c in member.name.split(b"/") if c and c != b"."]
        if not parts:
            return self.root, None
        base = parts.pop()
        if b".." not in parts and base != b"..":
            key = b"/".join(parts)
            node = self._dirs.get(key)
            if node is None:
                node = self._walk(parts, member)
                self._dirs[key] = node
            return node, base
        node = self._walk(parts, member)
        if base == b"..":
            # Lexical resolution: 'a/..' names a's parent (mkfs has a quirk here, §2).
            assert node.parent is not None
            return node.parent, None
        return node, base

    def _walk(self, parts: list[bytes], member: TarMember) -> Node:
        node = self.root
        for part in parts:
            if part == b"..":
                assert node.parent is not None
                node = node.parent  # the root's parent is the root: clamped
                continue
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                self._check_name(part, member)
                # Implicit parent: 0755 plus the parent's g+w/o+w, owner and mtime (mkfs).
                child = _new_dir(node, stat.S_IFDIR | 0o755 | (node.mode & 0o022),
                                 node.uid, node.gid, node.mtime, node.nsec)
                node.children[part] = child
            elif not child.is_dir:
                raise TarFormatError(
                    f"{_show(member.name)}: parent {_show(part)} is not a directory "
                    f"(tar header at offset {member.header_offset})"
                )
            node = child
        return node

    def _lookup(self, path: bytes) -> Node | None:
        """An existing node by archive path (hard link targets), without creating anything."""
        node = self.root
        for part in path.split(b"/"):
            if not part or part == b".":
                continue
            if part == b"..":
                assert node.parent is not None
                node = node.parent
                continue
            if node.children is None:
                return None
            found = node.children.get(part)
            if found is None:
                return None
            node = found
        return node

    @staticmethod
    def _check_name(name: bytes, member: TarMember) -> None:
        if len(name) > MAX_NAME:
            raise TarFormatError(
                f"{_show(member.name)}: name component of {len(name)} bytes exceeds "
                f"{MAX_NAME} (tar header at offset {member.header_offset})"
            )

    # -- applying members ---------------------------------------------------------------

    def add(self, member: TarMember) -> None:
        """Apply one tar member (erofs-tarindex.md §2)."""
        parent, base = self._parent_of(member)
        if base is None:
            if member.kind != DIRECTORY:
                raise TarFormatError(
                    f"{_show(member.name)}: a non-directory cannot replace the root "
                    f"(tar header at offset {member.header_offset})"
                )
            self._update_dir(parent, member)
            return
        whiteout = False
        if self.aufs:
            if base == _OPAQUE_NAME:
                parent.xattrs[b"trusted.overlay.opaque"] = b"y"
                return
            if base.startswith(_WHITEOUT_PREFIX) and len(base) > len(_WHITEOUT_PREFIX):
                base = base[len(_WHITEOUT_PREFIX):]
                whiteout = True
        self._check_name(base, member)
        children = parent.children
        assert children is not None
        existing = children.get(base)
        if member.kind == HARDLINK and not whiteout:
            target = self._lookup(member.linkname)
            if target is None:
                raise TarFormatError(
                    f"{_show(member.name)}: hard link target {_show(member.linkname)} does "
                    f"not exist (tar header at offset {member.header_offset})"
                )
            if target.is_dir:
                raise TarFormatError(
                    f"{_show(member.name)}: hard link target {_show(member.linkname)} is a "
                    f"directory (tar header at offset {member.header_offset})"
                )
            if target is existing:
                return  # a self-link changes nothing (mkfs)
            self._replace(children, base, existing, target)
            return
        if existing is not None and existing.is_dir and member.kind == DIRECTORY \
                and not whiteout:
            self._update_dir(existing, member)
            return
        self._replace(children, base, existing, self._new_node(parent, member, whiteout))

    def _replace(self, children: dict[bytes, Node], base: bytes, existing: Node | None,
                 node: Node) -> None:
        if existing is not None and existing.is_dir:
            # Its subtree is gone: every cached path below it may now be stale.
            self._dirs = {b"": self.root}
        children[base] = node

    def _update_dir(self, node: Node, member: TarMember) -> None:
        """Dir over dir: attributes replaced in place, xattrs merged (later values win)."""
        node.mode = stat.S_IFDIR | member.mode
        node.uid, node.gid = self._ids(member)
        node.mtime, node.nsec = member.mtime, member.mtime_nsec
        self._set_xattrs(node, member)

    def _new_node(self, parent: Node, member: TarMember, whiteout: bool) -> Node:
        uid, gid = self._ids(member)
        kind = member.kind
        if whiteout:
            # aufs whiteout -> overlayfs whiteout: chr 0/0 without permission bits; the
            # parent is marked so overlayfs does not iterate it directly (mkfs --aufs).
            parent.xattrs[b"trusted.overlay.origin"] = b""
            node = Node(stat.S_IFCHR, uid, gid, member.mtime, member.mtime_nsec)
        elif kind == DIRECTORY:
            node = _new_dir(parent, stat.S_IFDIR | member.mode, uid, gid, member.mtime,
                            member.mtime_nsec)
        else:
            fmt = {SYMLINK: stat.S_IFLNK, CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK,
                   FIFO: stat.S_IFIFO}.get(kind, stat.S_IFREG)
            node = Node(fmt | member.mode, uid, gid, member.mtime, member.mtime_nsec)
            if fmt == stat.S_IFREG:
                node.size, node.data_offset = member.size, member.data_offset
            elif fmt == stat.S_IFLNK:
                node.target = member.linkname
                node.size = len(member.linkname)
            elif fmt != stat.S_IFIFO:
                node.rdev = encode_dev(member.devmajor, member.devminor)
        self._set_xattrs(node, member)
        return node

    @staticmethod
    def _ids(member: TarMember) -> tuple[int, int]:
        if not (0 <= member.uid <= 0xFFFFFFFF and 0 <= member.gid <= 0xFFFFFFFF):
            raise TarFormatError(
                f"{_show(member.name)}: uid {member.uid} / gid {member.gid} out of range "
                f"(tar header at offset {member.header_offset})"
            )
        return member.uid, member.gid

    @staticmethod
    def _set_xattrs(node: Node, member: TarMember) -> None:
        for name, value in member.xattrs:
            suffix = split_xattr_name(name)[1]
            if len(suffix) > 255 or len(value) > 0xFFFF or not name:
                raise TarFormatError(
                    f"{_show(member.name)}: xattr {_show(name[:64])} too long (name "
                    f"{len(name)}, value {len(value)} bytes; tar header at offset "
                    f"{member.header_offset})"
                )
            node.xattrs[name] = value
