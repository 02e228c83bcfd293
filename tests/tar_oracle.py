"""The containerd-parity oracle: tools/containerd_apply (containerd 1.6's archive.Apply and
Go 1.19's archive/tar, from Debian's packages) built once per source hash, and the rules that
make its unpacked tree comparable with the kernel view of a meta || tar mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hybrid_erofs.erofs.tree import clean

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tools" / "containerd_apply" / "main.go"
GO = "/usr/lib/go-1.19/bin/go"
GOPATH = "/usr/share/gocode"   # golang-github-containerd-containerd-dev and its dependencies
CONTAINERD_SOURCE = Path(GOPATH) / "src/github.com/containerd/containerd/archive/tar.go"
GO_TESTDATA = Path("/usr/share/go-1.19/src/archive/tar/testdata")
CPYTHON_TESTTAR = Path("/usr/lib/python3.11/test/testtar.tar")
PACKAGES = ("golang-1.19-go", "golang-1.19-src", "golang-github-containerd-containerd-dev",
            "libpython3.11-testsuite", "libarchive-tools")

Tree = dict[str, dict[str, Any]]


def missing_prerequisites() -> list[str]:
    """What the oracle needs and this machine lacks (each a Debian package in .ci/run)."""
    missing = []
    for path, package in ((GO, "golang-1.19-go"), (CONTAINERD_SOURCE,
                          "golang-github-containerd-containerd-dev"),
                          (GO_TESTDATA, "golang-1.19-src"),
                          (CPYTHON_TESTTAR, "libpython3.11-testsuite")):
        if not Path(path).exists():
            missing.append(package)
    if shutil.which("bsdtar") is None:
        missing.append("libarchive-tools")
    return missing


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "hybrid-erofs-tests"


def oracle_binary() -> Path:
    """Build tools/containerd_apply in GOPATH mode (Debian's Go packages, no network) unless a
    build of the same source is cached."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = _cache_dir() / f"containerd-apply-{digest}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH,
           "GOCACHE": str(_cache_dir() / "gocache"), "CGO_ENABLED": "0"}
    partial = binary.with_name(binary.name + ".tmp")
    proc = subprocess.run([GO, "build", "-o", str(partial), "."], cwd=SOURCE.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"building the containerd oracle failed: {proc.stderr}")
    partial.rename(binary)
    return binary


