"""Kernel calls behind `hybrid-erofs mount`: mount(2)/umount2(2) through ctypes (EROFS, and
read-only overlayfs over several EROFS layers), read-only loop devices (LOOP_CONFIGURE), the mount
table and the processes that use a mount.

Root only; nothing here knows about byte sources or state records.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MountBusy, MountError

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
# mount(2) copies at most one page of option data (fs/namespace.c copy_mount_options).
MOUNT_DATA_MAX = 4096 - 1
# Documentation/filesystems/overlayfs.rst: "the maximum number of lower layers is 500".
OVERLAY_MAX_LAYERS = 500
# A read-only stack of untrusted image layers, no upperdir:
#   index=off: the inode index needs an upperdir; say so rather than rely on the build default.
#   redirect_dir=nofollow, metacopy=off: a layer carrying trusted.overlay.redirect/metacopy
#     xattrs (a crafted tar can) must not make a file show another path's data or metadata
#     (overlayfs.rst: do not use metacopy=on with untrusted layers).
#   xino=auto: the layers are separate EROFS filesystems; xino gives every file the overlay's
#     st_dev and a unique st_ino (layer number in the high bits), so hard links and tools that
#     compare (st_dev, st_ino) (tar, du, rsync -H) behave; it falls back per inode on overflow.
OVERLAY_OPTIONS = ("index=off", "redirect_dir=nofollow", "metacopy=off", "xino=auto")
# linux/loop.h
_LOOP_CLR_FD = 0x4C01
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
# struct loop_info64: 5 x u64, 4 x u32 (lo_flags is the 4th), file name[64], crypt name[64],
# key[32], 2 x u64 init = 232 bytes; struct loop_config = fd, block_size, info, 8 x u64.
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_LOOP_CONFIG_RESERVED = 64

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_void_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


class KernelMountError(MountError):
    """mount(2) or umount2(2) refused; `.errno` carries the kernel's answer."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def mount_erofs(device: str | os.PathLike[str], mountpoint: str | os.PathLike[str], *,
                restricted: bool = False,
                extra_device: str | os.PathLike[str] | None = None) -> None:
    """mount(2) `device` (a regular file or a block device) read-only as EROFS; `restricted`
    adds nosuid,nodev (an index that is not bound to its image, docs/security.md).
    `extra_device`: the file behind the meta's device slot 1 (`-o device=`), the layer data
    of a tar-index meta.

    A regular file takes the kernel's file-backed EROFS path (6.12+, EROFS_FS_BACKED_BY_FILE);
    a kernel without it answers ENOTBLK (or EINVAL), which the caller turns into a loop device.
    """
    data = None
    if extra_device is not None:
        path = os.fspath(extra_device)
        if "," in path:  # mount options are comma-separated; no escape exists
            raise KernelMountError(errno.EINVAL, f"{path}: a device path with a comma")
        data = f"device={path}"
    _mount(os.fspath(device), mountpoint, "erofs", data, restricted=restricted)


def set_restricted(mountpoint: str | os.PathLike[str], restricted: bool) -> None:
    """Add or lift nosuid,nodev on an existing read-only mount, e.g. once its index was
    verified against the layer; a noexec it has (a mount(8) helper option) is kept."""
    entry = mounted_at(mountpoint)
    keep = ["noexec"] if entry is not None and "noexec" in entry.options else []
    restrict_mount(mountpoint, [*keep, *(["nosuid", "nodev"] if restricted else [])])


def drop_page_cache() -> bool:
    """Drop the kernel's clean page cache (all of it: an EROFS mount's cached file pages
    cannot be dropped alone), so that pages read before a mount's gate closed are read
    again, and fail. True when the kernel took it."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1\n")
    except OSError:
        return False
    return True


# mount(2) per-mount flags (linux/mount.h) that a mount(8) helper's -o may ask for.
MOUNT_FLAGS = {"nosuid": 0x2, "nodev": 0x4, "noexec": 0x8}
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000


def restrict_mount(mountpoint: str | os.PathLike[str], flags: Sequence[str]) -> None:
    """Add per-mount flags (nosuid, nodev, noexec) to the mount on `mountpoint`: a bind
    remount changes only this mount's flags, never the filesystem (mount(2), MS_REMOUNT)."""
    bits = MS_RDONLY | _MS_REMOUNT | _MS_BIND
    for flag in flags:
        bits |= MOUNT_FLAGS[flag]
    libc = _get_libc()
    if libc.mount(None, os.fsencode(mountpoint), None, bits, None) != 0:
        err = ctypes.get_errno()
        raise KernelMountError(err, f"{mountpoint}: mount -o remount,bind,{','.join(flags)}: "
                                    f"{os.strerror(err)}")


