"""A deterministic multi-layer, multi-platform OCI image layout written by hand, broken variants of
it, and the umoci oracle: `umoci unpack` applies the layers (whiteouts included) to a directory,
and `tree_view` turns any tree (umoci's, an overlay mount) into a comparable snapshot."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.mounting import sha256_of
from tests.registry_rig import GZIP_LAYER, OCI_INDEX, OCI_MANIFEST, Layout

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"  # MTIME as RFC 3339
BIG_LAYER, TINY_LAYER = 1, 3  # indexes into every platform's layers
BIG_SIZE = 3 << 20  # incompressible bytes in BIG_LAYER: several 1 MiB spans
LONG_NAME = ("usr/share/doc/" + "a-directory-name-long-enough-to-need-pax/" * 3
             + "and-a-file-name-that-is-longer-than-one-hundred-bytes-all-by-itself"
             + "-really-it-is.txt")
UNICODE_NAME = "etc/ünïcödé-名前.txt"
# Paths that exist in the bottom layer and must be gone in the merged tree of every platform.
ABSENT = ("gone", "gone/a.txt", "gone/sub", "gone/sub/b.txt", "etc/old.conf", "etc/dangling",
          "d2f/a.txt", "d2f/sub", "opq/old1.txt", "opq/olddir/x.txt", "linkpair/a")
# Every image's config.config (the same for both platforms).
ENTRYPOINT = ("/bin/tool",)
CMD = ("--serve", "--port=8080")
ENV = ("PATH=/usr/local/bin:/usr/bin:/bin", "MODE=test", "EMPTY=")
WORKING_DIR = "/home/user"
USER = "1000:1000"
LABELS = {"org.opencontainers.image.title": "hybrid-erofs test image", "test": "oci_images"}
PLATFORMS = {"amd64": "linux/amd64", "arm64": "linux/arm64/v8"}  # tag -> os/arch[/variant]


@dataclass(frozen=True, slots=True)
class ExpectedConfig:
    """The run configuration every platform's config carries (config.config of image-spec)."""

    entrypoint: tuple[str, ...] = ENTRYPOINT
    cmd: tuple[str, ...] = CMD
    env: tuple[str, ...] = ENV
    working_dir: str = WORKING_DIR
    user: str = USER
    labels: tuple[tuple[str, str], ...] = tuple(sorted(LABELS.items()))


