"""Remote layers as containerd's unpacker and metadata layer see them (unpacker.go,
metadata/snapshot.go): Prepare with the CRI labels answers ALREADY_EXISTS after recording the
layer as the committed snapshot of its chain ID, which List finds with the exact filter
containerd sends; fallbacks return ordinary mounts; dead layers are mounted again or reported
UNAVAILABLE; the trust seam refuses unbound indexes unless accepted (then nosuid,nodev).

The mount daemons are swapped out (RemoteLayers is a Protocol); the real ones run in
tests/integration/test_snapshotter_containerd.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from hybrid_erofs.errors import HybridErofsError, LayerFallback
from hybrid_erofs.snapshotter.api import snapshots_pb2 as pb
from hybrid_erofs.snapshotter.remote import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
    LayerIndex,
    LayerRequest,
    RemoteLayer,
    TrustPolicy,
    resolve_layer,
)
from hybrid_erofs.snapshotter.snapshotter import (
    AHEAD_PREFIX,
    LABEL_INDEX,
    LABEL_REMOTE,
    LABEL_RESTRICTED,
    Snapshotter,
)
from tests.snapshots_client import SnapshotsClient, running

MANIFEST = "sha256:" + "11" * 32
LAYERS = ["sha256:" + "a1" * 32, "sha256:" + "a2" * 32, "sha256:" + "a3" * 32]
CHAINS = ["sha256:" + "c1" * 32, "sha256:" + "c2" * 32, "sha256:" + "c3" * 32]
INDEX = "sha256:" + "ee" * 32


def labels(n: int) -> dict[str, str]:
    """What containerd 1.6's CRI pull hands the snapshotter for layer n."""
    return {LABEL_SNAPSHOT_REF: CHAINS[n], LABEL_IMAGE_REF: "registry.test/lab/app:1",
            LABEL_MANIFEST_DIGEST: MANIFEST, LABEL_LAYER_DIGEST: LAYERS[n],
            "containerd.io/snapshot/cri.image-layers": ",".join(LAYERS)}


def metadata_filter(target: str, bparent: str) -> str:
    """metadata/snapshot.go: fmt.Sprintf(`labels."containerd.io/snapshot.ref"==%s,parent==%q`)."""
    return f'labels."containerd.io/snapshot.ref"=={target},parent=="{bparent}"'


@dataclass
class FakeLayers:
    """RemoteLayers without daemons: a 'mount' is a marker file in the directory."""

    refuse: dict[str, str] = field(default_factory=dict)  # layer digest -> fallback reason
    restricted: bool = False
    dead: set[Path] = field(default_factory=set)
    restore_fails: bool = False
    unmounted: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)
    above: dict[str, list[LayerRequest]] = field(default_factory=dict)  # for ahead()
    mounted: list[str] = field(default_factory=list)  # layer digests, in order

    def ahead(self, request: LayerRequest) -> list[LayerRequest]:
        return self.above.get(request.layer_digest, [])

    def mount(self, request: LayerRequest, mountpoint: Path) -> RemoteLayer:
        self.mounted.append(request.layer_digest)
        if request.layer_digest in self.refuse:
            raise LayerFallback(f"{request.layer_digest}: refused",
                                reason=self.refuse[request.layer_digest])
        (mountpoint / "layer").write_text(request.layer_digest)
        return RemoteLayer(source=f"registry.test/lab/app@{MANIFEST}",
                           blob=request.layer_digest, meta="/m", zinfo="/z", index=INDEX,
                           restricted=self.restricted)

    def unmount(self, layer: RemoteLayer | None, mountpoint: Path) -> None:
        self.unmounted.append(mountpoint)

    def alive(self, layer: RemoteLayer, mountpoint: Path) -> bool:
        return mountpoint not in self.dead

    def restore(self, layer: RemoteLayer, mountpoint: Path,
                labels: Mapping[str, str]) -> RemoteLayer:
        if self.restore_fails:
            raise HybridErofsError(f"{mountpoint}: the registry is gone")
        assert labels[LABEL_LAYER_DIGEST] == layer.blob  # enough to find the index again
        self.restored.append(mountpoint)
        self.dead.discard(mountpoint)
        return layer


@pytest.fixture
def layers() -> FakeLayers:
    return FakeLayers()


@pytest.fixture
def snapshotter(tmp_path: Path, layers: FakeLayers) -> Iterator[Snapshotter]:
    sn = Snapshotter(tmp_path / "root", remote=layers)
    yield sn
    sn.close()


