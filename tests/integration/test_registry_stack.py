"""The whole read stack against real registries: `index REF` streams a layer once, then
RegistryBlobSource -> RetrySource -> ChunkCacheSource -> VerifiedSource -> GzipSource reads
equal local decompression, and a second reader is served from the chunk cache."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import pytest

from hybrid_erofs.device import (
    RegistryOptions,
    open_device,
    open_gzip_layer,
    open_layer,
    open_registry_layer_blob,
)
from hybrid_erofs.errors import HybridErofsError, InvalidInput
from hybrid_erofs.gzindex.build import build_index
from hybrid_erofs.gzindex.format import dump_index
from hybrid_erofs.indexing.layer import index_layer
from hybrid_erofs.sources.chunkcache import ChunkCacheSource
from tests.registry_rig import USER, Rig

pytestmark = pytest.mark.integration


def _reads(source: object, plain: bytes, seed: int = 1, count: int = 60) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        offset = rng.randrange(len(plain))
        length = min(rng.randrange(1, 300_000), len(plain) - offset)
        assert source.pread(length, offset) == plain[offset : offset + length]  # type: ignore[attr-defined]


@pytest.mark.parametrize("registry", ["plain", "basic", "token", "redir"])
def test_index_ref_then_lazy_reads(rig: Rig, tmp_path: Path, registry: str) -> None:
    image = rig.images["amd64"]
    ref = f"{rig.hosts[registry]}/lab/img:multi" if registry != "plain" else \
        f"{rig.hosts['plain']}/lab/img:amd64"
    options = RegistryOptions(platform="linux/amd64", cache_dir=tmp_path / "cache",
                              username=USER[0] if registry != "plain" else None,
                              password=USER[1] if registry != "plain" else None)
    zinfo, meta = tmp_path / "layer.zinfo", tmp_path / "m.erofs"
    report = index_layer(ref, zinfo=zinfo, meta=meta, span=1 << 20, registry=options)
    assert report.blob_digest == image.layer_digest
    # The streamed index equals an index of the local bytes.
    local = build_index(io.BytesIO(image.layer), span=1 << 20)
    assert zinfo.read_bytes() == dump_index(local.index)
    side = json.loads((tmp_path / "layer.zinfo.json").read_text())
    assert side["blob"]["digest"] == image.layer_digest
    plain = gzip.decompress(image.layer)
    source = open_layer(ref, zinfo=zinfo, registry=options)
    try:
        assert source.size == len(plain)
        _reads(source, plain)
    finally:
        source.close()
    device = open_device(ref, meta=meta, zinfo=zinfo, registry=options)
    try:
        assert device.pread(512, meta.stat().st_size) == plain[:512]  # the tar after the meta
    finally:
        device.close()


def test_second_reader_is_served_from_the_cache(rig: Rig, tmp_path: Path) -> None:
    image = rig.images["amd64"]
    ref = f"{rig.hosts['plain']}/lab/img:amd64"
    options = RegistryOptions(cache_dir=tmp_path / "cache")
    zinfo = tmp_path / "layer.zinfo"
    index_layer(ref, zinfo=zinfo, meta=None, span=1 << 20, registry=options)
    plain = gzip.decompress(image.layer)
    fetched = []
    for _ in range(2):
        blob, digest = open_registry_layer_blob(ref, options)
        assert isinstance(blob, ChunkCacheSource)
        source = open_gzip_layer(blob, zinfo=zinfo, name=ref, blob_digest=digest)
        try:
            _reads(source, plain, seed=7, count=30)
            fetched.append(blob.stats.bytes_fetched)
        finally:
            source.close()
    assert fetched[0] > 0
    assert fetched[1] == 0  # everything came from the on-disk cache


def test_zinfo_of_another_layer_is_refused(rig: Rig, tmp_path: Path) -> None:
    other = rig.images["arm64"]
    zinfo = tmp_path / "other.zinfo"
    layer = tmp_path / "other.tar.gz"
    layer.write_bytes(other.layer)
    index_layer(str(layer), zinfo=zinfo, meta=None)
    ref = f"{rig.hosts['plain']}/lab/img:amd64"
    with pytest.raises(InvalidInput, match="not the layer .* was built for"):
        open_layer(ref, zinfo=zinfo, registry=RegistryOptions(cache_dir=tmp_path / "c"))


def test_index_ref_cli_reads_the_password_from_stdin(rig: Rig, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hybrid_erofs.cli import main

    ref = f"{rig.hosts['basic']}/lab/img:multi"
    result = CliRunner().invoke(main, [
        "index", ref, "--platform", "linux/arm64", "--username", USER[0], "--password-stdin",
        "-o", str(tmp_path / "l.zinfo"), "--meta", str(tmp_path / "m.erofs"), "--json",
    ], input=USER[1] + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["blob"]["digest"] == rig.images["arm64"].layer_digest
    assert USER[1] not in result.output
    result = CliRunner().invoke(main, [
        "index", ref, "-o", str(tmp_path / "x.zinfo"), "--platform", "linux/arm64"])
    assert result.exit_code == 1 and USER[1] not in result.output
    assert not (tmp_path / "x.zinfo").exists()


def test_docker_config_with_a_credential_helper(rig: Rig, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # ~/.docker/config.json names a helper; the docker-credential-* protocol gives the secret.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-rigtest"
    helper.write_text("#!/bin/sh\nread host\n"
                      f"printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER[0]}\","
                      f"\"Secret\":\"{USER[1]}\"}}' \"$host\"\n")
    helper.chmod(0o755)
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"credHelpers": {rig.hosts["token"]: "rigtest"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    ref = f"{rig.hosts['token']}/lab/img:multi"
    options = RegistryOptions(platform="linux/amd64", cache_dir=tmp_path / "cache")
    zinfo = tmp_path / "layer.zinfo"
    index_layer(ref, zinfo=zinfo, meta=None, span=1 << 20, registry=options)
    plain = gzip.decompress(rig.images["amd64"].layer)
    # Without the helper the same reference is refused: the helper really was used.
    (config / "config.json").write_text("{}")
    with pytest.raises(HybridErofsError):
        index_layer(ref, zinfo=tmp_path / "anon.zinfo", meta=None, registry=options)
    (config / "config.json").write_text(json.dumps({"credHelpers": {rig.hosts["token"]: "rigtest"}}))
    source = open_layer(ref, zinfo=zinfo, registry=options)
    try:
        _reads(source, plain, seed=3, count=20)
    finally:
        source.close()
