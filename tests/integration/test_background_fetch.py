"""Background fetch on real mounts (root, kernel EROFS over FUSE): a layer from Debian's
docker-registry is fetched in full after the mount, verified, kept decoded, and a later mount
reads it without the registry; a blob that is not the one its index was accepted for (served
by our fault registry under the digest of another) fails every read with EIO and says so.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybrid_erofs.fetching.background import fetch_status
from hybrid_erofs.gzindex.sidecar import (
    load_sidecar,
    sha256_digest,
    sidecar_path,
    write_sidecar,
)
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.sources.cachedir import decoded_files
from hybrid_erofs.trust.binding import stamp_meta
from tests.conftest import ci_required
from tests.fault_registry import FaultRegistry
from tests.integration.conftest import require_fuse_and_erofs
from tests.mounting import daemons_for
from tests.registry_rig import Rig, missing_prerequisites

pytestmark = [pytest.mark.integration, pytest.mark.root]

CLI = [sys.executable, "-m", "hybrid_erofs"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_fuse_and_erofs()
    missing = missing_prerequisites()
    if missing:
        ci_required(f"real-registry tests need: {', '.join(missing)}")
    rig = Rig(tmp_path_factory.mktemp("fetch-rig"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    runtime = tmp_path / "run"
    values = {**os.environ, "HYBRID_EROFS_RUNTIME_DIR": str(runtime)}
    yield values
    for pid in daemons_for(runtime):  # a failed test must not leave its daemon
        subprocess.run([*CLI, "status", "--prune"], env=values, capture_output=True)
        os.kill(pid, 9)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def _status(env: dict[str, str]) -> dict[str, Any]:
    proc = _run(["status", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    return dict(entry)


def _fetch(stats: dict[str, Any], layer: int = 0) -> dict[str, Any]:
    """A layer's background fetch as `status --json` reports it (its metrics and details)."""
    entry = stats["layers"][layer]
    found = fetch_status(entry)
    return {} if found is None else {**found, "reason": entry.get("fetch_reason")}