def _mount(source: str, mountpoint: str | os.PathLike[str], fstype: str,
           data: str | None, *, restricted: bool = False) -> None:
    """mount(2) read-only (and nosuid,nodev when `restricted`); KernelMountError with the
    kernel's errno otherwise."""
    libc = _get_libc()
    raw = data.encode() if data is not None else None
    flags = MS_RDONLY | (MS_NOSUID | MS_NODEV if restricted else 0)
    if libc.mount(os.fsencode(source), os.fsencode(mountpoint), fstype.encode(), flags,
                  raw) == 0:
        return
    err = ctypes.get_errno()
    raise KernelMountError(err, f"{mountpoint}: mount -t {fstype} {source}: {os.strerror(err)}"
                                f"{_dmesg_hint(err, fstype)}")


def _dmesg_hint(err: int, fstype: str = "erofs") -> str:
    if err != errno.EINVAL:
        return ""
    return f" (the kernel log says why: dmesg | grep -i {fstype.replace('overlay', 'overlayfs')})"


def _escape_lowerdir(path: str) -> str:
    """overlayfs splits lowerdir at ':' and the options at ',': backslash-escape both."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_data(lowerdirs: Sequence[str], *, options: Sequence[str] = OVERLAY_OPTIONS) -> str:
    """The option string of a read-only overlay of `lowerdirs` (TOP first, as overlayfs wants).

    Raises MountError when overlayfs cannot take that many layers or mount(2) that much data.
    """
    if len(lowerdirs) < 2:
        raise ValueError(f"overlayfs needs at least 2 lower directories without an upperdir "
                         f"(got {len(lowerdirs)})")
    if len(lowerdirs) > OVERLAY_MAX_LAYERS:
        raise MountError(f"{len(lowerdirs)} layers: overlayfs stacks at most "
                         f"{OVERLAY_MAX_LAYERS}")
    data = ",".join(["ro", "lowerdir=" + ":".join(map(_escape_lowerdir, lowerdirs)), *options])
    if len(data.encode()) > MOUNT_DATA_MAX:
        raise MountError(f"{len(lowerdirs)} layers: the overlayfs options take "
                         f"{len(data.encode())} bytes, more than mount(2) accepts "
                         f"({MOUNT_DATA_MAX})")
    return data


def mount_overlay(lowerdirs: Sequence[str], mountpoint: str | os.PathLike[str], *,
                  cwd: str | os.PathLike[str] | None = None,
                  options: Sequence[str] = OVERLAY_OPTIONS, restricted: bool = False) -> None:
    """mount(2) a read-only overlayfs of `lowerdirs` (TOP first) on `mountpoint`, no upperdir.

    Relative `lowerdirs` are resolved by the kernel against the working directory: with `cwd`
    this process changes into it for the call (and back), which keeps the option data short.
    """
    data = overlay_data(lowerdirs, options=options)
    if cwd is None:
        _mount("hybrid-erofs", mountpoint, "overlay", data, restricted=restricted)
        return
    target = os.path.abspath(mountpoint)
    try:
        previous: int | None = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        previous = None  # the current directory is gone: come back to "/"
    try:
        os.chdir(cwd)
        _mount("hybrid-erofs", target, "overlay", data, restricted=restricted)
    finally:
        if previous is None:
            os.chdir("/")
        else:
            os.fchdir(previous)
            os.close(previous)


def umount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> bool:
    """umount2(2); True when something was unmounted, False when nothing was mounted there.

    Raises MountBusy on EBUSY (only without `lazy`); other failures raise MountError.
    """
    libc = _get_libc()
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
        return False
    if err == errno.EBUSY:
        raise MountBusy(f"{mountpoint}: busy")
    raise KernelMountError(err, f"{mountpoint}: umount: {os.strerror(err)}")


# -- mount table --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str
    options: tuple[str, ...] = ()  # the per-mount options (ro, nosuid, nodev, ...)


def _unescape(field: str) -> str:
    """Undo the octal escapes of /proc/self/mountinfo (space, tab, newline, backslash)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_table() -> list[MountEntry]:
    entries: list[MountEntry] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            dash = fields.index("-")
            entries.append(MountEntry(_unescape(fields[4]), fields[dash + 1],
                                      _unescape(fields[dash + 2]),
                                      tuple(fields[5].split(","))))
    return entries


