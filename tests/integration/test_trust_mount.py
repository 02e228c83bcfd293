"""The mount daemon's trust switch, as root with the kernel's EROFS on FUSE: a layer whose index
is unbound is mounted nosuid,nodev and verified against the whole layer in the background; a
forged index then fails every further read with EIO (status and the log say why), a genuine
one gets nosuid,nodev lifted. Issue 14 item 2: a meta of another layer without a sidecar is
refused by `mount` in one line naming both digests."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.gzindex.sidecar import sidecar_path
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.mounting.kernel import mounted_at
from hybrid_erofs.mounting.layer import mount_layer
from hybrid_erofs.mounting.lifecycle import mount_statuses, unmount
from hybrid_erofs.mounting.state import RUNTIME_ENV
from hybrid_erofs.sources.gate import UNBOUND
from tests.forgery import EVIL_LINK, forge_index
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for, one_error_line

pytestmark = [pytest.mark.integration, pytest.mark.root]

CLI = [sys.executable, "-m", "hybrid_erofs"]


def _noise(seed: str, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{len(out)}".encode()).digest()
    return bytes(out[:size])


def layer_tar(seed: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in (("usr/bin/tool", _noise(seed, 300_000), 0o755),
                                 ("usr/bin/su", b"#!/bin/true\n", 0o4755),
                                 ("etc/motd", f"{seed}\n".encode(), 0o644),
                                 ("usr/lib/data", _noise(seed + "d", 200_000), 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid = len(data), mode, 1700000000, 1000
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    require_fuse_and_erofs()
    path = tmp_path / "run"
    monkeypatch.setenv(RUNTIME_ENV, str(path))
    yield path
    for status in mount_statuses():
        unmount(status.record.mountpoint, lazy=True)
    assert daemons_for(path) == []


def _blob(path: Path, seed: str) -> Path:
    path.write_bytes(gzip.compress(layer_tar(seed), mtime=0))
    return path


def options_of(mountpoint: Path) -> tuple[str, ...]:
    entry = mounted_at(mountpoint)
    assert entry is not None, f"{mountpoint} is not mounted"
    return entry.options


def wait_for_verdict(mountpoint: Path, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for status in mount_statuses():
            trust = status.stats.get("trust", {})
            if status.record.mountpoint == str(mountpoint) and trust.get("state") in (
                    "verified", "failed"):
                return dict(trust)
        time.sleep(0.2)
    raise AssertionError(f"{mountpoint}: no verdict within {timeout_s}s")


def test_a_forged_unbound_index_is_restricted_then_fails_reads(runtime: Path,
                                                               tmp_path: Path) -> None:
    blob = _blob(tmp_path / "layer.tar.gz", "genuine")
    forged = forge_index(blob, layer_tar("genuine"), tmp_path / "forged")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_layer(str(blob), mnt, meta=forged.meta, zinfo=forged.zinfo, trust=UNBOUND)
    try:
        assert {"nosuid", "nodev"} <= set(options_of(mnt))
        # The forged tree shows (that is the opt-in) but nothing in it can gain privileges.
        assert (mnt / EVIL_LINK).is_symlink()
        verdict = wait_for_verdict(mnt)
        assert verdict["state"] == "failed" and verdict["index"] == "unbound"
        assert f"/{EVIL_LINK}: in the meta but not in the layer" in verdict["detail"]
        with pytest.raises(OSError) as info:
            (mnt / "usr/lib/data").read_bytes()
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError):
            (mnt / forged.setuid_file).read_bytes()  # read before? dropped from the cache
        status = subprocess.run([*CLI, "status"], capture_output=True, text=True,
                                env={**os.environ, RUNTIME_ENV: str(runtime)})
        assert "index   unbound, failed: " in status.stdout
        log = next(runtime.rglob("*.log")).read_text()
        assert "every further read fails with EIO" in log
    finally:
        unmount(mnt, lazy=True)


def test_a_genuine_unbound_index_is_verified_and_unrestricted(runtime: Path,
                                                              tmp_path: Path) -> None:
    blob = _blob(tmp_path / "layer.tar.gz", "genuine")
    zinfo, meta = tmp_path / "l.zinfo", tmp_path / "m.erofs"
    index_layer(str(blob), zinfo=zinfo, meta=meta, root_owner=(0, 0))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_layer(str(blob), mnt, meta=meta, zinfo=zinfo, trust=UNBOUND)
    try:
        verdict = wait_for_verdict(mnt)
        assert verdict["state"] == "verified", verdict
        options = options_of(mnt)
        assert "nosuid" not in options and "nodev" not in options
        assert (mnt / "usr/bin/su").stat().st_mode & 0o7777 == 0o4755
        assert (mnt / "usr/lib/data").read_bytes() == _noise("genuined", 200_000)
    finally:
        unmount(mnt, lazy=True)


def test_a_meta_of_another_layer_without_a_sidecar_is_refused(runtime: Path,
                                                               tmp_path: Path) -> None:
    one, two = _blob(tmp_path / "one.tar.gz", "one"), _blob(tmp_path / "two.tar.gz", "second")
    index_layer(str(one), zinfo=tmp_path / "one.zinfo", meta=tmp_path / "one.erofs")
    index_layer(str(two), zinfo=tmp_path / "two.zinfo", meta=tmp_path / "two.erofs")
    sidecar_path(tmp_path / "one.zinfo").unlink()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        [*CLI, "mount", "--meta", str(tmp_path / "two.erofs"), "--zinfo",
         str(tmp_path / "one.zinfo"), str(one), str(mnt)],
        capture_output=True, text=True, env={**os.environ, RUNTIME_ENV: str(runtime)})
    digest = "sha256:" + hashlib.sha256(two.read_bytes()).hexdigest()
    assert f"this meta was built for another layer (blob {digest})" in one_error_line(result)
    assert mounted_at(mnt) is None
