"""Registry mirrors and plain-HTTP registries in containerd's hosts.toml shape
(DIR/<registry host>/hosts.toml, DIR/_default/hosts.toml): where the snapshotter reads an
image's index and layers from."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import InvalidInput

_NEEDED = {"pull", "resolve"}  # the index is found by resolving, layers are pulled


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to reach a registry: `host` (host[:port]) and whether it speaks plain HTTP."""

    host: str
    plain_http: bool


def _endpoint(url: str, *, where: Path) -> Endpoint:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"{where}: {url!r} is not an http(s) registry URL")
    if parts.path.strip("/") not in ("", "v2"):
        raise InvalidInput(f"{where}: {url!r}: a path prefix is not supported")
    return Endpoint(parts.netloc, parts.scheme == "http")


@dataclass(frozen=True, slots=True)
class HostsConfig:
    """The hosts.toml files below `directory` (containerd's `config_path` layout). A missing
    directory or file means the registry itself, over HTTPS (plain HTTP on loopback)."""

    directory: Path | None = None

    def endpoints(self, registry: str) -> list[Endpoint]:
        """The endpoints to try for `registry`, in order: its hosts with pull and resolve
        capabilities as listed, then `server` (default: the registry itself)."""
        default = Endpoint(registry, False)
        if self.directory is None:
            return [default]
        for name in (registry, "_default"):
            path = self.directory / name.replace(":", "_") / "hosts.toml"
            if not path.is_file():
                path = self.directory / name / "hosts.toml"
            if path.is_file():
                return self._parse(path, default)
        return [default]

    @staticmethod
    def _parse(path: Path, default: Endpoint) -> list[Endpoint]:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"{path}: not TOML: {exc}") from exc
        found: list[Endpoint] = []
        hosts = data.get("host", {})
        if not isinstance(hosts, dict):
            raise InvalidInput(f"{path}: 'host' must be a table of tables")
        for url, settings in hosts.items():
            capabilities = set(settings.get("capabilities", ["pull", "resolve"])
                               if isinstance(settings, dict) else [])
            if capabilities >= _NEEDED:
                found.append(_endpoint(url, where=path))
        server = data.get("server")
        found.append(_endpoint(str(server), where=path) if server else default)
        return found