@dataclass(frozen=True, slots=True)
class PlatformImage:
    """One platform's manifest, config and layers, bottom layer first.

    `contents` holds the expected bytes of a few files of the merged tree (upper layers win).
    """

    tag: str
    platform: str
    os: str
    architecture: str
    variant: str
    manifest: bytes
    manifest_digest: str
    config: bytes
    config_digest: str
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    diff_ids: tuple[str, ...]
    contents: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class TestImage:
    """The layout written by build_test_image: tags "multi" (the index), "amd64", "arm64".

    Both platforms share layer 0 (the same blob); layers 1-3 differ. Layer BIG_LAYER holds
    BIG_SIZE incompressible bytes, layer TINY_LAYER is under 4 KiB compressed.
    """

    __test__ = False  # not a pytest test class

    layout: Path
    index: bytes
    index_digest: str
    platforms: dict[str, PlatformImage]
    expected: ExpectedConfig
    absent: tuple[str, ...] = ABSENT

    def ref(self, tag: str = "multi") -> str:
        """`oci:DIR:TAG` for hybrid-erofs and skopeo."""
        return f"oci:{self.layout}:{tag}"

    def blob_path(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


# --- tar entries -------------------------------------------------------------------------------

Entry = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    info.uname = info.gname = ""
    return info


def _dir(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode, uid, gid), None


def _file(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
          xattrs: dict[str, str] | None = None) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    info.pax_headers = {f"SCHILY.xattr.{key}": value for key, value in (xattrs or {}).items()}
    return info, data


def _symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, None


def _hardlink(name: str, target: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    # Tar writers store the shared inode's attributes in a link's header too; containerd
    # applies them to the inode (umoci does not), so both agree only when they match.
    info = _info(name, tarfile.LNKTYPE, mode, uid, gid)
    info.linkname = target
    return info, None


def _device(name: str, kind: bytes, major: int = 0, minor: int = 0, mode: int = 0o666) -> Entry:
    info = _info(name, kind, mode)
    info.devmajor, info.devminor = major, minor
    return info, None


def _whiteout(path: str) -> Entry:
    """image-spec layer.md "Whiteouts": `.wh.NAME` deletes NAME of the layers below."""
    parent, _, name = path.rpartition("/")
    return _file(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"", mode=0o600)


def _opaque(directory: str) -> Entry:
    """`DIR/.wh..wh..opq`: DIR keeps only what this layer puts in it."""
    return _file(f"{directory}/.wh..wh..opq", b"", mode=0o600)


def _tar(entries: list[Entry]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def _gzip(tar: bytes) -> bytes:
    return gzip.compress(tar, compresslevel=6, mtime=0)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the layers --------------------------------------------------------------------------------

def _words(seed: int, size: int) -> bytes:
    """Compressible but not trivial text."""
    rng = random.Random(seed)
    vocabulary = [rng.randbytes(rng.randint(2, 9)).hex() for _ in range(400)]
    out = io.StringIO()
    while out.tell() < size:
        out.write(" ".join(rng.choices(vocabulary, k=12)) + "\n")
    return out.getvalue().encode()[:size]


def _base_layer() -> list[Entry]:
    """Layer 0, shared by both platforms: everything the upper layers delete or replace."""
    return [
        _dir("bin"),
        _file("bin/tool", b"#!/bin/sh\necho base tool\n", 0o755),
        _hardlink("bin/tool-hardlink", "bin/tool", 0o755),  # bin/tool is replaced in layer 2
        _symlink("bin/sh", "tool"),
        _file("bin/su", b"\x7fELF not really su\n", 0o4755),
        _file("bin/wall", b"\x7fELF not really wall\n", 0o2755, gid=5),
        _dir("d2f"), _file("d2f/a.txt", b"a\n"), _dir("d2f/sub"), _file("d2f/sub/b.txt", b"b\n"),
        _dir("dev"), _device("dev/null", tarfile.CHRTYPE, 1, 3),
        _dir("etc"),
        _symlink("etc/abs-link", "/etc/hello.txt"),
        _symlink("etc/dangling", "/nonexistent/target"),
        _file("etc/empty", b""),
        _file("etc/hello.txt", b"hello from the base layer\n"),
        _file("etc/old.conf", b"deleted in layer 1\n"),
        _file("etc/readded.conf", b"deleted in layer 1, added again in layer 3\n"),
        _file(UNICODE_NAME, "PAX path, non-ASCII name and content: ü 名前\n".encode()),
        _file("f2d", b"a file in layer 0, a directory from layer 1\n"),
        _dir("gone"), _file("gone/a.txt", b"a\n"), _dir("gone/sub"),
        _file("gone/sub/b.txt", b"b\n"),
        _dir("home"),
        _dir("home/user", 0o700, 1000, 1000),
        _file("home/user/.profile", b"export PS1='$ '\n", 0o600, 1000, 1000),
        _file("home/user/secret.txt", b"s3cret\n", 0o400, 1000, 1001),
        _dir("linkpair"), _file("linkpair/a", b"two names, one inode\n"),
        _hardlink("linkpair/b", "linkpair/a"),  # linkpair/a is deleted in layer 1
        _dir("opq"), _file("opq/old1.txt", b"hidden by the opaque marker\n"),
        _dir("opq/olddir"), _file("opq/olddir/x.txt", b"x\n"),
        _dir("run"), _device("run/fifo", tarfile.FIFOTYPE, mode=0o640),
        _dir("tmp", 0o1777),
        _dir("usr"), _dir("usr/lib"),
        _file("usr/lib/libfoo.so.1", _words(0, 96 << 10) + random.Random(0).randbytes(16 << 10),
              0o755),
        _symlink("usr/lib/libfoo.so", "libfoo.so.1"),
        _symlink("usr/lib64", "lib"),
        _dir("usr/share"), _dir("usr/share/doc"),
        *(_dir("/".join(LONG_NAME.split("/")[:i])) for i in range(4, LONG_NAME.count("/") + 1)),
        _file(LONG_NAME, b"a name of more than 100 bytes needs a PAX header\n"),
        _file("usr/share/xattr.txt", b"has a user xattr\n",
              xattrs={"user.comment": "hybrid-erofs", "user.mime_type": "text/plain"}),
    ]


def _big_layer(arch: str, seed: int) -> list[Entry]:
    """Layer 1: deletions (a file, a whole directory, one of two hard links), a directory
    replaced by a file, a file replaced by a directory, and incompressible data."""
    return [
        _whiteout("gone"),
        _file("d2f", b"a directory in layer 0, a file from layer 1\n"),
        _dir("data"), _file("data/random.bin", random.Random(seed).randbytes(BIG_SIZE), 0o640,
                            33, 33),
        _dir("etc"), _whiteout("etc/old.conf"), _whiteout("etc/readded.conf"),
        _file("etc/arch", f"{arch}\n".encode()),
        _dir("f2d", 0o750), _file("f2d/inner.txt", b"inside the new directory\n"),
        _dir("linkpair"), _whiteout("linkpair/a"),
    ]


def _opaque_layer(arch: str) -> list[Entry]:
    """Layer 2: an opaque directory, a replaced hard-linked file, a new hard-link pair."""
    return [
        _dir("bin"),
        _file("bin/tool", f"#!/bin/sh\necho {arch} tool\n".encode(), 0o755),
        _file("bin/newtool", f"new tool for {arch}\n".encode(), 0o755, 1000, 1000),
        _hardlink("bin/newtool-link", "bin/newtool", 0o755, 1000, 1000),
        _dir("opq"), _opaque("opq"),
        _file("opq/new.txt", f"only this ({arch}) and olddir/z.txt remain\n".encode()),
        _dir("opq/olddir", 0o700), _file("opq/olddir/z.txt", b"z\n"),
        _dir("secret", 0o700), _file("secret/key", _words(7, 2000), 0o600),
    ]


def _tiny_layer(arch: str) -> list[Entry]:
    """Layer 3 (under 4 KiB compressed): a re-added file, a deleted symlink, empty files."""
    return [
        _dir("etc"), _whiteout("etc/dangling"),
        _file("etc/motd", f"platform {arch}\n".encode()),
        _file("etc/readded.conf", b"added again in layer 3\n", 0o600),
        _dir("usr"), _dir("usr/local"), _file("usr/local/empty-new", b"", 0o444),
    ]


# --- images ------------------------------------------------------------------------------------

def _run_config(diff_ids: list[str], platform: str, *, rootfs_type: str = "layers"
                ) -> dict[str, object]:
    os_name, arch, *variant = platform.split("/")
    config: dict[str, object] = {
        "created": CREATED, "architecture": arch, "os": os_name,
        "config": {"Entrypoint": list(ENTRYPOINT), "Cmd": list(CMD), "Env": list(ENV),
                   "WorkingDir": WORKING_DIR, "User": USER, "Labels": LABELS},
        "rootfs": {"type": rootfs_type, "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": f"layer {i}"}
                    for i in range(len(diff_ids))],
    }
    if variant:
        config["variant"] = variant[0]
    return config


def _platform_descriptor(platform: str) -> dict[str, str]:
    os_name, arch, *variant = platform.split("/")
    return {"architecture": arch, "os": os_name, **({"variant": variant[0]} if variant else {})}


def _manifest(layout: Layout, blobs: list[bytes], config: dict[str, object], *,
              config_type: str = OCI_CONFIG) -> tuple[bytes, bytes, dict[str, object]]:
    """Write config, layers and manifest; return (manifest, config, manifest descriptor)."""
    config_body = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": layout.blob(config_body, config_type),
                "layers": [layout.blob(blob, GZIP_LAYER) for blob in blobs]}
    body = json.dumps(manifest, separators=(",", ":")).encode()
    return body, config_body, layout.blob(body, OCI_MANIFEST)


def _platform_layers(arch: str, seed: int, base: bytes) -> list[bytes]:
    return [base, *(_gzip(_tar(entries)) for entries in
                    (_big_layer(arch, seed), _opaque_layer(arch), _tiny_layer(arch)))]


def build_test_image(root: Path) -> TestImage:
    """Write the test image's OCI layout at `root` (must not hold a layout yet).

    Same bytes on every run with the same zlib: fixed mtimes, no user names, gzip mtime 0.
    """
    layout = Layout(root)
    base = _gzip(_tar(_base_layer()))
    platforms: dict[str, PlatformImage] = {}
    entries: list[dict[str, object]] = []
    for seed, (tag, platform) in enumerate(PLATFORMS.items(), start=1):
        os_name, arch, *variant = platform.split("/")
        blobs = _platform_layers(arch, seed, base)
        diff_ids = [_sha256(gzip.decompress(blob)) for blob in blobs]
        manifest, config, descriptor = _manifest(layout, blobs, _run_config(diff_ids, platform))
        layout.tag(tag, descriptor)
        entries.append({**descriptor, "platform": _platform_descriptor(platform)})
        platforms[tag] = PlatformImage(
            tag=tag, platform=platform, os=os_name, architecture=arch,
            variant=variant[0] if variant else "", manifest=manifest,
            manifest_digest=_sha256(manifest), config=config, config_digest=_sha256(config),
            layer_digests=tuple(_sha256(b) for b in blobs),
            layer_sizes=tuple(len(b) for b in blobs), diff_ids=tuple(diff_ids),
            contents={
                "etc/arch": f"{arch}\n".encode(),
                "etc/motd": f"platform {arch}\n".encode(),
                "etc/readded.conf": b"added again in layer 3\n",
                "d2f": b"a directory in layer 0, a file from layer 1\n",
                "f2d/inner.txt": b"inside the new directory\n",
                "bin/tool": f"#!/bin/sh\necho {arch} tool\n".encode(),
                "bin/tool-hardlink": b"#!/bin/sh\necho base tool\n",
                "linkpair/b": b"two names, one inode\n",
                "opq/new.txt": f"only this ({arch}) and olddir/z.txt remain\n".encode(),
                "etc/empty": b"",
            })
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                       separators=(",", ":")).encode()
    layout.tag("multi", layout.blob(index, OCI_INDEX))
    return TestImage(layout=root, index=index, index_digest=_sha256(index),
                     platforms=platforms, expected=ExpectedConfig())


