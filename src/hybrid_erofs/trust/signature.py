"""Signatures on manifests in cosign's layout: a key this node trusts signed the digest of an
index artifact (or of a bound image), so the index may be used like a bound one.

cosign (sigstore) stores the signatures of manifest D under the tag `sha256-<hex>.sig` of the
same repository: an OCI manifest whose layers are "simple signing" payloads
(`application/vnd.dev.cosign.simplesigning.v1+json`, naming D) with the base64 signature in the
`dev.cosignproject.cosign/signature` annotation. `cosign sign --key k REPO@D` makes exactly
this and `verify_signature` accepts it; `sign_manifest` writes the same, for CI without cosign
(`index --push --sign-key`). Keys are PEM public keys (ECDSA P-256 as cosign makes them, RSA,
Ed25519). Needs the `cryptography` module (`pip install 'hybrid-erofs[signatures]'`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HybridErofsError, RegistryError, TrustError
from ..oci.client import OCI_MANIFEST, Descriptor, RegistryClient, parse_descriptor

log = logging.getLogger(__name__)

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MAX_SIGNATURES = 32
MAX_PAYLOAD = 64 << 10


def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of manifest `digest`: `sha256-<hex>.sig`."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}-{encoded}.sig"


def _cryptography() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:
        raise TrustError("signature checks need the python module cryptography (pip install "
                         "'hybrid-erofs[signatures]', or apt-get install python3-cryptography)"
                         ) from exc
    return serialization


@dataclass(frozen=True)
class TrustedKey:
    """A public key this node trusts, and where it came from (for messages)."""

    name: str
    key: Any  # a cryptography public key


def load_trusted_keys(paths: Sequence[str | os.PathLike[str]]) -> tuple[TrustedKey, ...]:
    """PEM public keys from files, or from every *.pub / *.pem file of a directory."""
    serialization = _cryptography()
    keys: list[TrustedKey] = []
    for given in paths:
        path = Path(given)
        files = (sorted(p for p in path.iterdir() if p.suffix in (".pub", ".pem"))
                 if path.is_dir() else [path])
        for file in files:
            try:
                key = serialization.load_pem_public_key(file.read_bytes())
            except OSError as exc:
                raise TrustError(f"{file}: cannot read the trusted key: {exc.strerror}") from exc
            except ValueError as exc:
                raise TrustError(f"{file}: not a PEM public key ({exc})") from exc
            keys.append(TrustedKey(str(file), key))
    return tuple(keys)


def signature_payload(repository: str, digest: str) -> bytes:
    """cosign's simple-signing payload naming manifest `digest` of `repository`."""
    return json.dumps({"critical": {"identity": {"docker-reference": repository},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": SIGNATURE_TYPE},
                       "optional": None}, separators=(",", ":")).encode()


def _verify_with(key: Any, signature: bytes, payload: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _names_digest(payload: bytes, digest: str) -> bool:
    try:
        document = json.loads(payload)
        critical = document["critical"]
        return bool(critical["type"] == SIGNATURE_TYPE
                    and critical["image"]["docker-manifest-digest"] == digest)
    except (ValueError, KeyError, TypeError):
        return False


def verify_signature(client: RegistryClient, digest: str,
                     keys: Sequence[TrustedKey]) -> TrustedKey | None:
    """The trusted key that signed manifest `digest` (cosign layout), or None. Signatures by
    other keys, malformed ones and payloads naming another digest are skipped."""
    if not keys:
        return None
    found = client.get_manifest_if_present(signature_tag(digest))
    if found is None:
        return None
    layers = found.data.get("layers")
    for position, raw in enumerate(layers[:MAX_SIGNATURES] if isinstance(layers, list) else []):
        try:
            layer = parse_descriptor(raw, f"{signature_tag(digest)} layer {position}")
            annotations = raw.get("annotations") if isinstance(raw, dict) else None
            encoded = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) \
                else None
            if layer.media_type != SIMPLESIGNING or not isinstance(encoded, str):
                continue
            signature = base64.b64decode(encoded, validate=True)
            payload = client.fetch_blob(layer, max_size=MAX_PAYLOAD)
        except (HybridErofsError, ValueError) as exc:
            log.info("%s: skipping signature %d: %s", digest, position, exc)
            continue
        if not _names_digest(payload, digest):
            continue
        for key in keys:
            if _verify_with(key.key, signature, payload):
                return key
    return None


def sign_manifest(client: RegistryClient, digest: str, private_key_pem: bytes, *,
                  password: bytes | None = None) -> str:
    """Sign manifest `digest` with a PEM private key and store the signature where cosign
    does (added to what the `.sig` tag holds). Returns the digest of the signature manifest."""
    serialization = _cryptography()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        key = serialization.load_pem_private_key(private_key_pem, password=password)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"signing key: not a usable PEM private key ({exc})") from exc
    ref = client.reference
    payload = signature_payload(f"{ref.registry}/{ref.repository}", digest)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(payload)
    else:
        raise TrustError("signing key: only ECDSA, RSA and Ed25519 keys are supported")
    layer = Descriptor(SIMPLESIGNING, "sha256:" + hashlib.sha256(payload).hexdigest(),
                       len(payload))
    entry = {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size,
             "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}}
    tag = signature_tag(digest)
    current = client.get_manifest_if_present(tag)
    layers: list[dict[str, Any]] = []
    if current is not None:
        if current.media_type != OCI_MANIFEST:
            raise RegistryError(f"{tag}: holds a {current.media_type}, not signatures")
        listed = current.data.get("layers")
        layers = [raw for raw in listed if isinstance(raw, dict)] if isinstance(
            listed, list) else []
    if not client.head_blob(layer.digest):
        client.upload_blob(layer, payload)
    layers.append(entry)
    config_data = json.dumps({"architecture": "", "os": "", "config": {},
                              "rootfs": {"type": "layers", "diff_ids": [
                                  str(raw.get("digest")) for raw in layers]}},
                             separators=(",", ":")).encode()
    config = Descriptor(CONFIG_TYPE, "sha256:" + hashlib.sha256(config_data).hexdigest(),
                        len(config_data))
    if not client.head_blob(config.digest):
        client.upload_blob(config, config_data)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": config.media_type, "digest": config.digest,
                                  "size": config.size},
                       "layers": layers}, separators=(",", ":")).encode()
    client.put_manifest(tag, body, media_type=OCI_MANIFEST)
    return "sha256:" + hashlib.sha256(body).hexdigest()


__all__ = [
    "SIGNATURE_ANNOTATION",
    "SIMPLESIGNING",
    "TrustedKey",
    "load_trusted_keys",
    "sign_manifest",
    "signature_payload",
    "signature_tag",
    "verify_signature",
]
