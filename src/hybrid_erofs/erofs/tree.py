"""In-memory file tree built from tar members with containerd's unpack rules (docs/tar.md).

Sits between the tar parser (tar.py) and the image serialiser (image.py); holds metadata only.
"""

from __future__ import annotations

import stat
import struct

from hybrid_erofs.erofs.tar import (
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    FIFO,
    GLOBAL,
    HARDLINK,
    REGULAR,
    SYMLINK,
    TarMember,
    show,
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
                 "rdev", "size", "sparse", "target", "uid", "xattrs")

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
        self.sparse: tuple[tuple[int, int], ...] | None = None
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


_show = show
_KIND_FORMATS = {REGULAR: stat.S_IFREG, SYMLINK: stat.S_IFLNK, CHARDEV: stat.S_IFCHR,
                 BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_MAX_LINK_HOPS = 255        # continuity's fs.RootPath gives up after 255 symlinks
_MAX_TIME_NS = (1 << 63) - 1
_LINUX_XATTR_NAMESPACES = (b"security.", b"system.", b"trusted.", b"user.")


_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)


def _acl_chmod(acl: bytes, mode: int) -> bytes:
    """posix_acl_chmod(): chmod rewrites the owner, group-or-mask and other entries."""
    out = bytearray(acl)
    tags = {struct.unpack_from("<H", acl, at)[0]: at for at in range(4, len(acl), 8)}
    group = _ACL_MASK if _ACL_MASK in tags else _ACL_GROUP_OBJ
    for tag, perm in ((_ACL_USER_OBJ, mode >> 6), (group, mode >> 3), (_ACL_OTHER, mode)):
        if tag in tags:
            struct.pack_into("<H", out, tags[tag] + 2, perm & 7)
    return bytes(out)


def clean(name: bytes) -> list[bytes]:
    """The components of `name` resolved lexically (Go's filepath.Clean), '..' clamped at the
    root (continuity's fs.RootPath): what containerd joins to the unpack root."""
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if not part or part == b".":
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return parts


