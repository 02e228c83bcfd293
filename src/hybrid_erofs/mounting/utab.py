"""util-linux's record of a mount made through the mount(8) helper: a `helper=hybrid-erofs` entry
in /run/mount/utab makes a plain `umount MOUNTPOINT` run umount.hybrid-erofs, which stops the
daemon. Entries are written and removed with mount(8)/umount(8) `--fake` (libmount owns the file
format and its lock); removing is a no-op for mounts that have no entry.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from .kernel import mounted_at

log = logging.getLogger(__name__)

HELPER = "hybrid-erofs"  # mount.hybrid-erofs / umount.hybrid-erofs
UTAB = Path("/run/mount/utab")


def _mangle(path: str) -> str:
    """libmount's escaping of fields in its tables (space, tab, newline, backslash)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def has_helper_entry(mountpoint: str | os.PathLike[str], *, utab: Path = UTAB) -> bool:
    """Whether utab names our umount helper for `mountpoint`."""
    target = f"TARGET={_mangle(os.fspath(mountpoint))}"
    try:
        lines = utab.read_text().splitlines()
    except OSError:
        return False
    return any(target in line.split() and f"helper={HELPER}" in line for line in lines)


def record_helper(mountpoint: str | os.PathLike[str]) -> None:
    """Add the utab entry for a mount just made on `mountpoint` (`mount --fake -i`: no
    mount(2), no helper). libmount pairs utab entries with the kernel's by source and target, so the
    entry names the kernel's source (the FUSE file, loop or NBD device, "overlay"); the type
    is ours, which libblkid does not know, so that no loop device is set up for a file."""
    entry = mounted_at(mountpoint)
    if entry is None:
        return
    _run(["mount", "--fake", "--internal-only", "--no-canonicalize", "-t", HELPER,
          "-o", f"helper={HELPER}", entry.source, os.fspath(mountpoint)])


def forget_helper(mountpoint: str | os.PathLike[str]) -> None:
    """Remove our utab entry of `mountpoint` while it is still mounted (`umount --fake -i`:
    no umount(2), no helper); nothing when there is none."""
    if has_helper_entry(mountpoint):
        _run(["umount", "--fake", "--internal-only", "--no-canonicalize",
              os.fspath(mountpoint)])


def _run(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        log.warning("%s: not installed; /run/mount/utab not updated", argv[0])
        return
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:  # the mount works anyway; `umount` then needs a few seconds
        log.warning("%s: %s", " ".join(argv[:3]), result.stderr.strip() or result.returncode)


__all__ = ["HELPER", "UTAB", "forget_helper", "has_helper_entry", "record_helper"]