def _wait_fetch(env: dict[str, str], *states: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        fetch = _fetch(_status(env)["stats"])
        if fetch.get("state") in states:
            return fetch
        assert time.monotonic() < deadline, f"background fetch still {fetch}"
        time.sleep(0.5)


def _index(blob: bytes, work: Path) -> tuple[Path, Path]:
    (work / "blob.tar.gz").write_bytes(blob)
    zinfo, meta = work / "layer.zinfo", work / "m.erofs"
    index_layer(str(work / "blob.tar.gz"), zinfo=zinfo, meta=meta, span=64 << 10)
    return zinfo, meta


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _expected(layer: Path) -> dict[str, str]:
    """What _files() finds in a mount of this layer file."""
    with tarfile.open(layer) as tar:
        return {m.name.removeprefix("./"): hashlib.sha256(
            tar.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
            for m in tar.getmembers() if m.isfile()}


def test_a_mounted_layer_is_fetched_verified_and_kept(rig: Rig, tmp_path: Path,
                                                       env: dict[str, str]) -> None:
    image = rig.images["amd64"]
    zinfo, meta = _index(image.layer, tmp_path)
    expected = _expected(tmp_path / "blob.tar.gz")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    ref = f"{rig.hosts['plain']}/lab/img:amd64"
    args = ["mount", "--via", "fuse", "--meta", str(meta), "--zinfo", str(zinfo),
            "--cache-dir", str(cache), "--fetch-delay", "0.5", ref, str(mnt)]
    proc = _run(args, env)
    assert proc.returncode == 0, proc.stderr
    try:
        fetch = _wait_fetch(env, "verified", "failed", "stopped")
        assert fetch["state"] == "verified", fetch
        assert fetch["complete"] and fetch["spans_local"] == fetch["spans_total"] > 4
        assert fetch["bytes_fetched"] > 0
        text = _run(["status"], env).stdout
        assert f"background fetch verified: {fetch['spans_total']}/{fetch['spans_total']} " \
               "spans local" in text
        assert _files(mnt) == expected
    finally:
        assert _run(["umount", str(mnt)], env).returncode == 0
    # Mounted again: complete and verified from the store, so the kernel reads the meta and
    # the stored layer data directly (no FUSE); the registry's blob is gone by now.
    blob_file = rig.blob_path("plain", image.layer_digest)
    blob_file.rename(blob_file.with_name("gone"))
    try:
        proc = _run(args, env)
        assert proc.returncode == 0, proc.stderr
        try:
            fetch = _wait_fetch(env, "verified", "failed", "stopped", timeout_s=20)
            assert fetch["state"] == "verified"
            assert _status(env)["via"] == "local"  # file-backed EROFS of the stored layer
            assert _files(mnt) == expected
        finally:
            assert _run(["umount", str(mnt)], env).returncode == 0
    finally:
        blob_file.with_name("gone").rename(blob_file)


def _decoded(cache: Path) -> list[Path]:
    """The layer stores' data files in a cache (one per blob and index)."""
    return [blob / name for blob in cache.glob("chunks-v1/sha256/*") for name in decoded_files(blob)]


def test_no_background_fetch_leaves_the_layer_lazy(rig: Rig, tmp_path: Path,
                                                   env: dict[str, str]) -> None:
    image = rig.images["amd64"]
    zinfo, meta = _index(image.layer, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _run(["mount", "--via", "fuse", "--meta", str(meta), "--zinfo", str(zinfo),
                 "--cache-dir", str(tmp_path / "cache"), "--no-background-fetch",
                 "--fetch-delay", "0", f"{rig.hosts['plain']}/lab/img:amd64", str(mnt)], env)
    assert proc.returncode == 0, proc.stderr
    try:
        time.sleep(3)
        stats = _status(env)["stats"]
        assert _fetch(stats) == {} and stats["bytes_fetched"] < len(image.layer)
        # A full read decodes every span, and writes none of it to the layer store: without
        # background fetch the layer stays lazy (only its compressed chunks are cached).
        assert _files(mnt) == _expected(tmp_path / "blob.tar.gz")
        stored = _decoded(tmp_path / "cache")
        assert len(stored) == 1 and stored[0].stat().st_blocks == 0
    finally:
        assert _run(["umount", str(mnt)], env).returncode == 0


def test_serve_reads_keep_only_compressed_chunks(rig: Rig, tmp_path: Path,
                                                 env: dict[str, str]) -> None:
    """`serve` has no background fetch, so like `mount --no-background-fetch` it stores no
    decoded spans: the whole device read through its FUSE file is the meta followed by the
    layer's tar, and the blob's layer store stays empty."""
    image = rig.images["amd64"]
    zinfo, meta = _index(image.layer, tmp_path)
    fuse_dir = tmp_path / "fuse"
    with open(tmp_path / "serve.err", "w") as err:
        proc = subprocess.Popen([*CLI, "serve", "--meta", str(meta), "--zinfo", str(zinfo),
                                 "--cache-dir", str(tmp_path / "cache"), "--fuse",
                                 str(fuse_dir), f"{rig.hosts['plain']}/lab/img:amd64"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (fuse_dir / "disk.img").is_file():
            assert proc.poll() is None, (tmp_path / "serve.err").read_text()
            assert time.monotonic() < deadline, "serve did not export its FUSE file"
            time.sleep(0.05)
        disk = (fuse_dir / "disk.img").read_bytes()
        assert disk == meta.read_bytes() + gzip.decompress(image.layer)
        stored = _decoded(tmp_path / "cache")
        assert all(path.stat().st_blocks == 0 for path in stored), stored
    finally:
        proc.send_signal(15)
        assert proc.wait(20) == 0, (tmp_path / "serve.err").read_text()


def test_a_blob_that_is_not_what_its_index_was_accepted_for_fails_every_read(
        rig: Rig, tmp_path: Path, env: dict[str, str]) -> None:
    """The registry serves other bytes under the layer's digest (its gzip header's OS byte
    flipped: still valid gzip of the same tar), and the index was made from those bytes with
    every claim rewritten for that digest (an unbound index accepted as is). The binding
    checks pass and every span matches the index, so reads work, until the complete blob is
    hashed: then EIO, in status and in the log."""
    blob = rig.images["amd64"].layer
    registry = FaultRegistry(blob, token_auth=False)
    try:
        registry.tamper(9)  # RFC 1952 §2.3: OS, a byte no reader checks
        served = bytearray(blob)
        served[9] ^= 0xFF
        assert gzip.decompress(bytes(served)) == gzip.decompress(blob)
        zinfo, meta = _index(bytes(served), tmp_path)
        # Every claim rewritten for the real digest: the meta's blob tag and the sidecar's
        # blob and meta digests (what anyone can do with an index nothing binds to the image).
        meta.write_bytes(stamp_meta(meta.read_bytes(), registry.layer_digest))
        side_path = sidecar_path(zinfo)
        side = load_sidecar(side_path)
        write_sidecar(dataclasses.replace(
            side, blob_digest=registry.layer_digest, meta_digest=sha256_digest(meta.read_bytes()),
            meta_size=meta.stat().st_size), side_path)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        proc = _run(["mount", "--via", "fuse", "--meta", str(meta), "--zinfo", str(zinfo),
                     "--cache-dir", str(tmp_path / "cache"), "--fetch-delay", "2",
                     registry.ref, str(mnt)], env)
        assert proc.returncode == 0, proc.stderr
        try:
            names = sorted(p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink())
            assert names and names[0].read_bytes() is not None  # lazily readable at first
            fetch = _wait_fetch(env, "verified", "failed", "stopped")
            assert fetch["state"] == "failed", fetch
            assert hashlib.sha256(served).hexdigest() in fetch["reason"]
            # No drop_caches here: the daemon drops the pages it had served already.
            errors = set()
            for name in names:
                try:
                    name.read_bytes()
                except OSError as exc:
                    errors.add(exc.errno)
            assert errors == {errno.EIO}
            entry = _status(env)
            assert entry["stats"]["trust"]["state"] == "failed"  # the mount's gate (issue 14)
            assert entry["stats"]["index_verification_failed"] == 1  # in the metrics too
            assert "failed verification" in Path(entry["log_file"]).read_text()
        finally:
            assert _run(["umount", str(mnt)], env).returncode == 0
    finally:
        registry.close()


def _span_ranges(zinfo: Path, blob_size: int) -> list[tuple[int, int]]:
    """(first, last) compressed byte of each span."""
    from hybrid_erofs.gzindex.format import parse_index

    checkpoints = parse_index(zinfo.read_bytes(), name="zinfo", blob_size=blob_size).checkpoints
    ends = [cp.in_offset for cp in checkpoints[1:]] + [blob_size]
    return [(cp.in_offset, end - 1) for cp, end in zip(checkpoints, ends, strict=True)]


def test_a_recorded_profile_is_fetched_first_by_the_next_mount(
        rig: Rig, tmp_path: Path, env: dict[str, str]) -> None:
    blob = rig.images["amd64"].layer
    registry = FaultRegistry(blob, token_auth=False, diff_ids=True)
    try:
        index_dir = tmp_path / "idx"
        proc = _run(["index", registry.ref, "--all-layers", "-o", str(index_dir), "--span",
                     "64KiB", "--min-layer-size", "0"], env)
        assert proc.returncode == 0, proc.stderr
        # Read the small file and 8 KiB from the middle of the big one.
        command = ["sh", "-c", 'cat "$ROOTFS/etc/hello.txt" >/dev/null && dd status=none '
                   'if="$ROOTFS/data/random.bin" bs=4096 skip=400 count=2 of=/dev/null']
        proc = _run(["profile", registry.ref, "--index-dir", str(index_dir),
                     "--cache-dir", str(tmp_path / "cache-profile"), "--", *command], env)
        assert proc.returncode == 0, proc.stderr
        assert "spans -> sha256-" in proc.stdout
        [profile_file] = index_dir.glob("sha256-*.prefetch.json")
        profile = json.loads(profile_file.read_text())
        spans = profile["spans"]
        index = json.loads((index_dir / "index.json").read_text())
        [layer] = index["images"][0]["layers"]
        assert layer["files"]["prefetch"]["digest"] == \
            "sha256:" + hashlib.sha256(profile_file.read_bytes()).hexdigest()
        zinfo = index_dir / layer["files"]["zinfo"]["name"]
        ranges = _span_ranges(zinfo, len(blob))
        assert 2 <= len(spans) < len(ranges) // 2

        registry.reset_counters()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        proc = _run(["mount-image", "--via", "fuse", "--index-dir", str(index_dir),
                     "--cache-dir", str(tmp_path / "cache"), "--fetch-delay", "60",
                     registry.ref, str(mnt)], env)
        assert proc.returncode == 0, proc.stderr
        try:
            deadline = time.monotonic() + 30
            while True:
                stats = _status(env)["stats"]
                fetch = _fetch(stats)
                if fetch["state"] != "prefetching" and fetch["spans_local"]:
                    break
                assert time.monotonic() < deadline, (fetch, Path(
                    _status(env)["log_file"]).read_text()[-3000:])
                time.sleep(0.2)
            asked = list(registry.blob_ranges)
            assert fetch["state"] == "waiting"  # the rest waits for its quiet period
            assert fetch["spans_local"] >= len(spans)
            assert stats["reads"] <= 2  # only the mount's own (metadata is local)
        finally:
            assert _run(["umount", str(mnt)], env).returncode == 0

        def touched(first: int, last: int) -> set[int]:
            return {n for n, (a, b) in enumerate(ranges) if a <= last and b >= first}

        # The registry's request log: the first requests are for the profile's first spans
        # (two workers: one of the first two), and every profile span was asked for before
        # the quiet period ended.
        assert asked
        assert touched(*asked[0]) & set(spans[:2])
        covered = set().union(*(touched(a, b) for a, b in asked))
        assert set(spans) <= covered
    finally:
        registry.close()


def test_a_failing_command_records_no_profile(rig: Rig, tmp_path: Path,
                                              env: dict[str, str]) -> None:
    registry = FaultRegistry(rig.images["amd64"].layer, token_auth=False, diff_ids=True)
    try:
        index_dir = tmp_path / "idx"
        proc = _run(["index", registry.ref, "--all-layers", "-o", str(index_dir), "--span",
                     "64KiB", "--min-layer-size", "0"], env)
        assert proc.returncode == 0, proc.stderr
        before = (index_dir / "index.json").read_bytes()
        for command, message in ((["false"], "profile: false exited with status 1; no profile "
                                  "written"),
                                 (["/nonexistent/cmd"], "profile: /nonexistent/cmd: command "
                                  "not found")):
            proc = _run(["profile", registry.ref, "--index-dir", str(index_dir), "--cache-dir",
                         str(tmp_path / "cache"), "--", *command], env)
            assert proc.returncode == 1
            assert proc.stderr.strip().splitlines()[-1] == f"Error: {message}"
            assert "Traceback" not in proc.stderr
        assert (index_dir / "index.json").read_bytes() == before
        assert not list(index_dir.glob("*.prefetch.json"))
        assert not daemons_for(tmp_path / "run")
    finally:
        registry.close()
