"""The mounted tree is what containerd would unpack: for every archive of Go's archive/tar test
data, CPython's testtar.tar, our corpus and archives written by bsdtar, GNU tar, a Go writer
that is never closed, umoci and buildah, the kernel view of meta || tar equals the tree
containerd 1.6's archive.Apply makes, and an archive containerd refuses is refused in one line.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybrid_erofs.erofs.writer import MetaBuilder
from hybrid_erofs.errors import TarFormatError
from tests.conftest import _load_tool, ci_required
from tests.integration.conftest import require_fuse_and_erofs, require_kernel_erofs
from tests.mounting import concat, daemons_for, kernel_mount, walk_tree
from tests.tar_oracle import (
    CPYTHON_TESTTAR,
    GO_TESTDATA,
    comparable,
    containerd_apply,
    differences,
    explicit_paths,
    missing_prerequisites,
    oracle_binary,
    split_testtar,
)

pytestmark = [pytest.mark.integration, pytest.mark.root]

BUILD_TIME = 1_700_000_000
# Go's sparse test archives: test_tar_sparse.py (the 60 GB ones are too big to unpack here).
SPARSE = {"gnu-nil-sparse-data.tar", "gnu-nil-sparse-hole.tar", "gnu-sparse-big.tar",
          "pax-nil-sparse-data.tar", "pax-nil-sparse-hole.tar", "pax-sparse-big.tar",
          "sparse-formats.tar"}
GO_ARCHIVES = sorted(p.name for p in GO_TESTDATA.glob("*.tar")) if GO_TESTDATA.exists() else []
_CORPUS = _load_tool("make_tar_corpus")
CORPUS_NAMES = sorted([*_CORPUS.corpus(), *_CORPUS.refused()])


@pytest.fixture(scope="module")
def prerequisites() -> None:
    require_kernel_erofs()
    missing = missing_prerequisites()
    if missing:
        ci_required(f"the containerd oracle needs: apt-get install {' '.join(missing)}")


def build_meta(tar: Path, meta: Path) -> None:
    builder = MetaBuilder(aufs=True, build_time=BUILD_TIME)
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            builder.feed(memoryview(chunk))
    meta.write_bytes(builder.finish())


def check_parity(tar: Path, work: Path) -> str:
    """Compare our mount with containerd's unpack of `tar`: "applied" or "refused"."""
    refusal = containerd_apply(tar, work / "oracle")
    meta = work / "m.erofs"
    if refusal is not None:
        with pytest.raises(TarFormatError) as caught:
            build_meta(tar, meta)
        message = str(caught.value)
        assert "\n" not in message and message.isprintable(), message
        return "refused"
    build_meta(tar, meta)
    device = concat(meta, tar, work / "device.img")
    with kernel_mount(device, work / "mnt") as mnt:
        ours = walk_tree(mnt)
    explicit = explicit_paths(tar)
    want = comparable(walk_tree(work / "oracle"), explicit)
    got = comparable(ours, explicit)
    assert got == want, differences(got, want)
    return "applied"


@pytest.mark.parametrize("name", [n for n in GO_ARCHIVES if n not in SPARSE])
def test_go_testdata(prerequisites: None, tmp_path: Path, name: str) -> None:
    check_parity(GO_TESTDATA / name, tmp_path)


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus(prerequisites: None, tmp_path: Path, name: str, corpus: Path) -> None:
    outcome = check_parity(corpus / name, tmp_path)
    assert outcome == ("refused" if name.startswith("refused-") else "applied")


def test_cpython_testtar_is_refused_like_containerd(prerequisites: None, tmp_path: Path) -> None:
    # testtar.tar holds a contiguous file (type '7'), a Solaris 'X' header and an old GNU
    # sparse file ('S'): containerd refuses the whole archive for each of them.
    assert check_parity(CPYTHON_TESTTAR, tmp_path) == "refused"


def test_cpython_testtar_members_containerd_applies(prerequisites: None, tmp_path: Path) -> None:
    # The rest, cut at member boundaries (its sparse members: test_tar_sparse.py).
    applied, _ = split_testtar(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    assert check_parity(applied, work) == "applied"


# -- archives written by other tools, made here --------------------------------------------------

GENERATED = ("bsdtar-pax", "bsdtar-ustar", "bsdtar-gnutar", "bsdtar-v7tar", "gnutar-gnu",
             "gnutar-oldgnu", "gnutar-posix", "gnutar-ustar", "gnutar-v7", "go-unclosed",
             "umoci-repack", "umoci-insert", "umoci-insert-whiteout", "buildah-commit")


def _source_tree(root: Path) -> Path:
    """Files of every kind the tools can store: dirs, setuid, fifo, device, symlink, hard
    link, xattr, a nanosecond mtime, names longer than 100 bytes."""
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"hello\n")
    os.setxattr(root / "d" / "f", "user.k", b"value")
    os.utime(root / "d" / "f", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (root / "suid").write_bytes(b"x")
    os.chmod(root / "suid", 0o4755)
    os.symlink("d/f", root / "s")
    os.link(root / "d" / "f", root / "h")
    os.mkfifo(root / "p")
    os.mknod(root / "c", 0o20644, os.makedev(1, 3))
    deep = root / ("L" * 120) / ("M" * 90)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"deep\n")
    os.chown(deep / "file", 1234, 5678)
    return root