@pytest.fixture
def client(snapshotter: Snapshotter, tmp_path: Path) -> Iterator[SnapshotsClient]:
    with running(snapshotter, tmp_path / "sn.sock") as client:
        yield client


def _already_exists(client: SnapshotsClient, key: str, parent: str,
                    given: dict[str, str]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.prepare(key, parent, given)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]


def _opts(mount: pb.Mount) -> dict[str, str]:
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in mount.options)


def test_remote_layers_follow_containerds_contract(client: SnapshotsClient,
                                                   snapshotter: Snapshotter) -> None:
    # unpacker.go: Prepare("extract-<uniq> <chainID>", parentChain, labels) -> AlreadyExists
    _already_exists(client, f"k8s.io/1/extract-1 {CHAINS[0]}", "", labels(0))
    # metadata/snapshot.go then walks with its filter and needs one COMMITTED match
    (found,) = client.list(metadata_filter(CHAINS[0], ""))
    (info,) = found
    assert (info.name, info.parent, info.kind) == (CHAINS[0], "", pb.COMMITTED)
    assert info.labels[LABEL_REMOTE] == "remote snapshot" and info.labels[LABEL_INDEX] == INDEX
    assert info.labels[LABEL_SNAPSHOT_REF] == CHAINS[0]
    assert LABEL_RESTRICTED not in info.labels
    # the next layer names the backend's name of its parent (here: the chain ID)
    _already_exists(client, f"k8s.io/2/extract-2 {CHAINS[1]}", CHAINS[0], labels(1))
    assert client.list(metadata_filter(CHAINS[1], "")) == []  # parent must match too
    ((info,),) = client.list(metadata_filter(CHAINS[1], CHAINS[0]))
    assert info.name == CHAINS[1] and info.parent == CHAINS[0]
    assert client.stat(CHAINS[1]).kind == pb.COMMITTED
    # preparing it again (a second pull) answers the same, without mounting twice
    _already_exists(client, f"k8s.io/3/extract-3 {CHAINS[1]}", CHAINS[0], labels(1))
    assert snapshotter.lazy == 2 and not snapshotter.fallbacks
    # a container on top: overlay with the lazily mounted layers as lowerdirs
    (mount,) = client.prepare("k8s.io/4/ctr", CHAINS[1])
    lowers = _opts(mount)["lowerdir"].split(":")
    assert [Path(p, "layer").read_text() for p in lowers] == [LAYERS[1], LAYERS[0]]
    assert "nosuid" not in mount.options


def test_fallbacks_give_ordinary_snapshots(client: SnapshotsClient, snapshotter: Snapshotter,
                                           layers: FakeLayers) -> None:
    # `ctr pull` sends only containerd.io/snapshot.ref: containerd must apply the layer
    (mount,) = client.prepare("k8s.io/1/extract-1 c", "", {LABEL_SNAPSHOT_REF: CHAINS[0]})
    assert mount.type == "bind" and list(mount.options) == ["rw", "rbind"]
    client.commit("k8s.io/2/c", "k8s.io/1/extract-1 c", {LABEL_SNAPSHOT_REF: CHAINS[0]})
    # no index for layer 1: an ordinary active snapshot on the fallback parent
    layers.refuse[LAYERS[1]] = "no-index"
    (mount,) = client.prepare("k8s.io/3/extract-2 c", "k8s.io/2/c", labels(1))
    assert mount.type == "overlay" and "upperdir" in _opts(mount)
    assert client.stat("k8s.io/3/extract-2 c").kind == pb.ACTIVE
    ((active,),) = client.list(metadata_filter(CHAINS[1], "k8s.io/2/c"))
    assert active.kind == pb.ACTIVE  # containerd needs a COMMITTED one: it applies the layer
    client.commit("k8s.io/4/c2", "k8s.io/3/extract-2 c")
    # layer 2 is lazy again, on top of two applied layers
    _already_exists(client, "k8s.io/5/extract-3 c", "k8s.io/4/c2", labels(2))
    ((info,),) = client.list(metadata_filter(CHAINS[2], "k8s.io/4/c2"))
    assert info.labels[LABEL_REMOTE] == "remote snapshot"
    assert snapshotter.fallbacks == {"no-labels": 1, "no-index": 1} and snapshotter.lazy == 1


