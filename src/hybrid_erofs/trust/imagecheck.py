"""`hybrid-erofs verify REF`: the index a node would find for an image (bound, signed or
attached), every indexed layer read in full from the registry and verified against it
(trust/verifier.py), with the manifest's layer digest and the config's diff_id."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..device import RegistryOptions
from ..indexing.imageindex import ImageEntry, LayerEntry, layer_file_names
from ..indexing.layer import open_layer_stream
from ..mounting.discovery import Selector, choose_layer, discover_image_index
from ..oci.reference import parse_reference
from ..sources.gate import LOCAL
from .policy import TrustPolicy
from .verifier import LayerIndexFiles, LayerVerification, verify_layer


@dataclass(frozen=True, slots=True)
class ImageCheck:
    """The verdict on every indexed layer of one image's index."""

    manifest: str
    origin: str  # the artifact (or bound manifest) the index came from
    trust: dict[str, str]  # blob digest -> how its index was obtained
    layers: tuple[LayerVerification, ...]

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)


def check_image_index(reference: str, *, registry: RegistryOptions,
                      policy: TrustPolicy | None = None,
                      progress: Callable[[str], None] | None = None,
                      max_problems: int = 20) -> ImageCheck:
    """Verify the index of `reference` (all layers, or `registry.layer` / `registry.blob`)
    against the layers themselves, each streamed once from the registry. Unbound indexes
    are verified too (that is how they earn trust); layers indexed on this node are not
    (nothing of the index is used for them)."""
    policy = policy or TrustPolicy(accept_unbound=True)
    say = progress or (lambda _line: None)
    chosen: Selector | None = None
    if registry.layer is not None or registry.blob is not None:
        def pick(image: ImageEntry) -> list[LayerEntry]:
            return [choose_layer(image, registry, reference=reference)]
        chosen = pick
    found = discover_image_index(reference, registry=registry, policy=policy, layers=chosen,
                                 progress=say)
    ref = parse_reference(reference)
    pinned = f"{ref.registry}/{ref.repository}@{found.image.manifest}"
    results: list[LayerVerification] = []
    for layer in found.image.layers:
        if layer.digest not in found.layer_dirs or found.trust.get(layer.digest) == LOCAL:
            continue
        names = layer_file_names(layer.digest)
        directory = found.layer_dirs[layer.digest]
        say(f"{layer.digest[:19]}...: reading {layer.size} bytes")
        stream, digest, _ = open_layer_stream(pinned, replace(registry, blob=layer.digest,
                                                           layer=None, platform=None))
        with contextlib.closing(stream):
            results.append(verify_layer(
                stream, LayerIndexFiles(directory / names["meta"], directory / names["zinfo"]),
                blob_digest=digest or layer.digest, diff_id=layer.diff_id, root_owner=(0, 0),
                max_problems=max_problems, name=layer.digest))
    return ImageCheck(found.image.manifest, found.artifact, dict(found.trust), tuple(results))


__all__ = ["ImageCheck", "check_image_index"]