def build_broken_images(root: Path) -> dict[str, str]:
    """One layout at `root` with a tag per malformed image; returns name -> `oci:DIR:TAG`.

    bad-config-media-type: the config descriptor is not an image config (an artifact).
    bad-rootfs-type: rootfs.type is "foo".
    bad-diff-id-count: one diff_id for two layers.
    corrupt-layer: layer 1's diff_id is not the sha256 of its uncompressed tar.
    """
    layout = Layout(root)
    blobs = [_gzip(_tar(_base_layer())), _gzip(_tar(_tiny_layer("amd64")))]
    diff_ids = [_sha256(gzip.decompress(blob)) for blob in blobs]
    variants: dict[str, Callable[[], tuple[dict[str, object], str]]] = {
        "bad-config-media-type": lambda: (
            _run_config(diff_ids, "linux/amd64"),
            "application/vnd.example.artifact.config.v1+json"),
        "bad-rootfs-type": lambda: (
            _run_config(diff_ids, "linux/amd64", rootfs_type="foo"), OCI_CONFIG),
        "bad-diff-id-count": lambda: (_run_config(diff_ids[:1], "linux/amd64"), OCI_CONFIG),
        "corrupt-layer": lambda: (
            _run_config([diff_ids[0], _sha256(b"not the layer")], "linux/amd64"), OCI_CONFIG),
    }
    refs: dict[str, str] = {}
    for name, make in variants.items():
        config, config_type = make()
        _, _, descriptor = _manifest(layout, blobs, config, config_type=config_type)
        layout.tag(name, descriptor)
        refs[name] = f"oci:{root}:{name}"
    return refs