class Tree:
    """Applies tar members to a tree exactly as containerd's archive.Apply unpacks a layer.

    The rules (docs/tar.md; containerd 1.6 archive/tar.go): names are cleaned lexically and
    '..' cannot leave the root; an entry naming the root is ignored; parents resolve through
    symlinks inside the layer and missing ones are made 0755 root:root; an existing entry is
    replaced unless a directory meets a directory (then attributes merge); a hard link shares
    the target inode and sets its attributes; symlinks are 0777; mtimes before 1970 read as
    1970; trusted.* xattrs, user.* xattrs on special files and unknown namespaces are not
    set; any type other than file, directory, link, symlink, device and fifo is refused.

    Args:
        aufs: convert `.wh.NAME` / `.wh..wh..opq` into overlayfs whiteouts like containerd's
            OverlayConvertWhiteout (and `mkfs.erofs --aufs`); otherwise they stay files.
        root_uid / root_gid / root_mtime: the root directory's owner and mtime (0755).
    """

    def __init__(self, *, aufs: bool, root_uid: int, root_gid: int, root_mtime: int) -> None:
        self.aufs = aufs
        self._root_mtime = root_mtime
        self.root = _new_dir(None, stat.S_IFDIR | 0o755, root_uid, root_gid, root_mtime, 0)
        # Parent paths already resolved (no '..'), valid until a directory or a symlink is
        # replaced.
        self._dirs: dict[bytes, Node] = {b"": self.root}

    # -- path resolution ------------------------------------------------------------------

    def _error(self, member: TarMember, what: str) -> TarFormatError:
        return TarFormatError(f"{_show(member.name)}: {what} (tar header at offset "
                              f"{member.header_offset})")

    def _resolve(self, parts: list[bytes], member: TarMember, *, create: bool) -> Node | None:
        """The directory `parts` names, following symlinks inside the tree (continuity's
        fs.RootPath) and, with `create`, making the missing ones (containerd's mkparent).
        None when a component is missing and `create` is off."""
        todo = parts[::-1]
        path: list[bytes] = []
        node = self.root
        hops = 0
        while todo:
            part = todo.pop()
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                self._check_name(part, member)
                child = _new_dir(node, stat.S_IFDIR | 0o755, 0, 0, self._root_mtime, 0)
                node.children[part] = child
            elif child.mode & 0o170000 == stat.S_IFLNK:
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise self._error(member, "too many levels of symbolic links in its path")
                target = child.target
                base = [] if target.startswith(b"/") else path
                todo.extend(clean(b"/".join([*base, target]))[::-1])
                path, node = [], self.root
                continue
            elif not child.is_dir:
                raise self._error(member, f"parent {_show(part)} is not a directory")
            path.append(part)
            node = child
        return node

    def _parent(self, parts: list[bytes], member: TarMember) -> Node:
        key = b"/".join(parts)
        node = self._dirs.get(key)
        if node is None:
            node = self._resolve(parts, member, create=True)
            assert node is not None
            self._dirs[key] = node
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
        """Apply one tar member (containerd's applyNaive / createTarFile)."""
        name = member.name
        parts = [c for c in name.split(b"/") if c and c != b"."]
        if b".." in parts:
            parts = clean(name)
        if not parts:
            return  # "resolved to root": containerd ignores it, whatever its type
        base = parts.pop()
        parent = self._parent(parts, member)
        children = parent.children
        assert children is not None
        if base.startswith(_WHITEOUT_PREFIX) and base != _OPAQUE_NAME:
            if base[len(_WHITEOUT_PREFIX):] in (b"", b".", b".."):
                raise self._error(member, "invalid whiteout name")
            if self.aufs:
                self._whiteout(parent, base[len(_WHITEOUT_PREFIX):], member)
                return
        elif base == _OPAQUE_NAME and self.aufs:
            parent.xattrs[b"trusted.overlay.opaque"] = b"y"
            return
        self._check_name(base, member)
        kind = member.kind
        existing = children.get(base)
        if existing is not None and not (existing.is_dir and kind == DIRECTORY):
            del children[base]
            if existing.is_dir or existing.mode & 0o170000 == stat.S_IFLNK:
                self._dirs = {b"": self.root}  # cached paths through it are stale
        if kind == GLOBAL:
            return  # a 'g' header: containerd creates nothing (but did the above)
        if kind == DIRECTORY:
            if existing is not None and existing.is_dir:
                self._set_attributes(existing, member)
                return
            node = _new_dir(parent, stat.S_IFDIR, 0, 0, 0, 0)
        elif kind == HARDLINK:
            node = self._link_target(member)
            children[base] = node
            self._set_attributes(node, member)
            return
        elif kind in _KIND_FORMATS:
            node = Node(_KIND_FORMATS[kind], 0, 0, 0, 0)
            if kind == REGULAR:
                node.size, node.data_offset = member.size, member.data_offset
                node.sparse = member.sparse
            elif kind == SYMLINK:
                node.target = member.linkname
                node.size = len(member.linkname)
            elif kind != FIFO:
                node.rdev = encode_dev(member.devmajor, member.devminor)
        else:
            raise self._error(member, f"unhandled tar header type {kind} ({chr(kind)!r}); "
                                      "containerd refuses the layer")
        children[base] = node
        self._set_attributes(node, member)

    def _whiteout(self, parent: Node, name: bytes, member: TarMember) -> None:
        """`.wh.NAME` -> an overlayfs whiteout (chr 0/0, mode 0, the entry's owner), as
        containerd's OverlayConvertWhiteout mknods it; the parent is marked so that
        overlayfs does not iterate it directly (`mkfs.erofs --aufs`)."""
        children = parent.children
        assert children is not None
        if name in children:
            # containerd's mknod fails with EEXIST: the layer cannot be applied.
            raise self._error(member, f"whiteout for {_show(name)}, which this layer "
                                      "created: containerd refuses it (mknod: file exists)")
        self._check_name(name, member)
        node = Node(stat.S_IFCHR, 0, 0, member.mtime, member.mtime_nsec)
        self._chown(node, member)
        children[name] = node
        parent.xattrs[b"trusted.overlay.origin"] = b""

    def _link_target(self, member: TarMember) -> Node:
        """containerd's hardlinkRootPath + link(2): parents resolve through symlinks, the
        target itself does not; it must exist and must not be a directory."""
        parts = clean(member.linkname)
        target: Node | None = self.root
        if parts:
            folder = self._resolve(parts[:-1], member, create=False)
            target = None
            if folder is not None:
                assert folder.children is not None
                target = folder.children.get(parts[-1])
        if target is None:
            raise self._error(member, f"hard link target {_show(member.linkname)} does not "
                                      "exist")
        if target.is_dir:
            raise self._error(member, f"hard link target {_show(member.linkname)} is a "
                                      "directory")
        return target

    def _set_attributes(self, node: Node, member: TarMember) -> None:
        """createTarFile's tail: Lchown, setxattr, lchmod (not on symlinks), chtimes."""
        self._chown(node, member)
        fmt = node.mode & 0o170000
        for name, value in member.xattrs:
            if not name.startswith(_LINUX_XATTR_NAMESPACES) or name.startswith(b"trusted."):
                continue  # ENOTSUP / EOPNOTSUPP: containerd logs a warning and goes on
            if name.startswith(b"user.") and fmt not in (stat.S_IFREG, stat.S_IFDIR):
                continue  # EPERM on special files: containerd goes on
            if name.startswith(b"system."):
                if name not in _ACL_NAMES or fmt == stat.S_IFLNK:
                    continue  # EOPNOTSUPP
                stored = self._acl(name, value, fmt, member)
                if stored is None:
                    node.xattrs.pop(name, None)
                    continue
            suffix = split_xattr_name(name)[1]
            if len(suffix) > 255 or len(value) > 0xFFFF or not suffix and not name.startswith(
                    b"system.posix_acl_"):
                raise self._error(member, f"xattr {_show(name[:64])} cannot be set (name "
                                          f"{len(name)}, value {len(value)} bytes)")
            node.xattrs[name] = value
        if fmt != stat.S_IFLNK:
            node.mode = fmt | member.mode
            acl = node.xattrs.get(b"system.posix_acl_access")
            if acl is not None:
                node.xattrs[b"system.posix_acl_access"] = _acl_chmod(acl, member.mode)
        else:
            node.mode = stat.S_IFLNK | 0o777
        mtime_ns = member.mtime * 1_000_000_000 + member.mtime_nsec
        if not 0 <= mtime_ns <= _MAX_TIME_NS:
            mtime_ns = 0  # containerd's boundTime
        node.mtime, node.nsec = divmod(mtime_ns, 1_000_000_000)

    def _acl(self, name: bytes, value: bytes, fmt: int, member: TarMember) -> bytes | None:
        """An ACL xattr as the kernel stores it (fs/posix_acl.c), None when it stores none;
        the errors that make containerd's setxattr fail refuse the layer."""
        if len(value) < 4 or (len(value) - 4) % 8:
            raise self._error(member, f"malformed {_show(name)} xattr (EINVAL)")
        if struct.unpack_from("<I", value)[0] != 2:
            return None  # EOPNOTSUPP: containerd goes on without it
        if name == b"system.posix_acl_default" and fmt != stat.S_IFDIR:
            raise self._error(member, "default ACL on a non-directory (EACCES)")
        tags = [struct.unpack_from("<H", value, at)[0] for at in range(4, len(value), 8)]
        if not tags:
            return None
        counts = {tag: tags.count(tag) for tag in set(tags)}
        if any(counts.get(tag, 0) != 1 for tag in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER)) \
                or (counts.get(_ACL_USER) or counts.get(_ACL_GROUP)) and not counts.get(_ACL_MASK):
            raise self._error(member, f"invalid {_show(name)} xattr (EINVAL)")
        if name == b"system.posix_acl_access" and len(tags) == 3:
            return None  # equivalent to the mode bits: the kernel keeps no xattr
        return value

    @staticmethod
    def _chown(node: Node, member: TarMember) -> None:
        # lchown(2) takes 32-bit ids; -1 (0xffffffff) leaves an id unchanged.
        uid, gid = member.uid & 0xFFFFFFFF, member.gid & 0xFFFFFFFF
        if uid != 0xFFFFFFFF:
            node.uid = uid
        if gid != 0xFFFFFFFF:
            node.gid = gid
