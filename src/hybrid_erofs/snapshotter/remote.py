"""Remote layers: from containerd's Prepare labels to a layer mounted lazily as EROFS by the
project's own mount daemon (mounting/), or a LayerFallback saying why containerd must apply it.

resolve_layer() is the one place where the index of a layer is found and trusted or refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from ..device import RegistryOptions
from ..errors import (
    HybridErofsError,
    IndexFormatError,
    InvalidInput,
    LayerFallback,
    MountError,
    RegistryError,
)
from ..fetching.background import FOLLOW_S, FetchPolicy
from ..fetching.warmup import ImageWarmup, profile_warm_spans, registry_target
from ..indexing.publish import registry_client
from ..mounting.discovery import (
    DiscoveredImage,
    _layer_annotations,
    discover_image_index,
    resolve_layer_index,
)
from ..mounting.kernel import mounted_at, umount
from ..mounting.layer import mount_layer
from ..mounting.lifecycle import (
    READY_TIMEOUT_S,
    cleanup_mount,
    daemon_alive,
    find_mount,
    fs_mounted,
)
from ..mounting.lifecycle import unmount as unmount_layer
from ..oci.client import GZIP_LAYER_TYPES
from ..oci.image import inspect_manifest
from ..oci.reference import parse_reference
from ..sources.gate import BOUND, UNBOUND
from ..trust.bound import ZinfoLater, bound_sidecar
from ..trust.policy import TrustPolicy as NodePolicy
from .hosts import HostsConfig

log = logging.getLogger(__name__)

# containerd's labels (snapshots/snapshotter.go, pkg/snapshotters/annotations.go)
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
INHERITED = "containerd.io/snapshot/"  # annotations containerd passes on as labels
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


DEFAULT_FETCH = FetchPolicy()  # on, as for `mount` and `mount-image`

@dataclass(frozen=True, slots=True)
class LayerRequest:
    """What containerd's Prepare labels say about the layer being unpacked. `labels` keeps
    them all: annotations of the layer descriptor prefixed `containerd.io/snapshot/` arrive
    here too (a bound index is announced that way)."""

    chain_id: str
    image_ref: str
    manifest_digest: str
    layer_digest: str
    labels: Mapping[str, str]

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> LayerRequest:
        values = [labels.get(key, "") for key in (LABEL_SNAPSHOT_REF, LABEL_IMAGE_REF,
                                                   LABEL_MANIFEST_DIGEST, LABEL_LAYER_DIGEST)]
        if not all(values):
            raise LayerFallback(
                "no remote-snapshot labels (containerd.io/snapshot/cri.*): CRI's "
                "disable_snapshot_annotations is true, or the client (ctr pull, the 2.x "
                "transfer service) does not add them", reason="no-labels")
        chain, image_ref, manifest, layer = values
        for name, digest in (("manifest", manifest), ("layer", layer)):
            if not _DIGEST.fullmatch(digest):
                raise LayerFallback(f"{image_ref}: malformed {name} digest label {digest!r}",
                                    reason="no-labels")
        return cls(chain, image_ref, manifest, layer, dict(labels))


@dataclass(frozen=True, slots=True)
class LayerIndex:
    """A layer's index files as found: `source` is REPO@MANIFEST (pinned), `index` the
    digest of the artifact they came from, `bound` whether the image digest covers it."""

    source: str
    meta: Path
    zinfo: Path
    index: str
    bound: bool
    plain_http: bool = False  # `source`'s host is a plain-HTTP mirror (hosts.toml)
    prefetch: Path | None = None  # the layer's prefetch profile, when it is bound (or signed)
    later: ZinfoLater | None = None  # `zinfo` not here yet: the daemon fetches it (bound.py)


class IndexFinder(Protocol):
    """Finds the index of a layer; raises LayerFallback when there is none to use."""

    def find(self, request: LayerRequest) -> LayerIndex: ...


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """Which indexes may be mounted: bound ones always; unbound ones (an artifact attached
    through the registry's referrers, which anyone with push rights can add) only when
    `accept_unbound`, and then with nosuid,nodev on every mount a container execs from."""

    accept_unbound: bool = False

    def restricted(self, index: LayerIndex) -> bool:
        """True: mount it nosuid,nodev. Raises LayerFallback when the index may not be used."""
        if index.bound:
            return False
        if not self.accept_unbound:
            raise LayerFallback(
                f"{index.source}: index {index.index} is not bound to the image (found "
                f"through the registry's referrers); --accept-unbound-indexes uses such "
                f"indexes (mounted nosuid,nodev)", reason="untrusted")
        return True


def resolve_layer(request: LayerRequest, *, finder: IndexFinder,
                  policy: TrustPolicy) -> tuple[LayerIndex, bool]:
    """The one seam where a layer's index is found and trusted: (index, restricted), or
    LayerFallback."""
    index = finder.find(request)
    return index, policy.restricted(index)


class DiscoveryFinder:
    """The layer's index: bound through the layer descriptor's annotations (they arrive as
    labels: mounting/discovery.resolve_layer_index fetches the files by digest), else the
    index attached to the image in its registry (mounting/discovery.py: referrers or the
    `sha256-<hex>` tag, digests verified, files cached; signed by a key in the node's
    trusted-keys directory, or unbound: TrustPolicy then decides). One discovery per image:
    its result is kept for the image's other layers (content-addressed, so it cannot go
    stale; failures are not kept). Thread-safe."""

    def __init__(self, registry: RegistryOptions, *, hosts: HostsConfig | None = None,
                 keep: int = 64) -> None:
        self.registry = registry
        self.hosts = hosts or HostsConfig()
        self._keep = keep
        self._found: OrderedDict[str, DiscoveredImage] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, request: LayerRequest) -> LayerIndex:
        try:
            ref = parse_reference(request.image_ref)
        except InvalidInput as exc:
            raise LayerFallback(str(exc), reason="no-labels") from exc
        try:
            endpoints = self.hosts.endpoints(ref.registry)
        except InvalidInput as exc:
            raise LayerFallback(str(exc), reason="index-error") from exc
        failures: list[LayerFallback] = []
        for endpoint in endpoints:  # mirrors first, as containerd tries them
            pinned = f"{endpoint.host}/{ref.repository}@{request.manifest_digest}"
            try:
                bound = self._bound(request, f"{endpoint.host}/{ref.repository}",
                                    plain_http=endpoint.plain_http)
                if bound is not None:
                    return bound
                found = self._discover(pinned, plain_http=endpoint.plain_http)
                break
            except LayerFallback as exc:
                failures.append(exc)
                log.info("%s: %s", endpoint.host, exc)
        else:
            if len(failures) == 1:
                raise failures[0]
            raise LayerFallback("; ".join(f"{e.host}: {f}" for e, f in zip(endpoints, failures,
                                                                             strict=True)),
                                reason=failures[-1].reason)
        layer = next((layer for layer in found.image.layers
                      if layer.digest == request.layer_digest), None)
        if layer is not None and layer.media_type not in GZIP_LAYER_TYPES:
            raise LayerFallback(f"{pinned}: layer {layer.digest} is {layer.media_type}, not "
                                f"gzip: it cannot be mounted lazily", reason="unsupported")
        if layer is None or layer.digest not in found.layer_dirs:
            raise LayerFallback(f"{pinned}: layer {request.layer_digest} is not in the index "
                                f"{found.artifact}", reason="index-error")
        meta, zinfo = found.layer_paths(layer)
        trusted = found.trust.get(layer.digest) != UNBOUND
        # verified with the rest; discovery drops the profiles of an unbound index
        prefetch = (found.layer_dirs[layer.digest] / layer.prefetch.name
                    if layer.prefetch is not None and trusted else None)
        return LayerIndex(pinned, meta, zinfo, found.artifact, bound=trusted,
                          plain_http=endpoint.plain_http, prefetch=prefetch)

    def _bound(self, request: LayerRequest, repository: str, *,
               plain_http: bool) -> LayerIndex | None:
        """The layer's bound index when its labels name one (the image's manifest does),
        fetched by digest from `repository` (an endpoint's)."""
        with _falling_back():
            if bound_sidecar(request.labels, layer=request.layer_digest) is None:
                return None
            found = resolve_layer_index(
                repository, request.manifest_digest, request.layer_digest, request.labels,
                registry=replace(self.registry, insecure=self.registry.insecure or plain_http))
        return LayerIndex(found.source, found.meta, found.zinfo, found.origin, bound=True,
                          plain_http=plain_http, prefetch=found.prefetch, later=found.later)

    def _discover(self, pinned: str, *, plain_http: bool) -> DiscoveredImage:
        with self._lock:
            if pinned in self._found:
                self._found.move_to_end(pinned)
                return self._found[pinned]
            with _falling_back():
                found = discover_image_index(
                    pinned, registry=replace(self.registry, platform=None, layer=None,
                                             blob=None,
                                             insecure=self.registry.insecure or plain_http),
                    policy=NodePolicy(accept_unbound=True),  # judged by the caller's TrustPolicy
                    layers=lambda image: [layer for layer in image.layers
                                          if layer.media_type in GZIP_LAYER_TYPES])
            self._found[pinned] = found
            while len(self._found) > self._keep:
                self._found.popitem(last=False)
            return found


@contextlib.contextmanager
def _falling_back() -> Iterator[None]:
    """Finding a layer's index failed: a LayerFallback whose reason says why (the registry,
    a layer that cannot be mounted lazily, the index itself)."""
    try:
        yield
    except RegistryError as exc:
        raise LayerFallback(str(exc), reason="no-index") from exc
    except IndexFormatError as exc:  # an InvalidInput, but about the index, not the layer
        raise LayerFallback(str(exc), reason="index-error") from exc
    except InvalidInput as exc:
        raise LayerFallback(str(exc), reason="unsupported") from exc
    except HybridErofsError as exc:
        raise LayerFallback(str(exc), reason="index-error") from exc


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain IDs of layers with these diff IDs (image-spec config.md): containerd
    names a layer's committed snapshot by it."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chains.append(diff_id if not chains else "sha256:" + hashlib.sha256(
            f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


@dataclass(frozen=True, slots=True)
class PlannedLayer:
    """One layer of an image as its manifest and config say."""

    digest: str
    media_type: str
    chain_id: str
    annotations: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RemoteLayer:
    """What the store keeps about a lazily mounted layer (JSON in its row)."""

    source: str
    blob: str
    meta: str
    zinfo: str
    index: str
    restricted: bool
    plain_http: bool = False
    prefetch: str | None = None
    later: dict[str, object] | None = None  # ZinfoLater.to_json(): the zinfo comes later

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RemoteLayer:
        return cls(**json.loads(text))


class LazyLayers:
    """Layers mounted by the project's mount daemons (one `hybrid-erofs mount` daemon per
    layer, in a session of its own: it outlives the snapshotter). Thread-safe.

    Args:
        finder: where indexes come from (default: discovery in the image's registry).
        policy: which indexes may be used.
        registry: credentials, cache and plain-HTTP settings for the registries.
        via: how the daemons export the device (mounting/lifecycle.VIAS).
        fetch: each layer's background fetch (fetching/background.py; None: off).
    """

    def __init__(self, *, registry: RegistryOptions, policy: TrustPolicy,
                 finder: IndexFinder | None = None, hosts: HostsConfig | None = None,
                 via: str = "auto", timeout_s: float = READY_TIMEOUT_S,
                 fetch: FetchPolicy | None = DEFAULT_FETCH) -> None:
        self.fetch = fetch
        self.registry = registry
        self.policy = policy
        self.hosts = hosts or HostsConfig()
        self.finder = finder or DiscoveryFinder(registry, hosts=self.hosts)
        self.via = via
        self.timeout_s = timeout_s
        self._plans: OrderedDict[str, tuple[PlannedLayer, ...]] = OrderedDict()
        self._plans_lock = threading.Lock()
        # One warm-up per image (manifest digest): its layers' profile spans in first-read
        # order across them (the layers ahead are mounted at the same time).
        self._warmups: OrderedDict[str, ImageWarmup] = OrderedDict()

    def ahead(self, request: LayerRequest) -> Sequence[LayerRequest]:
        """The Prepare requests containerd's unpacker will make for the layers above
        `request`'s: the labels it passes (the layer descriptors' `containerd.io/snapshot/`
        annotations, the CRI labels, the chain ID), from the manifest fetched by the digest
        containerd named (and its config, for the diff IDs). Empty when `request` is not
        where the manifest says."""
        plan = self._plan(request)
        below = next((n for n, layer in enumerate(plan) if layer.digest == request.layer_digest
                      and layer.chain_id == request.chain_id), None)
        if below is None:
            return []
        found = []
        for layer in plan[below + 1:]:
            if layer.media_type not in GZIP_LAYER_TYPES:
                continue  # containerd applies it (and asks for the layers above as usual)
            labels = {k: v for k, v in layer.annotations.items() if k.startswith(INHERITED)}
            labels.update({LABEL_SNAPSHOT_REF: layer.chain_id, LABEL_IMAGE_REF: request.image_ref,
                           LABEL_MANIFEST_DIGEST: request.manifest_digest,
                           LABEL_LAYER_DIGEST: layer.digest})
            found.append(LayerRequest.from_labels(labels))
        return found

    def _plan(self, request: LayerRequest) -> tuple[PlannedLayer, ...]:
        with self._plans_lock:
            if request.manifest_digest in self._plans:
                return self._plans[request.manifest_digest]
        ref = parse_reference(request.image_ref)
        failures = []
        for endpoint in self.hosts.endpoints(ref.registry):  # mirrors first, as containerd
            pinned = f"{endpoint.host}/{ref.repository}@{request.manifest_digest}"
            options = replace(self.registry, platform=None, layer=None, blob=None,
                              insecure=self.registry.insecure or endpoint.plain_http)
            try:
                with registry_client(pinned, options, what="the layers ahead") as client:
                    manifest = client.get_manifest(request.manifest_digest,
                                                   expected_digest=request.manifest_digest)
                    info = inspect_manifest(client, manifest, pinned)
            except HybridErofsError as exc:
                failures.append(f"{endpoint.host}: {exc}")
                continue
            annotations = _layer_annotations(manifest)
            chains = chain_ids(info.config.diff_ids)
            plan = tuple(PlannedLayer(d.digest, d.media_type, chain, annotations.get(d.digest, {}))
                         for d, chain in zip(info.layers, chains, strict=True))
            with self._plans_lock:
                self._plans[request.manifest_digest] = plan
                while len(self._plans) > 64:
                    self._plans.popitem(last=False)
            return plan
        raise RegistryError(f"{request.image_ref}: manifest {request.manifest_digest}: "
                            f"{'; '.join(failures)}")

    def mount(self, request: LayerRequest, mountpoint: Path) -> RemoteLayer:
        index, restricted = resolve_layer(request, finder=self.finder, policy=self.policy)
        layer = RemoteLayer(source=index.source, blob=request.layer_digest,
                            meta=str(index.meta), zinfo=str(index.zinfo), index=index.index,
                            restricted=restricted, plain_http=index.plain_http,
                            prefetch=str(index.prefetch) if index.prefetch else None,
                            later=index.later.to_json() if index.later is not None else None)
        warmup = self._warm_up(layer, request.manifest_digest)
        try:
            self._mount(layer, mountpoint, follow=warmup is not None)
        except BaseException:
            if warmup is not None:
                warmup.drop(layer.blob)
            raise
        return layer

    def _warm_up(self, layer: RemoteLayer, image: str) -> ImageWarmup | None:
        """A bound profile's spans start coming in now, while the daemon starts, in the
        image's first-read order across its layers (fetching/warmup.py; the daemon follows
        it); None without a profile or background fetch."""
        if self.fetch is None or layer.prefetch is None or layer.restricted:
            return None
        try:
            spans = profile_warm_spans(layer.blob, zinfo=Path(layer.zinfo),
                                       prefetch=Path(layer.prefetch))
        except (HybridErofsError, OSError) as exc:
            log.info("%s: no warm-up of the prefetch profile: %s", layer.blob, exc)
            return None
        if not spans:
            return None
        with self._plans_lock:
            warmup = self._warmups.get(image)
            if warmup is None:
                warmup = self._warmups[image] = ImageWarmup(workers=self.fetch.workers,
                                                            name=image.removeprefix("sha256:"))
            self._warmups.move_to_end(image)
            while len(self._warmups) > 16:
                self._warmups.popitem(last=False)
        warmup.add(layer.blob, spans, registry_target(
            layer.source, layer.blob,
            replace(self.registry, insecure=self.registry.insecure or layer.plain_http)))
        return warmup

    def _mount(self, layer: RemoteLayer, mountpoint: Path, *, follow: bool = False) -> None:
        try:
            # An unbound index: the layer's own mount is nosuid,nodev too, and verified
            # against the layer in the background (reads fail with EIO on a mismatch).
            mount_layer(layer.source, mountpoint, meta=Path(layer.meta), zinfo=Path(layer.zinfo),
                        registry=replace(self.registry, blob=layer.blob, layer=None,
                                         platform=None,
                                         insecure=self.registry.insecure or layer.plain_http),
                        via=self.via, timeout_s=self.timeout_s,
                        trust=UNBOUND if layer.restricted else BOUND,
                        # warmed up: the daemon decodes the profile's spans as they come
                        fetch=(replace(self.fetch, follow_s=FOLLOW_S)
                               if follow and self.fetch is not None else self.fetch),
                        prefetch=Path(layer.prefetch) if layer.prefetch else None,
                        later=ZinfoLater.from_json(layer.later))
        except (HybridErofsError, OSError) as exc:
            raise LayerFallback(f"{layer.blob}: mounting failed: {exc}",
                                reason="mount-failed") from exc

    def unmount(self, layer: RemoteLayer | None, mountpoint: Path) -> None:
        """Take the layer's EROFS and daemon down (lazily: a container may still read it)."""
        try:
            unmount_layer(mountpoint, lazy=True)
        except MountError:
            # no record (a crash between mount and record): whatever is mounted there goes
            while mounted_at(mountpoint) is not None:
                umount(mountpoint, lazy=True)

    def alive(self, layer: RemoteLayer, mountpoint: Path) -> bool:
        try:
            _path, _paths, record = find_mount(mountpoint)
        except MountError:
            return False
        return daemon_alive(record) and fs_mounted(mountpoint, "erofs")

    def restore(self, layer: RemoteLayer, mountpoint: Path,
                labels: Mapping[str, str]) -> RemoteLayer:
        """Mount a layer again whose daemon died: what it left is cleaned up first. When its
        index files are gone from the cache, the index is found (and trusted) again."""
        try:
            _path, paths, record = find_mount(mountpoint)
        except MountError:
            pass
        else:
            cleanup_mount(paths, record)
        while mounted_at(mountpoint) is not None:
            umount(mountpoint, lazy=True)
        later = ZinfoLater.from_json(layer.later)
        if Path(layer.meta).is_file() and (Path(layer.zinfo).is_file() or (
                later is not None and later.profile_zinfo.is_file())):
            self._mount(layer, mountpoint)
            return layer
        log.info("layer %s: its index files are gone from the cache; finding the index again",
                 layer.blob)
        return self.mount(LayerRequest.from_labels(labels), mountpoint)
