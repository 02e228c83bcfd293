"""`hybrid-erofs inspect REF --json` against the real registry rig, checked against what
`skopeo inspect --config` reports for the same image."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from tests.registry_rig import Rig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("tag", "platform", "name"), [
    ("multi", "linux/arm64", "arm64"), ("multi", "linux/amd64", "amd64"), ("amd64", None, "amd64"),
], ids=["index-arm64", "index-amd64", "manifest"])
def test_inspect_matches_skopeo(rig: Rig, tag: str, platform: str | None, name: str) -> None:
    ref = f"{rig.hosts['plain']}/lab/img:{tag}"
    args = ["inspect", ref, "--json"] + (["--platform", platform] if platform else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    image = rig.images[name]
    assert info["manifest"]["digest"] == image.manifest_digest
    assert [(x["blob"]["digest"], x["blob"]["size"]) for x in info["layers"]] == [
        (image.layer_digest, len(image.layer))]

    override = []
    if platform:
        os_name, arch = platform.split("/")
        override = ["--override-os", os_name, "--override-arch", arch]
    config = json.loads(subprocess.run(
        ["skopeo", *override, "inspect", "--config", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True).stdout)
    run = config.get("config", {})
    assert (info["os"], info["architecture"], info["variant"]) == (
        config["os"], config["architecture"], config.get("variant", ""))
    assert info["labels"] == run.get("Labels", {})
    assert info["entrypoint"] == run.get("Entrypoint") and info["cmd"] == run.get("Cmd")
    assert info["env"] == run.get("Env", []) and info["user"] == run.get("User", "")
    assert [x["layer"]["digest"] for x in info["layers"]] == config["rootfs"]["diff_ids"]


def test_inspect_missing_tag_is_one_line(rig: Rig) -> None:
    result = CliRunner().invoke(main, ["inspect", f"{rig.hosts['plain']}/lab/img:nope"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: GET http://") and result.output.count("\n") == 1
