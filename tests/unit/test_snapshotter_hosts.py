"""hosts.toml in containerd's shape: which endpoints the snapshotter reads a registry from."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybrid_erofs.errors import InvalidInput
from hybrid_erofs.snapshotter.hosts import Endpoint, HostsConfig


def _hosts(root: Path, name: str, text: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "hosts.toml").write_text(text)


def test_mirrors_in_order_then_the_server(tmp_path: Path) -> None:
    _hosts(tmp_path, "registry.example.com", """
server = "https://registry.example.com"

[host."http://mirror.local:5000"]
  capabilities = ["pull", "resolve"]

[host."https://push-only.example.com"]
  capabilities = ["push"]

[host."https://mirror2.example.com/v2"]
""")
    assert HostsConfig(tmp_path).endpoints("registry.example.com") == [
        Endpoint("mirror.local:5000", True), Endpoint("mirror2.example.com", False),
        Endpoint("registry.example.com", False)]


def test_default_and_missing(tmp_path: Path) -> None:
    assert HostsConfig(None).endpoints("r.test") == [Endpoint("r.test", False)]
    assert HostsConfig(tmp_path).endpoints("r.test") == [Endpoint("r.test", False)]
    _hosts(tmp_path, "_default", 'server = "http://cache.local"\n')
    assert HostsConfig(tmp_path).endpoints("r.test") == [Endpoint("cache.local", True)]
    _hosts(tmp_path, "127.0.0.1:5000", '[host."http://127.0.0.1:6000"]\n')
    assert HostsConfig(tmp_path).endpoints("127.0.0.1:5000") == [
        Endpoint("127.0.0.1:6000", True), Endpoint("127.0.0.1:5000", False)]


@pytest.mark.parametrize(("text", "message"), [
    ("server = [", "not TOML"),
    ('server = "ftp://x"', "is not an http(s) registry URL"),
    ('[host."https://m.example.com/prefix/v2"]', "a path prefix is not supported"),
    ('host = "x"', "'host' must be a table of tables"),
])
def test_bad_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    _hosts(tmp_path, "r.test", text)
    with pytest.raises(InvalidInput) as info:
        HostsConfig(tmp_path).endpoints("r.test")
    assert message in str(info.value) and "hosts.toml" in str(info.value)