def _umoci_layers(work: Path) -> dict[str, Path]:
    """Gzip layers of an OCI layout made by umoci: repack of a bundle, and two `umoci insert`
    layers (Go tar.Writer never closed: the first ends right after its data)."""
    layout = work / "oci"
    run = [["umoci", "init", "--layout", str(layout)], ["umoci", "new", "--image", f"{layout}:t"],
           ["umoci", "unpack", "--image", f"{layout}:t", str(work / "bundle")]]
    for argv in run:
        subprocess.run(argv, check=True, capture_output=True)
    rootfs = work / "bundle" / "rootfs"
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "app.conf").write_bytes(b"conf\n")
    os.symlink("app.conf", rootfs / "etc" / "link")
    (work / "ins.txt").write_bytes(b"inserted\n")
    for argv in (["umoci", "repack", "--image", f"{layout}:t", str(work / "bundle")],
                 ["umoci", "insert", "--image", f"{layout}:t", str(work / "ins.txt"),
                  "/opt/inserted.txt"],
                 ["umoci", "insert", "--image", f"{layout}:t", "--whiteout", "/etc/link"]):
        subprocess.run(argv, check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:])
                          .read_text())
    blobs = [layout / "blobs" / "sha256" / layer["digest"][7:] for layer in manifest["layers"]]
    return dict(zip(("umoci-repack", "umoci-insert", "umoci-insert-whiteout"), blobs[-3:],
                    strict=True))


def _buildah_layer(work: Path, source: Path) -> Path:
    """The layer `buildah commit` writes for a scratch container with `buildah copy`."""
    store = ["--root", str(work / "storage"), "--runroot", str(work / "run"),
             "--storage-driver", "vfs"]
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": "vfs"}

    def buildah(*args: str) -> str:
        proc = subprocess.run(["buildah", *store, *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    container = buildah("from", "scratch")
    buildah("copy", container, str(source / "d"), "/app/d")
    buildah("copy", container, str(source / "suid"), "/app/suid")
    buildah("commit", "--disable-compression=false", container, f"oci:{work / 'layout'}:t")
    buildah("rm", container)
    layout = work / "layout"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:])
                          .read_text())
    return Path(layout / "blobs" / "sha256" / manifest["layers"][-1]["digest"][7:])


@pytest.fixture(scope="module")
def generated(prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> uncompressed tar of every GENERATED archive."""
    work = tmp_path_factory.mktemp("generated")
    source = _source_tree(work / "src")
    out: dict[str, Path] = {}
    for fmt in ("pax", "ustar", "gnutar", "v7tar"):
        out[f"bsdtar-{fmt}"] = work / f"bsdtar-{fmt}.tar"
        subprocess.run(["bsdtar", "--format", fmt, "-cf", str(out[f"bsdtar-{fmt}"]), "-C",
                        str(source), "."], capture_output=True)  # v7 skips what it cannot store
    for fmt in ("gnu", "oldgnu", "posix", "ustar", "v7"):
        out[f"gnutar-{fmt}"] = work / f"gnutar-{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "--xattrs", "--numeric-owner", "-cf",
                        str(out[f"gnutar-{fmt}"]), "-C", str(source), "."], capture_output=True)
    with open(work / "go-unclosed.tar", "wb") as f:
        subprocess.run([str(oracle_binary()), "write-unclosed"], stdout=f, check=True)
    out["go-unclosed"] = work / "go-unclosed.tar"
    layers = _umoci_layers(work / "umoci")
    if shutil.which("buildah") is None:
        ci_required("buildah is not installed (apt-get install buildah)")
    layers["buildah-commit"] = _buildah_layer(work / "buildah", source)
    for name, blob in layers.items():
        out[name] = work / f"{name}.tar"
        out[name].write_bytes(gzip.decompress(blob.read_bytes()))
    assert out["go-unclosed"].stat().st_size % 512 and out["umoci-insert"].stat().st_size % 512
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_generated(generated: dict[str, Path], tmp_path: Path, name: str) -> None:
    assert check_parity(generated[name], tmp_path) == "applied"


# -- through `hybrid-erofs index` and `hybrid-erofs mount` of a gzip layer ------------------------

# Every Go and CPython archive, and a few generated ones (the rest are mounted through the
# kernel above; `mount` adds only the lazy gzip path, the same for any archive).
MOUNTED = (*[n for n in GO_ARCHIVES if n not in SPARSE], "testtar-applied", "go-unclosed",
           "umoci-insert", "bsdtar-pax", "gnutar-posix")


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_fuse_and_erofs()
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(tmp_path / "run")}
    yield env
    assert daemons_for(tmp_path / "run") == []


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybrid_erofs", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", MOUNTED)
def test_hybrid_erofs_mount_of_the_gzip_layer(generated: dict[str, Path], tmp_path: Path,
                                              cli_env: dict[str, str], name: str) -> None:
    if name == "testtar-applied":
        tar = split_testtar(tmp_path)[0]
    else:
        tar = generated.get(name) or GO_TESTDATA / name
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(tar.read_bytes(), mtime=0))
    proc = _cli(cli_env, "index", "--aufs", str(layer), "-o", str(tmp_path / "l.zinfo"),
                "--meta", str(tmp_path / "m.erofs"))
    if containerd_apply(tar, tmp_path / "oracle") is not None:
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr
        assert not (tmp_path / "m.erofs").exists() and not (tmp_path / "l.zinfo").exists()
        return
    assert proc.returncode == 0, proc.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _cli(cli_env, "mount", "--meta", str(tmp_path / "m.erofs"), "--zinfo",
                str(tmp_path / "l.zinfo"), str(layer), str(mnt))
    assert proc.returncode == 0, proc.stderr
    try:
        ours = walk_tree(mnt)
    finally:
        assert _cli(cli_env, "umount", str(mnt)).returncode == 0
    explicit = explicit_paths(tar)
    got, want = comparable(ours, explicit), comparable(walk_tree(tmp_path / "oracle"), explicit)
    assert got == want, differences(got, want)