def containerd_apply(tar: Path, root: Path, *, overlay: bool = True) -> str | None:
    """Unpack `tar` into the new directory `root` with containerd's archive.Apply; its error
    message when containerd refuses the archive, else None. `root` is made 0755 root:root,
    like a snapshot directory."""
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    with open(tar, "rb") as stdin:
        proc = subprocess.run([str(oracle_binary()), "apply", str(root),
                               "overlay" if overlay else "naive"],
                              stdin=stdin, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    return proc.stderr.strip().splitlines()[-1]


def go_list(tar: Path) -> list[dict[str, Any]]:
    """Every entry as Go's archive/tar reader returns it (hole-aware data map per entry)."""
    with open(tar, "rb") as stdin:
        proc = subprocess.run([str(oracle_binary()), "list"], stdin=stdin,
                              capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{tar}: Go's archive/tar refuses it: {proc.stderr.strip()}")
    return [json.loads(line) for line in proc.stdout.splitlines()]


def explicit_paths(tar: Path) -> set[str]:
    """Paths (as walk_tree names them) of the entries in the archive, as containerd cleans
    them; the rest of the oracle's directories were made by mkparent at unpack time."""
    out = set()
    for entry in go_list(tar):
        name = entry["name"].encode("utf-8", "surrogateescape")
        parts = clean(name)
        if parts:
            out.add(os.fsdecode(b"/".join(parts)))
    return out


def comparable(tree: Tree, explicit: set[str]) -> Tree:
    """What may be compared between the oracle's unpacked tree and our mount's kernel view.

    Left out, each for a reason: the mtime of the root and of directories the archive only
    implies (containerd makes them at unpack time); the mtime of overlay whiteouts (mknod at
    unpack time); `trusted.overlay.origin` on their parents, which our meta adds so that
    overlayfs treats them as merged (mkfs.erofs --aufs does the same).
    """
    out: Tree = {}
    for path, entry in tree.items():
        entry = dict(entry)
        entry["xattrs"] = {k: v for k, v in entry["xattrs"].items()
                           if k != "trusted.overlay.origin"}
        whiteout = entry["type"] == "chr" and entry.get("rdev") == (0, 0) and entry["mode"] == 0
        if (entry["type"] == "dir" and path not in explicit) or whiteout or path == "":
            entry.pop("mtime_ns")
        out[path] = entry
    return out


def differences(got: Tree, want: Tree, *, limit: int = 8) -> str:
    """A readable list of the first differing paths."""
    paths = [p for p in sorted(set(got) | set(want)) if got.get(p) != want.get(p)]
    lines = []
    for path in paths[:limit]:
        mine, theirs = got.get(path), want.get(path)
        if mine is None or theirs is None:
            lines.append(f"{path!r}: ours {mine}\n  containerd {theirs}")
            continue
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        lines.append(f"{path!r}: " + ", ".join(
            f"{k}: ours {mine.get(k)!r} containerd {theirs.get(k)!r}" for k in keys))
    return "\n".join(lines) + (f"\n... {len(paths)} paths differ" if len(paths) > limit else "")



def split_testtar(out: Path) -> tuple[Path, Path]:
    """CPython's testtar.tar cut in two at member boundaries, the bytes of each member kept:
    what containerd applies, and the sparse members. Left out: the contiguous file (type '7')
    and the Solaris 'X' header, whose types make containerd refuse the whole archive."""
    import tarfile

    data = CPYTHON_TESTTAR.read_bytes()
    with tarfile.open(CPYTHON_TESTTAR) as archive:
        members, end = archive.getmembers(), archive.offset
    applied, sparse = bytearray(), bytearray()
    for index, member in enumerate(members):
        stop = members[index + 1].offset if index + 1 < len(members) else end
        piece = data[member.offset:stop]
        if member.issparse() or piece[156:157] == b"S":
            sparse += piece
        elif piece[156:157] not in (b"7", b"X"):
            applied += piece
    paths = out / "testtar-applied.tar", out / "testtar-sparse.tar"
    for path, body in zip(paths, (applied, sparse), strict=True):
        path.write_bytes(bytes(body) + bytes(1024))
    return paths


def data_regions(path: Path, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data the file system reports with SEEK_DATA / SEEK_HOLE."""
    regions = []
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole is left
            end = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append((start, end - start))
            offset = end
    finally:
        os.close(fd)
    return regions


def sparse_mismatch(path: Path, entry: dict[str, Any]) -> str | None:
    """Compare a mounted sparse file with Go's reading of it, hole-aware: the bytes at Go's
    data segments hash to what the archive stores, and every other byte the file system
    reports as data is zero (holes read as zeros by definition). None when equal."""
    size = entry["size"]
    if os.stat(path).st_size != size:
        return f"size {os.stat(path).st_size} != {size}"
    segments, at = [], 0
    for hole in entry["holes"]:
        if hole["offset"] > at:
            segments.append((at, hole["offset"] - at))
        at = hole["offset"] + hole["length"]
    if at < size:
        segments.append((at, size - at))
    stored = hashlib.sha256()
    with open(path, "rb") as f:
        for offset, length in segments:
            f.seek(offset)
            stored.update(f.read(length))
        if stored.hexdigest() != entry["stored_sha256"]:
            return "the data segments differ from the stored data"
        for offset, length in data_regions(path, size):
            f.seek(offset)
            body = bytearray(f.read(length))
            for start, span in segments:
                lo, hi = max(start, offset), min(start + span, offset + length)
                if lo < hi:
                    body[lo - offset:hi - offset] = bytes(hi - lo)
            if body.count(0) != len(body):
                return f"non-zero bytes outside the data segments in [{offset}, +{length})"
    return None