def test_a_target_with_another_parent_falls_back(client: SnapshotsClient,
                                                 snapshotter: Snapshotter) -> None:
    _already_exists(client, "k8s.io/1/extract-1 c", "", labels(0))
    client.prepare("default/1/extract c", "", {})
    client.commit("default/2/c", "default/1/extract c")
    given = labels(1) | {LABEL_SNAPSHOT_REF: CHAINS[0]}  # same chain ID, other parent
    (mount,) = client.prepare("default/3/extract c", "default/2/c", given)
    assert mount.type == "overlay" and snapshotter.fallbacks == {"conflict": 1}


def test_unbound_indexes_are_mounted_nosuid_nodev(client: SnapshotsClient,
                                                  layers: FakeLayers) -> None:
    layers.restricted = True
    _already_exists(client, "k8s.io/1/extract-1 c", "", labels(0))
    assert client.stat(CHAINS[0]).labels[LABEL_RESTRICTED] == "nosuid,nodev"
    (view,) = client.view("k8s.io/2/view", CHAINS[0])
    assert view.type == "bind" and {"ro", "nosuid", "nodev"} <= set(view.options)
    _already_exists(client, "k8s.io/3/extract-2 c", CHAINS[0], labels(1))
    (mount,) = client.prepare("k8s.io/4/ctr", CHAINS[1])
    assert {"nosuid", "nodev"} <= set(mount.options)


def test_dead_layers_are_mounted_again_or_unavailable(client: SnapshotsClient,
                                                      snapshotter: Snapshotter,
                                                      layers: FakeLayers) -> None:
    layers.restricted = True  # (every layer is checked, not only up to the first restricted)
    _already_exists(client, "k8s.io/1/extract-1 c", "", labels(0))
    _already_exists(client, "k8s.io/2/extract-2 c", CHAINS[0], labels(1))
    fs = snapshotter.fs_dir(snapshotter.stat(CHAINS[0]).id)
    top = snapshotter.fs_dir(snapshotter.stat(CHAINS[1]).id)
    layers.dead |= {fs, top}
    client.prepare("k8s.io/2/ctr", CHAINS[1])
    assert sorted(layers.restored) == sorted([fs, top])
    layers.restored.clear()
    layers.dead.add(fs)
    layers.restore_fails = True
    with pytest.raises(grpc.RpcError) as info:
        client.mounts("k8s.io/2/ctr")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "the registry is gone" in info.value.details()  # type: ignore[attr-defined]


def test_remove_unmounts_a_remote_layer(client: SnapshotsClient, snapshotter: Snapshotter,
                                        layers: FakeLayers) -> None:
    _already_exists(client, "k8s.io/1/extract-1 c", "", labels(0))
    fs = snapshotter.fs_dir(snapshotter.stat(CHAINS[0]).id)
    client.remove(CHAINS[0])
    assert layers.unmounted == [fs] and not fs.parent.exists()


def test_restart_forgets_half_mounted_layers_and_restores_dead_ones(tmp_path: Path) -> None:
    layers = FakeLayers()
    first = Snapshotter(tmp_path / "root", remote=layers)
    with running(first, tmp_path / "a.sock") as client:
        _already_exists(client, "k8s.io/1/extract-1 c", "", labels(0))
    fs = first.fs_dir(first.stat(CHAINS[0]).id)
    # a crash in the middle of mounting layer 1: its row is still pending
    pending = first.store.create(CHAINS[1], CHAINS[0], first.stat(CHAINS[0]).kind, {},
                                 remote="")
    first.fs_dir(pending.id).mkdir(parents=True)
    first.close()
    layers.dead.add(fs)  # and layer 0's daemon died meanwhile
    second = Snapshotter(tmp_path / "root", remote=layers)
    second.restore()
    assert layers.restored == [fs]
    assert second.store.find(CHAINS[1]) is None and not second.snapshot_dir(pending.id).exists()
    second.close()


def test_label_parsing_and_the_trust_seam() -> None:
    with pytest.raises(LayerFallback) as info:
        LayerRequest.from_labels({LABEL_SNAPSHOT_REF: CHAINS[0]})
    assert info.value.reason == "no-labels" and "disable_snapshot_annotations" in str(info.value)
    with pytest.raises(LayerFallback):
        LayerRequest.from_labels(labels(0) | {LABEL_LAYER_DIGEST: "sha256:short"})
    request = LayerRequest.from_labels(labels(0))
    assert request.layer_digest == LAYERS[0] and request.chain_id == CHAINS[0]

    class Finder:
        def __init__(self, bound: bool) -> None:
            self.bound = bound

        def find(self, request: LayerRequest) -> LayerIndex:
            return LayerIndex("r@" + MANIFEST, Path("m"), Path("z"), INDEX, bound=self.bound)

    with pytest.raises(LayerFallback) as info:
        resolve_layer(request, finder=Finder(False), policy=TrustPolicy())
    assert info.value.reason == "untrusted" and "--accept-unbound-indexes" in str(info.value)
    assert resolve_layer(request, finder=Finder(False),
                         policy=TrustPolicy(accept_unbound=True))[1] is True
    assert resolve_layer(request, finder=Finder(True), policy=TrustPolicy())[1] is False


