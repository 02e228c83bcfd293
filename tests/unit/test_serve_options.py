"""`hybrid-erofs serve` argument handling that needs no root, no FUSE and no server."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hybrid_erofs.cli import main
from hybrid_erofs.cli.serve_cmd import _looks_like_reference, default_socket, parse_listen


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:10809", ("127.0.0.1", 10809)),
    ("localhost:0", ("127.0.0.1", 0)),
    ("[::1]:10809", ("::1", 10809)),
    ("10809", ("127.0.0.1", 10809)),
], ids=["v4", "localhost", "v6", "port-only"])
def test_parse_listen_loopback(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text, allow_any=False) == want


@pytest.mark.parametrize("text", ["0.0.0.0:10809", "192.168.1.2:1", "[::]:10809"])
def test_parse_listen_refuses_other_addresses(text: str) -> None:
    with pytest.raises(click.BadParameter, match="--listen-any"):
        parse_listen(text, allow_any=False)
    assert parse_listen(text, allow_any=True)[1] >= 1


@pytest.mark.parametrize("text", ["example.org:80", "127.0.0.1", "127.0.0.1:99999", ":"])
def test_parse_listen_rejects_malformed(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_listen(text, allow_any=True)


@pytest.mark.parametrize(("text", "want"), [
    ("ghcr.io/acme/app:v1", True), ("docker.io/library/alpine@sha256:ab", True),
    ("alpine:3.19", True), ("docker://alpine", True), ("localhost/app", True),
    ("layer.tar.gz", False), ("./x:y", False), ("dir/layer", False), ("layer", False),
])
def test_reference_detection(text: str, want: bool) -> None:
    assert _looks_like_reference(text) is want


def test_default_socket_uses_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket("usr") == tmp_path / "hybrid-erofs" / "usr.sock"


def test_reference_source_is_a_one_line_error(tmp_path: Path) -> None:
    # A reference is passed on to the registry stack (mount/serve share open_device); here the
    # meta is missing, so it fails before any network access.
    result = CliRunner().invoke(main, ["serve", "--meta", str(tmp_path / "m.erofs"),
                                       "ghcr.io/acme/app:v1"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'm.erofs'}: cannot open: No such file or directory"


@pytest.mark.parametrize("args", [
    ["--socket", "s", "--fuse", "d"], ["--listen", "1", "--socket", "s"], ["--listen-any"],
    ["--allow-other"],
])
def test_conflicting_transport_options(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["serve", "--meta", "m", *args, "layer.tar.gz"])
    assert result.exit_code == 2


def test_help_has_examples() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--fuse /run/l" in result.output and "nbdinfo" in result.output