# --- tools: skopeo and umoci -------------------------------------------------------------------

def push_image(layout_ref: str, dest: str, *, all_platforms: bool = True,
               creds: str | None = None) -> None:
    """`skopeo copy` an `oci:DIR:TAG` to `dest` (`host/repo:tag`, plain HTTP or untrusted TLS).

    `creds` is `user:password` for the destination registry.
    """
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
    if all_platforms:
        argv.append("--all")
    if creds is not None:
        argv += ["--dest-creds", creds]
    target = dest if dest.startswith("docker://") else f"docker://{dest}"
    proc = subprocess.run([*argv, layout_ref, target], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy {layout_ref} {target}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()}")


def umoci_unpack(layout_dir: Path, tag: str, dest: Path) -> Path:
    """`umoci unpack` the manifest tagged `tag` into the runtime bundle `dest` (which must not
    exist); returns `dest/rootfs`. Needs root (no --rootless: uids, devices, xattrs kept).

    umoci 0.4.7 refuses a tag that points at an image index: use a platform manifest's tag.
    """
    proc = subprocess.run(["umoci", "unpack", "--image", f"{layout_dir}:{tag}", str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"umoci unpack {layout_dir}:{tag}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    return dest / "rootfs"


# --- comparable trees --------------------------------------------------------------------------

_TYPES: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "sock"))