def test_metrics_count_lazy_layers_and_fallbacks(tmp_path: Path) -> None:
    import httpx

    from hybrid_erofs.metrics.server import MetricsServer
    from hybrid_erofs.snapshotter.metrics import SnapshotterMetrics

    layers = FakeLayers(refuse={LAYERS[2]: "no-index"})
    metrics = SnapshotterMetrics()
    sn = Snapshotter(tmp_path / "root", remote=layers, metrics=metrics)
    server = MetricsServer(metrics.metrics, "127.0.0.1", 0)
    try:
        with running(sn, tmp_path / "sn.sock") as client:
            _already_exists(client, "k8s.io/1/extract-1 c", "", labels(0))
            _already_exists(client, "k8s.io/2/extract-2 c", CHAINS[0], labels(1))
            client.prepare("k8s.io/3/extract-3 c", CHAINS[1], labels(2))
            client.prepare("k8s.io/4/extract c", "", {LABEL_SNAPSHOT_REF: "sha256:" + "dd" * 32})
            layers.dead.add(sn.fs_dir(sn.stat(CHAINS[0]).id))
            client.prepare("k8s.io/5/ctr", CHAINS[1])
            text = httpx.get(server.url).text
    finally:
        server.close()
        sn.close()
    assert "hybrid_erofs_snapshotter_layers_lazy_total 2.0" in text
    assert 'hybrid_erofs_snapshotter_fallbacks_total{reason="no-index"} 1.0' in text
    assert 'hybrid_erofs_snapshotter_fallbacks_total{reason="no-labels"} 1.0' in text
    assert 'hybrid_erofs_snapshotter_fallbacks_total{reason="untrusted"} 0.0' in text
    assert "hybrid_erofs_snapshotter_layers_remounted_total 1.0" in text
    assert "hybrid_erofs_snapshotter_snapshots 5.0" in text
    assert "hybrid_erofs_snapshotter_snapshots_lazy 2.0" in text
    assert "hybrid_erofs_snapshotter_snapshots_active 3.0" in text


BINDING = "containerd.io/snapshot/hybrid-erofs/sidecar.digest"


def bound_labels(n: int, sidecar: str = "sha256:" + "5" * 64) -> dict[str, str]:
    return labels(n) | {BINDING: sidecar}