def mounts_under(directory: str | os.PathLike[str]) -> list[MountEntry]:
    """Mounts strictly below `directory`, in mount order (unmount them in reverse)."""
    prefix = os.fspath(directory).rstrip("/") + "/"
    return [entry for entry in mount_table() if entry.mountpoint.startswith(prefix)]


def mounted_at(path: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount on `path`, or None."""
    target = os.fspath(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == target:
            found = entry
    return found


# -- loop devices -------------------------------------------------------------------------------

def attach_loop(path: str | os.PathLike[str]) -> tuple[str, int]:
    """A read-only, autoclear loop device over `path` with 512-byte sectors: (/dev/loopN, fd).

    Autoclear frees the device when its last opener goes away, so a crash cannot leak it. The
    returned fd keeps it alive: mount the device, then close the fd (closing it first would
    clear the device at once).
    """
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        os.close(backing)
        raise MountError(f"/dev/loop-control: {exc.strerror} (modprobe loop)") from exc
    try:
        for _ in range(20):  # another process may grab the free device between the two calls
            number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
            name = f"/dev/loop{number}"
            loop = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0,
                                         _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR,
                                         os.fsencode(path)[:63], b"", b"", 0, 0)
                config = struct.pack("=II", backing, 512) + info + bytes(_LOOP_CONFIG_RESERVED)
                fcntl.ioctl(loop, _LOOP_CONFIGURE, config)
                return name, loop
            except OSError as exc:
                os.close(loop)
                if exc.errno == errno.EBUSY:
                    continue
                raise MountError(f"{name}: cannot attach {path}: {exc.strerror}") from exc
        raise MountError(f"{path}: no free loop device")
    finally:
        os.close(control)
        os.close(backing)


def loop_backing_file(device: str) -> str | None:
    """The file behind /dev/loopN, or None when the device is free."""
    knob = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return knob.read_text().strip()
    except OSError:
        return None


def detach_loop(device: str, *, backing: str | None = None, timeout_s: float = 2.0) -> None:
    """Free a loop device (if still attached to `backing`, when given); autoclear usually did.

    Autoclear runs asynchronously after the last close: wait a little before clearing by hand.
    """
    deadline = time.monotonic() + timeout_s
    while (current := loop_backing_file(device)) is not None:
        if backing is not None and current != backing:
            return  # reused by someone else already: not ours
        if time.monotonic() > deadline:
            try:
                fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return
            try:
                fcntl.ioctl(fd, _LOOP_CLR_FD)
            except OSError as exc:
                raise MountError(f"{device}: cannot detach: {exc.strerror}") from exc
            finally:
                os.close(fd)
            return
        time.sleep(0.05)


def loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is `path`."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for knob in Path("/sys/block").glob("loop*/loop/backing_file"):
            if knob.read_text().strip() == path:
                found.append("/dev/" + knob.parent.parent.name)
    return found


# -- processes ----------------------------------------------------------------------------------

def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    """True when `pid` runs and is the same process (same start time) and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return False
    return start_time is None or int(fields[19]) == start_time


def users_of(mountpoint: str) -> dict[int, str]:
    """pid -> command name of every process with a cwd, root, open file or mapping under
    `mountpoint` (why an umount is EBUSY)."""
    prefix = mountpoint.rstrip("/") + "/"

    def inside(target: str) -> bool:
        return target == mountpoint or target.startswith(prefix)

    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        pid = int(proc.name)
        hit = False
        with contextlib.suppress(OSError):
            for link in ("cwd", "root"):
                with contextlib.suppress(OSError):
                    if inside(os.readlink(proc / link)):
                        hit = True
            if not hit:
                for fd in (proc / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if inside(os.readlink(fd)):
                            hit = True
                            break
            if not hit:
                with open(proc / "maps") as maps:
                    hit = any(inside(line.split(maxsplit=5)[-1].strip())
                              for line in maps if "/" in line)
        if hit:
            try:
                found[pid] = (proc / "comm").read_text().strip()
            except OSError:
                found[pid] = "?"
    return found


__all__ = [
    "MOUNT_DATA_MAX",
    "MOUNT_FLAGS",
    "OVERLAY_MAX_LAYERS",
    "OVERLAY_OPTIONS",
    "KernelMountError",
    "MountEntry",
    "attach_loop",
    "detach_loop",
    "drop_page_cache",
    "loop_backing_file",
    "loops_backed_by",
    "mount_erofs",
    "mount_overlay",
    "mount_table",
    "mounted_at",
    "mounts_under",
    "overlay_data",
    "process_alive",
    "process_start_time",
    "restrict_mount",
    "set_restricted",
    "umount",
    "users_of",
]
