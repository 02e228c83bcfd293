"""Fixtures shared by the integration tests: the real registries on loopback, the EROFS kernel
prerequisites, the tar corpus, and a check that no test leaves a loop device behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _load_tool, ci_required, require_oracle
from tests.mounting import losetup_entries
from tests.registry_rig import Rig, missing_prerequisites


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """docker-registry processes (plain, basic, token, redirect) with images pushed by skopeo."""
    missing = missing_prerequisites()
    if missing:
        ci_required(f"real-registry tests need: {', '.join(missing)} "
                    "(apt-get install docker-registry skopeo apache2-utils)")
    rig = Rig(tmp_path_factory.mktemp("registry-rig"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


def erofs_in_kernel() -> bool:
    try:
        if "erofs" in Path("/proc/filesystems").read_text():
            return True
    except OSError:
        return False
    subprocess.run(["modprobe", "erofs"], capture_output=True)
    return "erofs" in Path("/proc/filesystems").read_text()


def require_kernel_erofs(*tools: str) -> None:
    """Root, the kernel's EROFS and the named oracle tools: fail on CI, skip elsewhere."""
    if os.geteuid() != 0:
        ci_required("kernel EROFS mounts need root")
    require_oracle(*tools)
    if not erofs_in_kernel():
        ci_required("the kernel has no erofs filesystem")


def require_fuse_and_erofs() -> None:
    """Root, /dev/fuse, mfusepy on libfuse3 and the kernel's EROFS: fail on CI, skip elsewhere."""
    from hybrid_erofs.export.fuse import ExportError, load_mfusepy

    require_kernel_erofs()
    if not os.path.exists("/dev/fuse"):
        ci_required("/dev/fuse is missing (FUSE not available)")
    try:
        load_mfusepy()
    except ExportError as exc:
        ci_required(str(exc))


@pytest.fixture(autouse=True)
def no_leaked_loop_devices() -> Iterator[None]:
    before = losetup_entries() if shutil.which("losetup") else []
    yield
    if shutil.which("losetup"):
        assert losetup_entries() == before


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tar corpus of tools/make_tar_corpus.py (every tar feature the writer handles)."""
    outdir = tmp_path_factory.mktemp("tar-corpus")
    _load_tool("make_tar_corpus").write_corpus(outdir)
    return outdir
