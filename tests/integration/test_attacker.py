"""Issue 14, done when: the attacker of item 1 against a real registry on loopback
(distribution 2.8, push rights to the repository only; everything forged with the project's
own tools). CI indexes and pushes the image; the attacker attaches a forged index (a meta from
a doctored copy of a layer's tar: a file made setuid-root, a symlink `evil-link ->
/etc/shadow` hidden in the end padding, the sidecar re-written to vouch for it) and later one
with a forged zinfo. Nodes mount by the image reference and by `pull_ref`:

- by REF the forged index is refused (one line naming the flags);
- by `pull_ref` the genuine bound index is used: setuid bits intact, no nosuid, no opt-in;
- by REF with `--accept-unbound`: nosuid,nodev on every mount, and once the background
  verification finds the mismatch every read fails with EIO (status says why);
- the forged zinfo never yields bytes: refused when opened;
- a signature by a key the node trusts makes the genuine attached index usable by REF.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.indexing.image import meta_uuid
from hybrid_erofs.indexing.imageindex import (
    FileRef,
    ImageIndex,
    file_digest,
    layer_file_names,
    load_image_index,
)
from hybrid_erofs.indexing.publish import artifact_files
from hybrid_erofs.mounting.kernel import mounted_at, mounts_under
from hybrid_erofs.mounting.state import StatePaths
from hybrid_erofs.oci.artifact import push_artifact
from hybrid_erofs.oci.client import Descriptor, RegistryClient
from hybrid_erofs.oci.reference import parse_reference
from tests.forgery import EVIL_LINK, forge_index, forge_zinfo
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for, one_error_line
from tests.oci_images import TestImage, build_test_image, push_image
from tests.registry_rig import Rig

pytestmark = [pytest.mark.integration, pytest.mark.root]

CLI = [sys.executable, "-m", "hybrid_erofs"]
REPO = "lab/attacked"
FORGED_FILE = "etc/hello.txt"  # 0644 in the base layer; the forgery makes it 4755 root


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_test_image(tmp_path_factory.mktemp("attacked") / "layout")


@pytest.fixture(scope="module")
def ci(rig: Rig, image: TestImage, tmp_path_factory: pytest.TempPathFactory
       ) -> dict[str, Any]:
    """The image pushed, indexed (every layer) and published by CI: `index --push --json`."""
    ref = f"{rig.hosts['plain']}/{REPO}:1.0"
    push_image(image.ref("multi"), ref)
    out = tmp_path_factory.mktemp("ci") / "index"
    proc = subprocess.run([*CLI, "index", ref, "--all-layers", "--platform", "linux/amd64",
                           "--min-layer-size", "0", "--span", "1MiB", "-o", str(out), "--push",
                           "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["pull_ref"].startswith(f"{rig.hosts['plain']}/{REPO}@sha256:")
    human = subprocess.run([*CLI, "index", ref, "--all-layers", "--platform", "linux/amd64",
                            "--min-layer-size", "0", "--span", "1MiB", "-o", str(out),
                            "--push"],
                           capture_output=True, text=True, timeout=600)
    assert f"pull_ref: {report['pull_ref']}" in human.stdout  # the same, printed for humans
    return {"ref": ref, "dir": out, "pull_ref": report["pull_ref"]}


def _attach(rig: Rig, image: TestImage, ci: dict[str, Any], work: Path, *,
            forge_meta: bool, forge_zinfo_too: bool = False, layer: int = 0) -> str:
    """The attacker: the genuine artifact's files with one layer's index forged (the base
    layer's by default), pushed as another artifact of the amd64 manifest. Returns that
    layer's digest."""
    platform = image.platforms["amd64"]
    base = platform.layer_digests[layer]
    blob = image.blob_path(base)
    index = load_image_index(ci["dir"]).for_manifest(platform.manifest_digest)
    names = layer_file_names(base)
    work.mkdir(parents=True)
    for layer in index.images[0].layers:
        for ref in layer.files.values():
            shutil.copy(ci["dir"] / ref.name, work / ref.name)
    if forge_meta:
        forge_index(blob, gzip.decompress(blob.read_bytes()), work / "forge", aufs=True,
                    uuid=meta_uuid(base), target=FORGED_FILE)
        shutil.copy(work / "forge" / "m.erofs", work / names["meta"])
        shutil.copy(work / "forge" / "layer.zinfo", work / names["zinfo"])
        shutil.copy(work / "forge" / "layer.zinfo.json", work / names["sidecar"])
    if forge_zinfo_too:
        forge_zinfo(work / names["zinfo"])
    entry = index.images[0]
    layers = []
    for layer in entry.layers:
        if layer.digest == base:
            refs = {kind: FileRef(names[kind], *file_digest(work / names[kind]))
                    for kind in ("zinfo", "sidecar", "meta")}
            layer = replace(layer, **refs)
        layers.append(layer)
    entry = replace(entry, layers=tuple(layers))
    forged = ImageIndex((entry,), index.span, index.tool, index.whiteouts)
    files = artifact_files(work, entry, forged)
    client = RegistryClient(parse_reference(f"{rig.hosts['plain']}/{REPO}"))
    with client:
        push_artifact(client, Descriptor(entry.manifest_media_type, entry.manifest,
                                         entry.manifest_size), files)
    return base


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A node with a clean cache and runtime directory; everything is unmounted after."""
    require_fuse_and_erofs()
    env = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(tmp_path / "run"),
           "HYBRID_EROFS_TRUSTED_KEYS": str(tmp_path / "no-keys")}
    state = {"env": env, "cache": tmp_path / "cache", "tmp": tmp_path, "mounts": []}
    yield state
    for mountpoint in reversed(state["mounts"]):
        subprocess.run([*CLI, "umount", "--lazy", str(mountpoint)], env=env,
                       capture_output=True)
    assert daemons_for(tmp_path / "run") == []


def _cli(node: dict[str, Any], *args: str, timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--cache-dir", str(node["cache"])], env=node["env"],
                          capture_output=True, text=True, timeout=timeout)


def _mount(node: dict[str, Any], command: str, ref: str, *flags: str
           ) -> tuple[subprocess.CompletedProcess[str], Path]:
    node["count"] = node.get("count", 0) + 1
    mountpoint = node["tmp"] / f"mnt{node['count']}"
    mountpoint.mkdir()
    proc = _cli(node, command, ref, str(mountpoint), *flags)
    if proc.returncode == 0:
        node["mounts"].append(mountpoint)
    return proc, mountpoint


def _options(path: Path) -> set[str]:
    entry = mounted_at(path)
    assert entry is not None, path
    return set(entry.options)


def _verdict(node: dict[str, Any], mountpoint: Path, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc = _cli_plain(node, "status", "--json")
        for status in json.loads(proc.stdout or "[]"):
            trust = status.get("stats", {}).get("trust") or {}
            if status["mountpoint"] == str(mountpoint) and trust.get("state") in (
                    "failed", "verified"):
                return dict(trust)
        time.sleep(0.5)
    raise AssertionError(f"no verdict for {mountpoint} within {timeout_s}s")


def _cli_plain(node: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=node["env"], capture_output=True, text=True,
                          timeout=60)


def _genuine(mountpoint: Path) -> None:
    """The tree the image really has: bin/su setuid root, etc/hello.txt plain, no evil-link."""
    assert (mountpoint / "bin/su").stat().st_mode & 0o7777 == 0o4755
    hello = (mountpoint / FORGED_FILE).stat()
    assert hello.st_mode & 0o7777 == 0o644
    assert not (mountpoint / EVIL_LINK).exists() and not (mountpoint / EVIL_LINK).is_symlink()
    assert (mountpoint / FORGED_FILE).read_bytes() == b"hello from the base layer\n"
    options = _options(mountpoint)
    assert "nosuid" not in options and "nodev" not in options


def test_the_attacker_of_item_1(rig: Rig, image: TestImage, ci: dict[str, Any],
                                node: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                                ) -> None:
    base = _attach(rig, image, ci, tmp_path_factory.mktemp("attacker") / "a", forge_meta=True)
    ref, pull_ref = ci["ref"], ci["pull_ref"]

    # By the image's reference: the (newest, forged) attached index is refused.
    for command, flags in (("mount-image", ()), ("mount", ("--blob", base))):
        proc, mountpoint = _mount(node, command, ref, *flags)
        line = one_error_line(proc)
        assert "is not bound to the image" in line and "--accept-unbound" in line
        assert "pull_ref" in line and "--trusted-key" in line
        assert mounted_at(mountpoint) is None

    # By pull_ref: the genuine index bound into the image; setuid intact, no opt-in.
    proc, merged = _mount(node, "mount-image", pull_ref)
    assert proc.returncode == 0, proc.stderr
    _genuine(merged)
    proc, single = _mount(node, "mount", pull_ref, "--blob", base)
    assert proc.returncode == 0, proc.stderr
    _genuine(single)
    assert "index   bound" in _cli_plain(node, "status").stdout

    # By the reference with the explicit opt-in: nosuid,nodev everywhere a process could exec
    # from (the overlay and the EROFS under it); reads fail once verification finds the lie.
    proc, merged = _mount(node, "mount-image", ref, "--accept-unbound")
    assert proc.returncode == 0, proc.stderr
    assert {"nosuid", "nodev"} <= _options(merged)
    image_dir = StatePaths.for_mountpoint(merged, root=node["tmp"] / "run").image_dir
    lowers = {Path(e.mountpoint).name: e for e in mounts_under(image_dir / "l")
              if e.fstype == "erofs"}
    # Each layer's EROFS is restricted until its own verification passes (the other three
    # may pass at once); the forged base layer's stays so.
    assert sorted(lowers) == ["0", "1", "2", "3"]
    assert {"nosuid", "nodev"} <= set(lowers["0"].options)
    verdict = _verdict(node, merged)
    assert verdict["state"] == "failed", verdict
    assert "does not match its layer" in verdict["detail"]
    with pytest.raises(OSError) as info:
        (merged / "usr/lib/libfoo.so.1").read_bytes()  # from the forged base layer
    assert info.value.errno == errno.EIO
    proc, single = _mount(node, "mount", ref, "--blob", base, "--accept-unbound")
    assert proc.returncode == 0, proc.stderr
    assert {"nosuid", "nodev"} <= _options(single)
    assert _verdict(node, single)["state"] == "failed"
    with pytest.raises(OSError) as info:
        (single / "usr/share/xattr.txt").read_bytes()
    assert info.value.errno == errno.EIO

    # `verify` proves it: the attached index fails, the bound one passes.
    assert _cli(node, "verify", ref).returncode == 1
    checked = _cli(node, "verify", pull_ref)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK, every indexed layer verified" in checked.stdout


def test_a_forged_zinfo_never_gives_bytes(rig: Rig, image: TestImage, ci: dict[str, Any],
                                          node: dict[str, Any],
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    base = _attach(rig, image, ci, tmp_path_factory.mktemp("attacker") / "z",
                   forge_meta=False, forge_zinfo_too=True, layer=1)  # 3 MiB: 3 checkpoints
    proc, mountpoint = _mount(node, "mount", ci["ref"], "--blob", base, "--accept-unbound")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]  # after the opt-in's note
    assert last.startswith("Error: ") and "uncompressed offset does not increase (0 -> 0)" in last
    assert mounted_at(mountpoint) is None


def test_a_signed_index_is_used_by_reference(rig: Rig, image: TestImage, ci: dict[str, Any],
                                             node: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = node["tmp"] / "cosign.key"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = node["tmp"] / "cosign.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    # CI signs what it pushes (the genuine artifact; the forged ones stay unsigned).
    proc = subprocess.run([*CLI, "index", ci["ref"], "--all-layers", "--platform",
                           "linux/amd64", "--min-layer-size", "0", "--span", "1MiB", "-o",
                           str(ci["dir"]), "--push", "--sign-key", str(private)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    proc, merged = _mount(node, "mount-image", ci["ref"], "--trusted-key", str(public))
    assert proc.returncode == 0, proc.stderr
    _genuine(merged)
    assert "index   signed" in _cli_plain(node, "status").stdout
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    stranger = node["tmp"] / "stranger.pub"
    stranger.write_bytes(other.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    proc, _ = _mount(node, "mount-image", ci["ref"], "--trusted-key", str(stranger))
    assert "is not bound to the image" in one_error_line(proc)