def _wait(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _ahead_names(snapshotter: Snapshotter) -> list[str]:
    return [snap.name for snap in snapshotter.store.all()
            if snap.name.startswith(AHEAD_PREFIX) and snap.remote]


def test_the_layers_above_are_mounted_ahead_and_adopted(client: SnapshotsClient,
                                                        snapshotter: Snapshotter,
                                                        layers: FakeLayers) -> None:
    """A bound layer's Prepare starts mounting the layers above it at once; their own
    Prepare finds them mounted and answers ALREADY_EXISTS without mounting again."""
    layers.above[LAYERS[0]] = [LayerRequest.from_labels(bound_labels(n)) for n in (1, 2)]
    _already_exists(client, f"k8s.io/1/extract-1 {CHAINS[0]}", "", bound_labels(0))
    _wait(lambda: len(_ahead_names(snapshotter)) == 2)
    assert sorted(layers.mounted) == sorted(LAYERS)
    # not containerd's yet: nothing lists them
    assert client.list(metadata_filter(CHAINS[1], CHAINS[0])) == []
    assert [info.name for (info,) in client.list()] == [CHAINS[0]]
    _already_exists(client, f"k8s.io/2/extract-2 {CHAINS[1]}", CHAINS[0], bound_labels(1))
    _already_exists(client, f"k8s.io/3/extract-3 {CHAINS[2]}", CHAINS[1], bound_labels(2))
    assert sorted(layers.mounted) == sorted(LAYERS)  # each layer mounted once
    ((info,),) = client.list(metadata_filter(CHAINS[2], CHAINS[1]))
    assert info.labels[LABEL_REMOTE] == "remote snapshot" and info.labels[LABEL_INDEX] == INDEX
    assert info.labels[BINDING] == bound_labels(2)[BINDING]
    assert _ahead_names(snapshotter) == [] and snapshotter.lazy == 3
    (mount,) = client.prepare("k8s.io/4/ctr", CHAINS[2])
    lowers = _opts(mount)["lowerdir"].split(":")
    assert [Path(p, "layer").read_text() for p in lowers] == [LAYERS[2], LAYERS[1], LAYERS[0]]


def test_a_layer_mounted_ahead_for_another_index_is_not_adopted(
        client: SnapshotsClient, snapshotter: Snapshotter, layers: FakeLayers) -> None:
    """Bound, or not used: the layer is adopted only when containerd's labels bind the
    index the layer was mounted ahead with."""
    other = LayerRequest.from_labels(bound_labels(1, sidecar="sha256:" + "6" * 64))
    layers.above[LAYERS[0]] = [other]
    _already_exists(client, f"k8s.io/1/extract-1 {CHAINS[0]}", "", bound_labels(0))
    _wait(lambda: len(_ahead_names(snapshotter)) == 1)
    ahead_fs = snapshotter.fs_dir(snapshotter.store.get(AHEAD_PREFIX + CHAINS[1]).id)
    _already_exists(client, f"k8s.io/2/extract-2 {CHAINS[1]}", CHAINS[0], bound_labels(1))
    assert layers.mounted.count(LAYERS[1]) == 2  # mounted again as containerd asked
    assert layers.unmounted == [ahead_fs] and not ahead_fs.parent.exists()
    assert client.stat(CHAINS[1]).labels[BINDING] == bound_labels(1)[BINDING]
    assert _ahead_names(snapshotter) == []


def test_layers_mounted_ahead_and_never_prepared_are_taken_down(tmp_path: Path) -> None:
    layers = FakeLayers(above={LAYERS[0]: [LayerRequest.from_labels(bound_labels(1))]})
    snapshotter = Snapshotter(tmp_path / "root", remote=layers, ahead_ttl_s=0.2)
    try:
        with running(snapshotter, tmp_path / "sn.sock") as client:
            _already_exists(client, f"k8s.io/1/extract-1 {CHAINS[0]}", "", bound_labels(0))
            _wait(lambda: len(layers.unmounted) == 1)
        assert snapshotter.store.find(AHEAD_PREFIX + CHAINS[1]) is None
        assert [snap.name for snap in snapshotter.store.all()] == [CHAINS[0]]
    finally:
        snapshotter.close()


def test_a_failed_ahead_mount_leaves_the_layer_to_its_prepare(client: SnapshotsClient,
                                                              snapshotter: Snapshotter,
                                                              layers: FakeLayers) -> None:
    layers.above[LAYERS[0]] = [LayerRequest.from_labels(bound_labels(1))]
    layers.refuse[LAYERS[1]] = "no-index"
    _already_exists(client, f"k8s.io/1/extract-1 {CHAINS[0]}", "", bound_labels(0))
    _wait(lambda: layers.mounted.count(LAYERS[1]) == 1)
    (mount,) = client.prepare(f"k8s.io/2/extract-2 {CHAINS[1]}", CHAINS[0], bound_labels(1))
    assert mount.type == "overlay" and snapshotter.fallbacks == {"no-index": 1}
    assert [snap.name for snap in snapshotter.store.all()
            if snap.name.startswith(AHEAD_PREFIX)] == []


def test_restart_takes_down_the_last_instances_ahead_mounts(tmp_path: Path) -> None:
    layers = FakeLayers(above={LAYERS[0]: [LayerRequest.from_labels(bound_labels(1))]})
    first = Snapshotter(tmp_path / "root", remote=layers)
    with running(first, tmp_path / "a.sock") as client:
        _already_exists(client, f"k8s.io/1/extract-1 {CHAINS[0]}", "", bound_labels(0))
        _wait(lambda: len(_ahead_names(first)) == 1)
    ahead_fs = first.fs_dir(first.store.get(AHEAD_PREFIX + CHAINS[1]).id)
    first.close()
    second = Snapshotter(tmp_path / "root", remote=FakeLayers())
    second.restore()
    assert [snap.name for snap in second.store.all()] == [CHAINS[0]]
    assert not ahead_fs.parent.exists()
    second.close()
