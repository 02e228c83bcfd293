"""`mount_image` / `hybrid-erofs mount-image` as root: four small gzip layers full of OCI
whiteouts, each indexed with overlay whiteouts, mounted lazily and stacked with overlayfs; the
merged view must equal what OCI layer semantics give (a reference applier below). Also umount,
busy and lazy umount, daemon death, failures and the index-directory CLI; nothing may be left
behind (mounts, loop devices, daemons, state files).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.errors import MountError
from hybrid_erofs.indexing.imageindex import (
    INDEXED,
    SKIPPED_FORMAT,
    SKIPPED_SMALL,
    FileRef,
    ImageEntry,
    ImageIndex,
    LayerEntry,
    file_digest,
    layer_file_names,
    write_image_index,
)
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.mounting.image import ImageLayer, mount_image
from hybrid_erofs.mounting.lifecycle import mount_statuses, unmount
from hybrid_erofs.mounting.state import RUNTIME_ENV
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for, losetup_entries, one_error_line

pytestmark = [pytest.mark.integration, pytest.mark.root]

CLI = [sys.executable, "-m", "hybrid_erofs"]
Tree = dict[str, dict[str, Any]]
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


# -- layers ---------------------------------------------------------------------------------------

@dataclass
class Member:
    """One tar member: kind is dir, file, symlink or hardlink (`link` = target)."""

    name: str
    kind: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""


def d(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Member:
    return Member(name, "dir", mode=mode, uid=uid, gid=gid)


def f(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Member:
    return Member(name, "file", data, mode=mode, uid=uid, gid=gid)


def sym(name: str, target: str) -> Member:
    return Member(name, "symlink", mode=0o777, link=target)


def hard(name: str, target: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Member:
    # As tar writers store it: the shared inode's attributes in the link's header too.
    return Member(name, "hardlink", mode=mode, uid=uid, gid=gid, link=target)


def wh(path: str) -> Member:
    """The OCI whiteout of `path` (`dir/.wh.name`)."""
    parent, base = posixpath.split(path)
    return f(posixpath.join(parent, ".wh." + base), b"")


def opq(directory: str) -> Member:
    return f(posixpath.join(directory, ".wh..wh..opq"), b"")


def _blob(seed: str, size: int) -> bytes:
    """Incompressible-ish bytes, so a file spans several gzip checkpoints."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


BIG = _blob("big", 300_000)

LAYERS: list[list[Member]] = [
    [  # 0: the base
        d("etc"), f("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"), f("etc/hosts", b"127.0.0.1\n"),
        f("etc/keep", b"deleted by layer 1\n", mode=0o600),
        d("usr"), d("usr/bin"), f("usr/bin/tool", BIG, mode=0o755),
        hard("usr/bin/tool-link", "usr/bin/tool", 0o755), sym("usr/bin/sh", "tool"),
        f("usr/bin/su", b"#!/bin/true\n", mode=0o4755), d("usr/lib"),
        f("usr/lib/libc.so", b"\x7fELF" + bytes(5000)), sym("lib", "usr/lib"),
        d("gone"), f("gone/a", b"a"), d("gone/sub"), f("gone/sub/b", b"b"),
        d("dir-to-file"), f("dir-to-file/x", b"x"),
        f("file-to-dir", b"a file first\n"),
        d("opaque"), f("opaque/old", b"old\n"), d("opaque/olddir"), f("opaque/olddir/x", b"x"),
        d("home"), d("home/user", mode=0o700, uid=1000, gid=1000),
        f("home/user/.profile", b"PATH=/bin\n", mode=0o600, uid=1000, gid=1000),
        d("tmp", mode=0o1777),
    ],
    [  # 1: deletes, replaces, makes opaque
        wh("gone"), d("etc"), wh("etc/keep"), f("etc/hosts", b"127.0.0.1 localhost\n::1\n"),
        f("dir-to-file", b"now a file\n", mode=0o640, uid=7, gid=8),
        d("file-to-dir", mode=0o750, uid=5, gid=6), f("file-to-dir/inner", b"inner\n"),
        d("opaque"), opq("opaque"), f("opaque/new", b"new\n"),
        d("usr"), d("usr/bin"), f("usr/bin/tool2", b"tool two\n" * 100, mode=0o750, uid=2, gid=3),
        hard("usr/bin/tool2-hard", "usr/bin/tool2", 0o750, 2, 3),
        sym("usr/bin/sh", "/usr/bin/tool2"),
    ],
    [  # 2: re-creates a deleted directory, changes attributes, deletes a symlink
        d("gone"), f("gone/new", b"back again\n"),
        d("etc", mode=0o751, uid=0, gid=4), f("etc/passwd", b"root:x:0:0::/root:/bin/bash\n"),
        d("home"), d("home/user", mode=0o700, uid=1000, gid=1000), wh("home/user/.profile"),
        f("home/user/.bashrc", b"set -o vi\n", mode=0o644, uid=1000, gid=1000),
        d("usr"), d("usr/bin"), wh("usr/bin/sh"),
    ],
    [  # 3: the top: a file that had a hard link changes; an opaque dir gets more content
        d("usr"), d("usr/bin"), f("usr/bin/tool", b"tool, rebuilt\n", mode=0o755),
        d("opaque"), f("opaque/top", b"top\n"), f("top-file", b"on top\n", uid=65534, gid=65534),
        sym("dangling", "/does/not/exist"),
    ],
]