def _user_xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False)
            for name in sorted(names) if name.startswith("user.")}


def tree_view(root: Path, *, mtimes: bool = False) -> dict[str, dict[str, object]]:
    """Snapshot every path below `root` (not `root` itself) for `==` comparison.

    Per path: type, mode (permission, setuid/setgid/sticky bits), uid, gid, xattrs (`user.*`
    only); size for non-directories; sha256 for regular files; target for symlinks; rdev
    (major, minor) for devices; `link` (the first path, in sorted order, with the same
    (st_dev, st_ino)) for non-directories that share an inode with another path; mtime_ns for
    non-directories if `mtimes`. Directory mtimes and link counts are left out: overlayfs and
    umoci differ there. (st_dev, st_ino), not st_ino alone: overlayfs over several filesystems
    may report equal st_ino for unrelated files of different layers.
    """
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = os.path.relpath(dirpath, root)
        rels.extend(name if base == "." else os.path.join(base, name)
                    for name in dirnames + filenames)
    rels.sort()
    tree: dict[str, dict[str, object]] = {}
    by_inode: dict[tuple[int, int], list[str]] = {}
    for rel in rels:
        path = root / rel
        st = os.lstat(path)
        kind = next((name for test, name in _TYPES if test(st.st_mode)), "unknown")
        entry: dict[str, object] = {"type": kind, "mode": stat.S_IMODE(st.st_mode),
                                    "uid": st.st_uid, "gid": st.st_gid,
                                    "xattrs": _user_xattrs(path)}
        if kind != "dir":
            entry["size"] = st.st_size
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
            if mtimes:
                entry["mtime_ns"] = st.st_mtime_ns
        if kind == "file":
            entry["sha256"] = sha256_of(path)
        elif kind == "symlink":
            entry["target"] = os.readlink(path)
        elif kind in ("chr", "blk"):
            entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        tree[rel] = entry
    for group in by_inode.values():
        if len(group) > 1:
            for rel in group:
                tree[rel]["link"] = group[0]
    return tree
