"""Image metadata and validation (oci/image.py) and OCI image layouts as sources (oci/layout.py):
layouts written in the test, no network."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.device import RegistryOptions, is_local, open_registry_layer_blob
from hybrid_erofs.errors import InvalidReference, RegistryError
from hybrid_erofs.oci.client import OCI_CONFIG, Descriptor, RegistryClient
from hybrid_erofs.oci.image import inspect_image, parse_image_config
from hybrid_erofs.oci.layout import LayoutClient, LayoutReference, parse_layout_reference
from hybrid_erofs.source import FileSource
from tests.registry_rig import GZIP_LAYER, OCI_INDEX, OCI_MANIFEST, Image, Layout, _layer

AMD64 = Image("linux/amd64", _layer(1, 40_000))
ARM64 = Image("linux/arm64/v8", _layer(2, 30_000))


def _diff_id(layer: bytes) -> str:
    return "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()


def _image(layout: Layout, layers: list[bytes], *, config: dict[str, object] | None = None,
           config_type: str = OCI_CONFIG) -> dict[str, object]:
    """Write a manifest with `layers` and `config` (default: a valid one) and return its
    descriptor."""
    if config is None:
        config = {"os": "linux", "architecture": "amd64",
                  "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"],
                             "Env": ["PATH=/usr/bin", "MODE=test"], "WorkingDir": "/srv",
                             "User": "1000:1000", "Labels": {"a": "b"}},
                  "rootfs": {"type": "layers", "diff_ids": [_diff_id(x) for x in layers]}}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": layout.blob(json.dumps(config).encode(), config_type),
                "layers": [layout.blob(x, GZIP_LAYER) for x in layers]}
    return layout.blob(json.dumps(manifest).encode(), OCI_MANIFEST)


@pytest.fixture()
def layout(tmp_path: Path) -> Layout:
    """Tags: app (one manifest, two layers), amd64, arm64, multi (an index of both)."""
    layout = Layout(tmp_path / "layout")
    layout.tag("app", _image(layout, [AMD64.layer, ARM64.layer]))
    entries = []
    for name, image in (("amd64", AMD64), ("arm64", ARM64)):
        descriptor = layout.image(image)
        layout.tag(name, descriptor)
        entries.append(descriptor)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    layout.tag("multi", layout.blob(index.encode(), OCI_INDEX))
    return layout


@pytest.mark.parametrize(("text", "expected"), [
    ("oci:/a/b", LayoutReference(Path("/a/b"))),
    ("oci:/a/b:", LayoutReference(Path("/a/b"))),
    ("oci:rel/dir:v1.0", LayoutReference(Path("rel/dir"), "v1.0")),
], ids=["no-tag", "empty-tag", "relative-with-tag"])
def test_parse_layout_reference(text: str, expected: LayoutReference) -> None:
    assert parse_layout_reference(text) == expected
    assert not is_local(text)


@pytest.mark.parametrize("text", ["oci:", "oci::tag", "docker://x"])
def test_parse_layout_reference_rejects(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_layout_reference(text)


def test_inspect_layout_by_tag(layout: Layout) -> None:
    ref = f"oci:{layout.root}:app"
    info = inspect_image(LayoutClient(ref), ref)
    assert info.config.entrypoint == ("/bin/app",) and info.config.cmd == ("--serve",)
    assert info.config.env == ("PATH=/usr/bin", "MODE=test")
    assert (info.config.working_dir, info.config.user) == ("/srv", "1000:1000")
    assert info.config.diff_ids == (_diff_id(AMD64.layer), _diff_id(ARM64.layer))
    assert [d.digest for d in info.layers] == [AMD64.layer_digest, ARM64.layer_digest]
    assert [d.size for d in info.layers] == [len(AMD64.layer), len(ARM64.layer)]
    assert {d.media_type for d in info.layers} == {GZIP_LAYER}
    assert info.to_json()["layers"][1]["layer"]["digest"] == _diff_id(ARM64.layer)  # type: ignore[index]


@pytest.mark.parametrize(("tag", "platform", "image"), [
    ("multi", "linux/arm64", ARM64), ("multi", "linux/amd64", AMD64),
    ("arm64", None, ARM64), ("amd64", "linux/arm64", AMD64),  # a plain manifest ignores it
], ids=["index-arm64", "index-amd64", "tag-arm64", "manifest-ignores-platform"])
def test_layout_resolves_tag_and_platform(layout: Layout, tag: str, platform: str | None,
                                          image: Image) -> None:
    client = LayoutClient(f"oci:{layout.root}:{tag}")
    assert client.resolve(platform).digest == image.manifest_digest
    descriptor = client.layer_descriptor(platform=platform)
    assert descriptor == Descriptor(GZIP_LAYER, image.layer_digest, len(image.layer))
    source = client.open_blob(descriptor)
    try:
        assert source.pread(source.size, 0) == image.layer
    finally:
        source.close()


def test_layout_one_tag_on_several_platform_manifests(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "l")
    layout.tag("v1", layout.image(AMD64))
    arm = layout.image(ARM64)
    layout.tag("v1", arm)
    # Layout.tag drops `platform`; put it back on the arm64 entry to choose by it.
    index = json.loads((layout.root / "index.json").read_text())
    index["manifests"][1]["platform"] = arm["platform"]
    (layout.root / "index.json").write_text(json.dumps(index))
    client = LayoutClient(f"oci:{layout.root}:v1")
    assert client.resolve("linux/arm64").digest == ARM64.manifest_digest


def test_layout_without_tag(layout: Layout, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"index.json has 4 entries; name one as "
                                            r"oci:DIR:TAG \(tags: app, amd64, arm64, multi\)"):
        LayoutClient(f"oci:{layout.root}").resolve()
    single = Layout(tmp_path / "single")
    single.tag("only", single.image(AMD64))
    assert LayoutClient(f"oci:{single.root}").resolve().digest == AMD64.manifest_digest


@pytest.mark.parametrize(("ref", "message"), [
    ("{root}:nope", r"no tag 'nope' in index.json \(tags: app, amd64, arm64, multi\)"),
    ("{root}/missing:app", "not an OCI image layout"),
    ("{root}:multi", "no manifest for platform linux/s390x"),
], ids=["unknown-tag", "not-a-layout", "no-platform"])
def test_layout_errors(layout: Layout, ref: str, message: str) -> None:
    client = LayoutClient("oci:" + ref.format(root=layout.root))
    with pytest.raises(RegistryError, match=message):
        client.resolve("linux/s390x")


def test_layout_refuses_tampered_blobs(layout: Layout) -> None:
    client = LayoutClient(f"oci:{layout.root}:arm64")
    descriptor = client.layer_descriptor()
    manifest_path = client.blob_path(ARM64.manifest_digest)
    blob_path = client.blob_path(descriptor.digest)
    blob_path.write_bytes(blob_path.read_bytes() + b"x")
    with pytest.raises(RegistryError, match=f"has {descriptor.size + 1} bytes, the manifest "
                                            f"says {descriptor.size}"):
        client.open_blob(descriptor)
    manifest_path.write_bytes(manifest_path.read_bytes().replace(b'"layers"', b'"layers" '))
    with pytest.raises(RegistryError, match=f"manifest digest mismatch: expected "
                                            f"{ARM64.manifest_digest}"):
        client.resolve()


def _broken(layout: Layout, **changes: object) -> tuple[str, str, str]:
    """Tag a one-layer image whose config gets `changes`; return its ref, manifest digest and
    config digest."""
    config: dict[str, object] = {"os": "linux", "architecture": "amd64",
                                 "rootfs": {"type": "layers", "diff_ids": [_diff_id(AMD64.layer)]}}
    config_type = str(changes.pop("config_type", OCI_CONFIG))
    config.update(changes)
    descriptor = _image(layout, [AMD64.layer], config=config, config_type=config_type)
    layout.tag("broken", descriptor)
    body = json.loads(LayoutClient(f"oci:{layout.root}:broken").blob_path(
        str(descriptor["digest"])).read_bytes())
    return f"oci:{layout.root}:broken", str(descriptor["digest"]), str(body["config"]["digest"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"config_type": "application/vnd.cncf.helm.config.v1+json"},
     "has media type 'application/vnd.cncf.helm.config.v1+json', not an image config"),
    ({"rootfs": {"type": "snapshot", "diff_ids": []}}, "rootfs.type is 'snapshot', not 'layers'"),
    ({"rootfs": {"diff_ids": []}}, "rootfs.type is None, not 'layers'"),
    ({"rootfs": {"type": "layers", "diff_ids": []}}, "config lists 0 diff_ids but manifest"),
    ({"config": {"Cmd": "sh -c x"}}, "config config.Cmd is not a list of strings"),
], ids=["artifact-config", "rootfs-type", "rootfs-missing", "diff-id-count", "cmd-string"])
def test_malformed_images_are_refused(layout: Layout, changes: dict[str, object],
                                      message: str) -> None:
    ref, manifest_digest, config_digest = _broken(layout, **changes)
    with pytest.raises(RegistryError, match=re.escape(message)) as caught:
        inspect_image(LayoutClient(ref), ref)
    text = str(caught.value)
    assert "\n" not in text and text.split(": ")[0] in (manifest_digest, config_digest)


def test_config_digest_mismatch_is_refused(layout: Layout) -> None:
    ref, _, config_digest = _broken(layout)
    path = LayoutClient(ref).blob_path(config_digest)
    path.write_bytes(path.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(RegistryError, match=f"^{config_digest}: blob digest mismatch"):
        inspect_image(LayoutClient(ref), ref)


def test_parse_image_config_defaults() -> None:
    config = parse_image_config(b'{"rootfs": {"type": "layers", "diff_ids": []}}',
                                digest="sha256:" + "0" * 64)
    assert config.entrypoint is None and config.cmd is None and config.env == ()
    assert config.os == "" and config.diff_ids == ()


def _serve(layout: Layout) -> httpx.MockTransport:
    """A registry over `layout`: tags from index.json, manifests and blobs by digest."""
    index = json.loads((layout.root / "index.json").read_text())
    tags = {e["annotations"]["org.opencontainers.image.ref.name"]: e for e in index["manifests"]}

    def handler(request: httpx.Request) -> httpx.Response:
        kind, ref = request.url.path.split("/")[-2:]
        entry = tags.get(ref)
        digest = entry["digest"] if entry else ref
        path = layout.root / "blobs" / "sha256" / digest.split(":")[1]
        if not path.exists():
            return httpx.Response(404)
        body = path.read_bytes()
        if kind == "manifests":
            media_type = json.loads(body)["mediaType"]
            return httpx.Response(200, content=body, headers={"Content-Type": media_type})
        return httpx.Response(200, content=body)

    return httpx.MockTransport(handler)


def test_registry_client_inspects_like_the_layout(layout: Layout) -> None:
    with RegistryClient("r.test/lab/img:multi", transport=_serve(layout)) as client:
        remote = inspect_image(client, "r.test/lab/img:multi", "linux/arm64")
    ref = f"oci:{layout.root}:multi"
    local = inspect_image(LayoutClient(ref), ref, "linux/arm64")
    assert remote.manifest_digest == local.manifest_digest == ARM64.manifest_digest
    assert (remote.config, remote.layers) == (local.config, local.layers)
    assert remote.config.variant == "v8" and remote.config.architecture == "arm64"


def test_registry_client_refuses_a_config_of_the_wrong_digest(layout: Layout) -> None:
    ref, _, config_digest = _broken(layout)
    path = LayoutClient(ref).blob_path(config_digest)
    path.write_bytes(path.read_bytes() + b" ")
    with (RegistryClient("r.test/lab/img:broken", transport=_serve(layout)) as client,
          pytest.raises(RegistryError, match=f"^{config_digest}: blob size mismatch")):
        inspect_image(client, "r.test/lab/img:broken")


def test_device_opens_layout_blobs_as_files(layout: Layout) -> None:
    source, digest = open_registry_layer_blob(f"oci:{layout.root}:multi",
                                              RegistryOptions(platform="linux/arm64"))
    try:
        assert isinstance(source, FileSource)  # no retry or chunk cache over a local file
        assert digest == ARM64.layer_digest
        assert source.pread(source.size, 0) == ARM64.layer
    finally:
        source.close()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_cli_inspect_layout(layout: Layout) -> None:
    code, out = run("inspect", f"oci:{layout.root}:multi", "--platform", "linux/arm64", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["manifest"]["digest"] == ARM64.manifest_digest
    assert data["layers"] == [{"blob": {"digest": ARM64.layer_digest, "mediaType": GZIP_LAYER,
                                        "size": len(ARM64.layer)},
                               "layer": {"digest": _diff_id(ARM64.layer)}}]
    code, out = run("inspect", f"oci:{layout.root}:app")
    assert code == 0 and '  entrypoint: ["/bin/app"]' in out and "2 layers" in out
    _broken(layout, rootfs={"type": "layers", "diff_ids": []})
    code, out = run("inspect", f"oci:{layout.root}:broken")
    assert code == 1 and out.startswith("Error: sha256:") and out.count("\n") == 1


def test_cli_index_layout_equals_indexing_the_blob(layout: Layout, tmp_path: Path) -> None:
    blob = layout.root / "blobs" / "sha256" / ARM64.layer_digest.split(":")[1]
    code, out = run("index", f"oci:{layout.root}:multi", "--platform", "linux/arm64",
                    "-o", str(tmp_path / "a.zinfo"), "--meta", str(tmp_path / "a.erofs"))
    assert code == 0, out
    code, out = run("index", str(blob), "-o", str(tmp_path / "b.zinfo"),
                    "--meta", str(tmp_path / "b.erofs"))
    assert code == 0, out
    for suffix in ("zinfo", "erofs", "zinfo.json"):
        assert (tmp_path / f"a.{suffix}").read_bytes() == (tmp_path / f"b.{suffix}").read_bytes()