def write_layer(members: list[Member], path: Path) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name + ("/" if member.kind == "dir" else ""))
            info.mode, info.uid, info.gid, info.mtime = member.mode, member.uid, member.gid, 1700000000
            info.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE,
                         "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[member.kind]
            info.linkname = member.link
            if member.kind == "file":
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                tar.addfile(info)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return path


# -- the reference: OCI image-spec layer.md applied to a dict ---------------------------------------

def _drop(tree: Tree, path: str, *, keep_self: bool = False) -> None:
    for key in [k for k in tree if k.startswith(path + "/") or (k == path and not keep_self)]:
        del tree[key]


def apply_layers(layers: list[list[Member]]) -> Tree:
    """Changesets in order: whiteouts delete from the layers below only, then entries apply
    (a non-directory replaces whatever was there, a directory over a directory changes only
    its attributes, a hard link shares its target's file and, as containerd applies it, sets
    that file's attributes from its own header)."""
    tree: Tree = {}
    for layer_number, members in enumerate(layers):
        entries: list[Member] = []
        for member in members:
            parent, base = posixpath.split(member.name)
            if base == ".wh..wh..opq":
                _drop(tree, parent, keep_self=True)
            elif base.startswith(".wh."):
                _drop(tree, posixpath.join(parent, base[len(".wh."):]))
            else:
                entries.append(member)
        for member in entries:
            name = member.name
            attrs = {"mode": member.mode, "uid": member.uid, "gid": member.gid}
            if member.kind == "dir":
                if tree.get(name, {}).get("type") != "dir":
                    _drop(tree, name)
                tree[name] = {"type": "dir", **attrs}
                continue
            _drop(tree, name)
            if member.kind == "hardlink":
                tree[member.link].update(attrs)
                tree[name] = dict(tree[member.link])
                tree[name]["link"] = (layer_number, member.link)
                tree[member.link]["link"] = (layer_number, member.link)
            elif member.kind == "symlink":
                tree[name] = {"type": "symlink", **attrs, "size": len(member.link),
                              "target": member.link}
            else:
                tree[name] = {"type": "file", **attrs, "size": len(member.data),
                              "sha256": hashlib.sha256(member.data).hexdigest()}
    return tree


def expected_view(layers: list[list[Member]]) -> Tree:
    return {name: {k: v for k, v in entry.items() if k != "link"}
            for name, entry in apply_layers(layers).items()}


