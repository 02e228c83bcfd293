"""Shared test helpers: kernel-mount an EROFS image, walk a mounted tree, build meta || tar.

Used by the EROFS writer and reader integration tests; needs root for `kernel_mount`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MS_RDONLY = 1

_libc: ctypes.CDLL | None = None


class MountError(RuntimeError):
    """The kernel refused to mount (or unmount) an image."""


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_void_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


def _dmesg_tail() -> str:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [line for line in out.splitlines() if "erofs" in line.lower()]
    return " | ".join(lines[-3:])


def _umount(mountpoint: Path) -> None:
    """Unmount, retrying briefly on EBUSY; lazy-detach as a last resort."""
    libc = _get_libc()
    for _ in range(50):
        if libc.umount2(os.fsencode(mountpoint), 0) == 0:
            return
        err = ctypes.get_errno()
        if err == 22:  # EINVAL: not mounted (any more)
            return
        time.sleep(0.1)
    if libc.umount2(os.fsencode(mountpoint), 2) != 0:  # MNT_DETACH
        err = ctypes.get_errno()
        raise MountError(f"{mountpoint}: umount failed: {os.strerror(err)}")


@contextmanager
def kernel_mount(image: Path, mountpoint: Path, *, via: str = "file") -> Iterator[Path]:
    """Mount `image` read-only as EROFS on `mountpoint`; always unmount on exit.

    via="file": file-backed mount(2) (no loop device; needs EROFS_FS_BACKED_BY_FILE).
    via="loop": `mount -t erofs -o ro,loop` (mount(8) sets autoclear on the loop device).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    if via == "file":
        libc = _get_libc()
        rc = libc.mount(os.fsencode(image), os.fsencode(mountpoint), b"erofs", MS_RDONLY, None)
        if rc != 0:
            err = ctypes.get_errno()
            raise MountError(
                f"{image}: file-backed erofs mount on {mountpoint} failed: "
                f"{os.strerror(err)} (errno {err}) {_dmesg_tail()}"
            )
    elif via == "loop":
        proc = subprocess.run(
            ["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(mountpoint)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise MountError(
                f"{image}: loop erofs mount on {mountpoint} failed (rc {proc.returncode}): "
                f"{proc.stderr.strip()} {_dmesg_tail()}"
            )
    else:
        raise ValueError(f"'via' must be 'file' or 'loop' (got {via!r})")
    try:
        yield mountpoint
    finally:
        _umount(mountpoint)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "sock"),
    ):
        if test(mode):
            return name
    return "unknown"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[str, bytes] = {}
    for name in sorted(names):
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            out[name] = f"<error {exc.errno}>".encode()
    return out


def walk_tree(root: Path, *, contents: bool = True) -> dict[str, dict[str, Any]]:
    """Map every path under `root` ('' = root itself) to its attributes.

    Keys per entry: type, mode (permission bits incl. suid/sgid/sticky), uid, gid,
    size (not for dirs), mtime_ns, nlink, rdev (major, minor) for devices, target for
    symlinks, xattrs, sha256 for regular files (if `contents`), and `link_group`:
    the first path (sorted order) sharing the entry's inode, for non-directories.
    Two trees compare equal with `==` regardless of inode numbers.
    """
    rels: list[str] = [""]
    for dirpath, dirnames, filenames in os.walk(root):
        base = os.path.relpath(dirpath, root)
        base = "" if base == "." else base
        for name in dirnames + filenames:
            rels.append(os.path.join(base, name) if base else name)
    rels.sort()
    first_by_ino: dict[int, str] = {}
    tree: dict[str, dict[str, Any]] = {}
    for rel in rels:
        path = root / rel if rel else root
        st = os.lstat(path)
        kind = _file_type(st.st_mode)
        entry: dict[str, Any] = {
            "type": kind,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "nlink": st.st_nlink,
            "xattrs": _xattrs(path),
        }
        if kind != "dir":
            entry["size"] = st.st_size
            entry["link_group"] = first_by_ino.setdefault(st.st_ino, rel)
        if kind in ("chr", "blk"):
            entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind == "symlink":
            entry["target"] = os.readlink(path)
        if kind == "file" and contents:
            entry["sha256"] = sha256_of(path)
        tree[rel] = entry
    return tree


def concat(meta: Path, tar: Path, out: Path) -> Path:
    """Write `meta || tar` to `out` (the device the kernel mounts); returns `out`."""
    with open(out, "wb") as dst:
        for part in (meta, tar):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
        # Loop devices truncate to whole 512-byte sectors (erofs-tarindex.md §7.13).
        pad = -dst.tell() % 512
        if pad:
            dst.write(b"\0" * pad)
    return out


def losetup_entries() -> list[str]:
    """Lines of `losetup -a` whose backing file lies under this run's temporary directory
    (another test run on the machine, with its own $TMPDIR, may attach loop devices too)."""
    proc = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    ours = tempfile.gettempdir()
    return [line for line in proc.stdout.splitlines() if line.strip() and ours in line]


def daemons_for(runtime: Path) -> list[int]:
    """Live processes running a mount daemon (`--_daemon-ready-fd`) whose environment names
    the test's runtime directory (zombies are not counted)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"--_daemon-ready-fd" in cmdline and str(runtime).encode() in environ and state != "Z":
            found.append(int(proc.name))
    return found


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `Error: ...` line of a failed CLI run (exit 1, no traceback)."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
