"""A node's policy for indexes found in a registry (docs/security.md): bound ones are used,
signed ones when a key the node trusts signed them, unbound ones only with an explicit
opt-in (then mounted nosuid,nodev and verified against the layer in the background)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .signature import TrustedKey, load_trusted_keys

KEYS_DIR_ENV = "HYBRID_EROFS_TRUSTED_KEYS"  # a directory of PEM public keys (tests, hosts)
DEFAULT_KEYS_DIR = Path("/etc/hybrid-erofs/trusted-keys")
ACCEPT_UNBOUND_FLAG = "--accept-unbound"
TRUSTED_KEY_FLAG = "--trusted-key"


@dataclass(frozen=True)
class TrustPolicy:
    """Which indexes found by discovery may be used.

    Args:
        accept_unbound: use an index that is neither bound nor signed (`--accept-unbound`).
        trusted_keys: PEM public key files or directories (`--trusted-key`); the directory
            $HYBRID_EROFS_TRUSTED_KEYS, else /etc/hybrid-erofs/trusted-keys, is added when
            it exists and `system_keys` is true.
    """

    accept_unbound: bool = False
    trusted_keys: tuple[Path, ...] = ()
    system_keys: bool = True
    _loaded: list[tuple[TrustedKey, ...]] = field(default_factory=list, compare=False,
                                                  repr=False)

    def key_sources(self) -> tuple[Path, ...]:
        sources = list(self.trusted_keys)
        if self.system_keys:
            system = Path(os.environ.get(KEYS_DIR_ENV) or DEFAULT_KEYS_DIR)
            if system.is_dir():
                sources.append(system)
        return tuple(sources)

    def keys(self) -> tuple[TrustedKey, ...]:
        """The trusted keys, loaded once (TrustError for a file that is not a key)."""
        if not self._loaded:
            sources = self.key_sources()
            self._loaded.append(load_trusted_keys(sources) if sources else ())
        return self._loaded[0]


def unbound_refusal(reference: str, manifest: str, repository: str, artifact: str) -> str:
    """The one line that refuses an unbound index and names the ways to accept one."""
    return (f"{reference}: the hybrid-erofs index {artifact} attached to {manifest} is not "
            f"bound to the image (anyone who can push to {repository} can attach one): mount "
            f"the bound image `index --push` printed as pull_ref, trust its signer with "
            f"{TRUSTED_KEY_FLAG} FILE (or {DEFAULT_KEYS_DIR}/), or accept it with "
            f"{ACCEPT_UNBOUND_FLAG} (mounted nosuid,nodev, verified against the layer in the "
            f"background)")


__all__ = ["ACCEPT_UNBOUND_FLAG", "DEFAULT_KEYS_DIR", "KEYS_DIR_ENV", "TRUSTED_KEY_FLAG",
           "TrustPolicy", "unbound_refusal"]