def merged_view(root: Path) -> Tree:
    """What the kernel shows: the attributes apply_layers computes, for every path."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                    else "symlink" if stat.S_ISLNK(st.st_mode) else f"other {st.st_mode:o}")
            entry: dict[str, Any] = {"type": kind, "mode": stat.S_IMODE(st.st_mode),
                                     "uid": st.st_uid, "gid": st.st_gid}
            if kind == "file":
                entry["size"] = st.st_size
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif kind == "symlink":
                entry["size"] = st.st_size
                entry["target"] = os.readlink(path)
            # overlayfs hides its own trusted.overlay.* xattrs (whiteout and opaque markers).
            assert os.listxattr(path, follow_symlinks=False) == [], path
            tree[str(path.relative_to(root))] = entry
    return tree


def test_reference_applier_knows_the_rules() -> None:
    tree = expected_view(LAYERS)
    assert "gone/a" not in tree and tree["gone/new"]["size"] == 11 and "gone/sub" not in tree
    assert "etc/keep" not in tree and tree["etc"]["mode"] == 0o751
    assert tree["dir-to-file"]["type"] == "file" and "dir-to-file/x" not in tree
    assert tree["file-to-dir"]["type"] == "dir" and "file-to-dir/inner" in tree
    assert sorted(k for k in tree if k.startswith("opaque/")) == ["opaque/new", "opaque/top"]
    assert "usr/bin/sh" not in tree and "home/user/.profile" not in tree
    assert tree["usr/bin/tool-link"]["sha256"] == hashlib.sha256(BIG).hexdigest()


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_fuse_and_erofs()


@dataclass
class Indexed:
    gz: Path
    meta: Path
    zinfo: Path
    digest: str = ""
    size: int = 0
    diff_id: str = ""
    layer_size: int = 0
    extra: dict[str, Path] = field(default_factory=dict)

    def image_layer(self) -> ImageLayer:
        return ImageLayer(source=str(self.gz), meta=self.meta, zinfo=self.zinfo)


def _index(gz: Path, outdir: Path) -> Indexed:
    digest, size = file_digest(gz)
    names = layer_file_names(digest)
    zinfo, meta = outdir / names["zinfo"], outdir / names["meta"]
    index_layer(str(gz), zinfo=zinfo, meta=meta, aufs=True, span=64 << 10)
    raw = gzip.decompress(gz.read_bytes())
    return Indexed(gz, meta, zinfo, digest, size,
                   "sha256:" + hashlib.sha256(raw).hexdigest(), len(raw))


@pytest.fixture(scope="module")
def indexed(prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> list[Indexed]:
    """The four layers, each with its zinfo + sidecar + meta (overlay whiteouts) in one dir
    named as `index --all-layers` names them."""
    work = tmp_path_factory.mktemp("image-layers")
    out = work / "index"
    out.mkdir()
    return [_index(write_layer(members, work / f"layer{n}.tar.gz"), out)
            for n, members in enumerate(LAYERS)]


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run"
    monkeypatch.setenv(RUNTIME_ENV, str(path))  # this process and the daemons it starts
    return path


def _mounts_under(*paths: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line for line in mountinfo if any(f" {p}" in line for p in paths)]




def _state_files(runtime: Path) -> list[str]:
    return sorted(str(p) for p in runtime.rglob("*")) if runtime.exists() else []


def _leftovers(tmp_path: Path, runtime: Path, loops: list[str]) -> tuple[list[Any], ...]:
    state = [p for p in _state_files(runtime)  # empty directories may stay
             if not Path(p).is_dir() or any(Path(p).iterdir())]
    return (_mounts_under(tmp_path), daemons_for(runtime), state,
            [line for line in losetup_entries() if line not in loops])


@pytest.fixture(autouse=True)
def leaves_nothing_behind(prerequisites: None, tmp_path: Path, runtime: Path) -> Iterator[None]:
    loops = losetup_entries()
    try:
        yield
    finally:
        leftovers = _leftovers(tmp_path, runtime, loops)
        if any(leftovers):  # clean up for the next test, then fail this one
            for pid in daemons_for(runtime):
                os.kill(pid, signal.SIGKILL)
            subprocess.run([*CLI, "status", "--prune"], capture_output=True)
            for line in reversed(_mounts_under(tmp_path)):
                subprocess.run(["umount", "-l", line.split()[4]], capture_output=True)
        assert leftovers == ([], [], [], [])


def _run(args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)




def _status() -> list[dict[str, Any]]:
    proc = _run(["status", "--json"])
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def _mount(indexed: list[Indexed], mnt: Path, **options: Any) -> None:
    mnt.mkdir(exist_ok=True)
    record = mount_image("test-image", mnt, [layer.image_layer() for layer in indexed],
                         **options)
    assert record is not None and record.is_image and len(record.layers) == len(indexed)


# -- the merged view ------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["auto", "loop"])
def test_merged_view_follows_oci_layer_semantics(indexed: list[Indexed], tmp_path: Path,
                                                 runtime: Path, via: str) -> None:
    mnt = tmp_path / "mnt"
    started = time.monotonic()
    _mount(indexed, mnt, via=via)
    took = time.monotonic() - started
    try:
        [entry] = _status()
        assert (entry["kind"], entry["layers"], entry["state"]) == ("image", 4, "mounted")
        assert entry["via"] == ("loop" if via == "loop" else "fuse")
        [overlay] = [line for line in _mounts_under(mnt) if " overlay " in line]
        assert " ro," in overlay and "lowerdir=l/3:l/2:l/1:l/0" in overlay
        assert "redirect_dir=nofollow" in overlay
        layer_mounts = [line for line in _mounts_under(runtime) if " erofs " in line]
        assert len(layer_mounts) == 4
        assert merged_view(mnt) == expected_view(LAYERS)
        # A hard link within a layer stays one file (xino: one st_dev, unique st_ino) ...
        link = os.lstat(mnt / "usr/bin/tool2-hard")
        target = os.lstat(mnt / "usr/bin/tool2")
        assert (link.st_dev, link.st_ino) == (target.st_dev, target.st_ino)
        # ... and files of different layers never look like one.
        inodes = {(st.st_dev, st.st_ino) for st in
                  (os.lstat(mnt / p) for p in ("usr/bin/tool", "usr/bin/tool-link", "top-file",
                                               "etc/hosts", "etc/passwd"))}
        assert len(inodes) == 5
        # Another user reads what the modes allow (overlayfs reads lower layers as its mounter).
        # cwd: the child enters the mount before it drops root (pytest's tmp dirs are 0700).
        reader = subprocess.run(["cat", "usr/lib/libc.so"], cwd=mnt, user=65534,
                                capture_output=True)
        assert reader.returncode == 0 and len(reader.stdout) == 5004, reader.stderr
        denied = subprocess.run(["cat", "home/user/.bashrc"], cwd=mnt, user=65534,
                                capture_output=True)
        assert b"Permission denied" in denied.stderr  # home/user is 0700 for uid 1000
        time.sleep(2.5)  # one stats period
        stats = _status()[0]["stats"]
        assert stats["reads"] > 0 and stats["errors"] == 0 and len(stats["layers"]) == 4
    finally:
        report = unmount(mnt)
    assert report == f"unmounted {mnt}"
    assert took < 15


def test_one_layer_image(indexed: list[Indexed], tmp_path: Path, runtime: Path) -> None:
    mnt = tmp_path / "mnt"
    _mount(indexed[:1], mnt)
    try:
        assert merged_view(mnt) == expected_view(LAYERS[:1])
        [overlay] = [line for line in _mounts_under(mnt) if " overlay " in line]
        assert "lowerdir=l/0:l/empty" in overlay
        status = _run(["status"])
        assert "image of 1 layers" in status.stdout
    finally:
        assert _run(["umount", str(mnt)]).returncode == 0


def test_two_layers_over_the_cli_foreground_and_sigterm(indexed: list[Indexed],
                                                        tmp_path: Path) -> None:
    """`mount-image --foreground` (systemd) serves until SIGTERM, then tears everything down."""
    index_dir = _index_dir(indexed[:2], tmp_path / "idx")
    layout = _oci_layout(indexed[:2], tmp_path / "layout")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*CLI, "mount-image", "--foreground", "--index-dir", str(index_dir),
                             f"oci:{layout}:v1", str(mnt)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _status() or _status()[0]["state"] != "mounted":
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        assert merged_view(mnt) == expected_view(LAYERS[:2])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _status() == []


# -- umount, busy, lazy, daemon death -------------------------------------------------------------

def test_busy_umount_is_refused_then_lazy_detaches(indexed: list[Indexed],
                                                   tmp_path: Path, runtime: Path) -> None:
    mnt = tmp_path / "mnt"
    _mount(indexed, mnt)
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt / "usr/bin")
    try:
        line = one_error_line(_run(["umount", str(mnt)]))
        assert f"{holder.pid} (sleep)" in line and "--lazy" in line
        assert len(_mounts_under(mnt, runtime)) == 1 + 4 + 4  # overlay, EROFS, FUSE: untouched
        assert _status()[0]["state"] == "mounted"
        lazy = _run(["umount", "--lazy", str(mnt)])
        assert lazy.returncode == 0, lazy.stderr
        assert not _mounts_under(mnt)
        pid = int(_status()[0]["daemon_pid"])
        assert Path(f"/proc/{pid}").exists()  # still serving the detached overlay
        assert os.listdir(f"/proc/{holder.pid}/cwd")  # which still reads
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 15
    while (_status() or _mounts_under(runtime)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _status() == [] and _mounts_under(runtime) == []


@pytest.mark.parametrize("cleanup", ["umount", "prune", "mount-again"])
def test_killed_daemon_is_cleaned_up(indexed: list[Indexed], tmp_path: Path, runtime: Path,
                                     cleanup: str) -> None:
    mnt = tmp_path / "mnt"
    _mount(indexed, mnt)
    pid = int(_status()[0]["daemon_pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid in daemons_for(runtime) and time.monotonic() < deadline:
        time.sleep(0.05)
    [entry] = _status()
    assert entry["state"] == "stale" and entry["kind"] == "image"
    assert _mounts_under(mnt)  # the dead overlay is still there until cleaned
    if cleanup == "umount":
        proc = _run(["umount", str(mnt)])
        assert proc.returncode == 0, proc.stderr
        assert "daemon had died" in proc.stdout
    elif cleanup == "prune":
        proc = _run(["status", "--prune"])
        assert proc.returncode == 0 and "stale (cleaned)" in proc.stdout, proc.stdout
    else:  # a new mount-image on the same mountpoint cleans the dead one's leftovers first
        _mount(indexed, mnt)
        assert merged_view(mnt) == expected_view(LAYERS)
        unmount(mnt)
    assert _status() == [] and not _mounts_under(mnt, runtime)


def test_reattach_an_image_after_daemon_death(indexed: list[Indexed], tmp_path: Path,
                                              runtime: Path) -> None:
    mnt = tmp_path / "mnt"
    _mount(indexed, mnt)
    try:
        old = int(_status()[0]["daemon_pid"])
        os.kill(old, signal.SIGKILL)
        time.sleep(0.2)
        proc = _run(["mount", "--reattach", str(mnt)])
        assert proc.returncode == 0, proc.stderr
        [entry] = _status()
        assert entry["state"] == "mounted" and entry["daemon_pid"] != old
        assert entry["layers"] == 4
        assert merged_view(mnt) == expected_view(LAYERS)
    finally:
        assert _run(["umount", str(mnt)]).returncode == 0


# -- failures -------------------------------------------------------------------------------------

def test_a_failing_layer_leaves_nothing_mounted(indexed: list[Indexed], tmp_path: Path,
                                                runtime: Path) -> None:
    layers = [layer.image_layer() for layer in indexed]
    # Layer 3 of 4 gets layer 2's zinfo: it opens only after layers 1 and 2 are mounted.
    layers[2] = ImageLayer(str(indexed[2].gz), indexed[2].meta, indexed[1].zinfo)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(MountError) as caught:
        mount_image("test-image", mnt, layers)
    message = str(caught.value)
    assert "\n" not in message and "layer 3 of 4" in message, message
    assert mount_statuses() == []
    assert not _mounts_under(mnt, runtime)


def test_failures_of_the_cli_are_one_line(indexed: list[Indexed], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    layout = _oci_layout(indexed, tmp_path / "layout")
    ref = f"oci:{layout}:v1"
    good = _index_dir(indexed, tmp_path / "idx")

    multi = _index_dir(indexed, tmp_path / "multi", platforms=("linux/amd64", "linux/arm64"))
    line = one_error_line(_run(["mount-image", "--index-dir", str(multi), ref, str(mnt)]))
    assert "2 platforms (linux/amd64, linux/arm64): pick one with --platform" in line
    line = one_error_line(_run(["mount-image", "--index-dir", str(multi), "--platform",
                                 "linux/s390x", ref, str(mnt)]))
    assert "no image for platform linux/s390x (it has: linux/amd64, linux/arm64)" in line

    # A layer skipped for its size is indexed on the node (test_offline_image_flow.py); one
    # that is not gzip cannot be mounted lazily.
    other = _index_dir(indexed, tmp_path / "other", skipped=1, status=SKIPPED_FORMAT)
    line = one_error_line(_run(["mount-image", "--index-dir", str(other), ref, str(mnt)]))
    assert f"layer {indexed[1].digest} ({LAYER_MEDIA_TYPE}) is not a gzip layer" in line

    meta = good / indexed[3].meta.name
    meta.write_bytes(meta.read_bytes()[:-1] + b"\1")
    line = one_error_line(_run(["mount-image", "--index-dir", str(good), ref, str(mnt)]))
    assert f"does not match index.json (meta of layer {indexed[3].digest}" in line

    line = one_error_line(_run(["mount-image", "--index-dir", str(tmp_path), ref, str(mnt)]))
    assert "index.json: no such file" in line

    line = one_error_line(_run(["mount-image", ref, str(mnt)]))  # an oci: layout, no registry
    assert "finding the index needs a registry reference" in line
    assert _status() == [] and not _mounts_under(mnt)


# -- the CLI with an index directory ----------------------------------------------------------------

def _index_dir(indexed: list[Indexed], directory: Path, *,
               platforms: tuple[str, ...] = ("linux/amd64",), skipped: int | None = None,
               status: str = SKIPPED_SMALL) -> Path:
    """index.json plus each layer's files, as `index REF --all-layers -o DIR` writes them."""
    directory.mkdir()
    entries = []
    for n, layer in enumerate(indexed):
        if n == skipped:
            entries.append(LayerEntry(layer.digest, LAYER_MEDIA_TYPE, layer.size, layer.diff_id,
                                      status))
            continue
        refs = {}
        for kind, path in (("zinfo", layer.zinfo),
                           ("sidecar", layer.zinfo.with_name(layer.zinfo.name + ".json")),
                           ("meta", layer.meta)):
            (directory / path.name).write_bytes(path.read_bytes())
            digest, size = file_digest(path)
            refs[kind] = FileRef(path.name, digest, size)
        entries.append(LayerEntry(layer.digest, LAYER_MEDIA_TYPE, layer.size, layer.diff_id,
                                  INDEXED, layer.layer_size, **refs))
    images = tuple(ImageEntry(f"sha256:{'0' * 63}{n}", "application/vnd.oci.image.manifest.v1+json",
                              1, platform, f"sha256:{'1' * 64}", tuple(entries))
                   for n, platform in enumerate(platforms))
    write_image_index(ImageIndex(images, 64 << 10, "test"), directory)
    return directory


def _oci_layout(indexed: list[Indexed], directory: Path) -> Path:
    """An OCI image layout holding the layers as one linux/amd64 image tagged v1."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    for layer in indexed:
        put(layer.gz.read_bytes())
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": [layer.diff_id for layer in indexed]}}).encode()
    config_digest, config_size = put(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size}
                   for layer in indexed]}).encode()
    manifest_digest, manifest_size = put(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (directory / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    return directory


def test_cli_mount_image_from_an_index_dir(indexed: list[Indexed], tmp_path: Path,
                                           runtime: Path) -> None:
    index_dir = _index_dir(indexed, tmp_path / "idx")
    layout = _oci_layout(indexed, tmp_path / "layout")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ref = f"oci:{layout}:v1"
    proc = _run(["mount-image", "--index-dir", str(index_dir), ref, str(mnt)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"mounted {ref} (4 layers) on {mnt} (via fuse"), proc.stdout
    try:
        assert merged_view(mnt) == expected_view(LAYERS)
        status = _run(["status"]).stdout
        assert f"{mnt}: mounted, image of 4 layers, via fuse" in status
        # The layer plan went to the daemon as a file; its argv names no layer.
        pid = int(_status()[0]["daemon_pid"])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--_plan" in argv and not any(b".zinfo" in arg for arg in argv)
        plan = json.loads(next(runtime.glob("images/*/plan.json")).read_text())
        assert [layer["blob"] for layer in plan["layers"]] == [i.digest for i in indexed]
        record = json.loads(next(runtime.glob("mounts/*[0-9a-f].json")).read_text())
        assert record["kind"] == "image" and record["registry"]["platform"] == "linux/amd64"
    finally:
        proc = _run(["umount", str(mnt)])
    assert proc.returncode == 0, proc.stderr
    assert _status() == []
    helptext = _run(["mount-image", "--help"]).stdout
    assert "Examples:" in helptext and "--index-dir" in helptext
