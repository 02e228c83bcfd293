"""The snapshots gRPC API as containerd's proxy plugin calls it: overlay mounts as containerd's
overlay snapshotter makes them, its metastore's rules and status codes, List batches and
filters, Usage, Cleanup, and state that survives a restart (sqlite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hybrid_erofs.snapshotter.api import snapshots_pb2 as pb
from hybrid_erofs.snapshotter.snapshotter import Snapshotter
from tests.snapshots_client import SnapshotsClient, running


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def client(root: Path, tmp_path: Path) -> Iterator[SnapshotsClient]:
    snapshotter = Snapshotter(root)
    with running(snapshotter, tmp_path / "sn.sock") as client:
        yield client
    snapshotter.close()


def _code(call: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return,attr-defined]


def _opts(mount: pb.Mount) -> dict[str, str]:
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in mount.options)


def _layer(client: SnapshotsClient, name: str, parent: str = "", content: str = "") -> Path:
    """Prepare, write a file into the upper dir, commit as `name`; returns the dir."""
    (mount,) = client.prepare(f"extract {name}", parent)
    upper = Path(mount.source if mount.type == "bind" else _opts(mount)["upperdir"])
    (upper / name.replace("/", "_")).write_text(content or name)
    client.commit(name, f"extract {name}")
    return upper


def test_mounts_are_those_of_containerds_overlay_snapshotter(client: SnapshotsClient,
                                                             root: Path) -> None:
    (bind,) = client.prepare("a")
    assert bind.type == "bind" and bind.options == ["rw", "rbind"]
    assert Path(bind.source).is_dir() and Path(bind.source).parent.parent == root / "snapshots"
    client.commit("l1", "a")
    l2 = _layer(client, "l2", "l1")
    (one,) = client.view("v1", "l1")  # a view of one layer: that layer, read-only
    assert (one.type, one.source, list(one.options)) == ("bind", bind.source, ["ro", "rbind"])
    (view,) = client.view("v2", "l2")
    assert view.type == "overlay" and view.source == "overlay"
    assert _opts(view)["lowerdir"] == f"{l2}:{bind.source}"  # nearest parent first
    assert "upperdir" not in _opts(view)
    (active,) = client.prepare("c", "l2")
    opts = _opts(active)
    assert opts["lowerdir"] == f"{l2}:{bind.source}"
    assert Path(opts["upperdir"]).is_dir() and Path(opts["workdir"]).is_dir()
    assert client.mounts("c") == [active] and client.mounts("v2") == [view]
    (empty_view,) = client.view("v0")
    assert empty_view.type == "bind" and list(empty_view.options) == ["ro", "rbind"]


def test_status_codes_are_the_ones_containerd_maps(client: SnapshotsClient) -> None:
    client.prepare("a")
    assert _code(client.prepare, "a") == grpc.StatusCode.ALREADY_EXISTS
    assert _code(client.prepare, "b", "missing") == grpc.StatusCode.NOT_FOUND
    assert _code(client.prepare, "b", "a") == grpc.StatusCode.INVALID_ARGUMENT  # not committed
    assert _code(client.stat, "nope") == grpc.StatusCode.NOT_FOUND
    assert _code(client.mounts, "nope") == grpc.StatusCode.NOT_FOUND
    assert _code(client.remove, "nope") == grpc.StatusCode.NOT_FOUND
    assert _code(client.usage, "nope") == grpc.StatusCode.NOT_FOUND
    client.view("v")
    assert _code(client.commit, "x", "v") == grpc.StatusCode.FAILED_PRECONDITION
    client.commit("l1", "a")
    assert _code(client.mounts, "l1") == grpc.StatusCode.FAILED_PRECONDITION
    client.prepare("c", "l1")
    assert _code(client.commit, "l1", "c") == grpc.StatusCode.ALREADY_EXISTS
    assert _code(client.remove, "l1") == grpc.StatusCode.FAILED_PRECONDITION  # has a child
    assert _code(client.list, "kind=") == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(client.update, "l1", {}, ["parent"]) == grpc.StatusCode.INVALID_ARGUMENT


def test_stat_commit_and_update(client: SnapshotsClient) -> None:
    client.prepare("a", labels={"x": "1", "containerd.io/snapshot.ref": "c1"})
    info = client.stat("a")
    assert (info.name, info.parent, info.kind) == ("a", "", pb.ACTIVE)
    assert dict(info.labels) == {"x": "1", "containerd.io/snapshot.ref": "c1"}
    assert info.created_at.seconds > 1_700_000_000
    client.commit("l1", "a", {"y": "2"})
    assert _code(client.stat, "a") == grpc.StatusCode.NOT_FOUND
    info = client.stat("l1")
    assert (info.kind, dict(info.labels)) == (pb.COMMITTED, {"y": "2"})
    client.prepare("b", "l1")
    assert client.stat("b").parent == "l1"
    assert dict(client.update("l1", {"z": "3"}, ["labels.z"]).labels) == {"y": "2", "z": "3"}
    assert dict(client.update("l1", {}, ["labels.y"]).labels) == {"z": "3"}
    assert dict(client.update("l1", {"n": "1"}, ["labels"]).labels) == {"n": "1"}
    assert dict(client.update("l1", {"m": "2"}, []).labels) == {"m": "2"}
    assert dict(client.stat("l1").labels) == {"m": "2"}


def test_list_streams_batches_and_honours_filters(client: SnapshotsClient) -> None:
    parent = ""
    for n in range(130):
        client.prepare(f"k{n}", parent, labels={"containerd.io/snapshot.ref": f"c{n}"})
        client.commit(f"n{n}", f"k{n}", {"containerd.io/snapshot.ref": f"c{n}"})
        parent = f"n{n}"
    client.prepare("active", parent)
    batches = client.list()
    assert [len(b) for b in batches] == [100, 31]
    assert {i.name for b in batches for i in b} == {f"n{n}" for n in range(130)} | {"active"}
    (found,) = client.list('labels."containerd.io/snapshot.ref"==c7,parent=="n6"')
    assert [i.name for i in found] == ["n7"]
    assert client.list('labels."containerd.io/snapshot.ref"==c7,parent=="n5"') == []
    (found,) = client.list('labels."containerd.io/snapshot.ref"==c0,parent==""')
    assert [i.name for i in found] == ["n0"]
    (found,) = client.list("kind==active", "name==n3")
    assert sorted(i.name for i in found) == ["active", "n3"]


def test_remove_usage_and_cleanup(client: SnapshotsClient, root: Path) -> None:
    (mount,) = client.prepare("a")
    upper = Path(mount.source)
    (upper / "f").write_bytes(b"x" * 10000)
    (upper / "d").mkdir()
    (upper / "hard").hardlink_to(upper / "f")
    usage = client.usage("a")
    assert usage.inodes == 3 and usage.size >= 10000  # fs, d, and f once (hard link)
    client.commit("l1", "a")
    assert client.usage("l1") == usage
    directory = upper.parent
    client.remove("l1")
    assert not directory.exists()
    orphan = root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)
    client.cleanup()
    assert not orphan.exists()
    (mount,) = client.prepare("b")
    client.cleanup()
    assert Path(mount.source).is_dir()


def test_state_survives_a_restart(root: Path, tmp_path: Path) -> None:
    first = Snapshotter(root)
    with running(first, tmp_path / "a.sock") as client:
        _layer(client, "l1")
        client.prepare("c", "l1", labels={"k": "v"})
        before = client.list()
    first.close()
    second = Snapshotter(root)
    with running(second, tmp_path / "b.sock") as client:
        assert client.list() == before
        (mount,) = client.mounts("c")
        assert Path(_opts(mount)["lowerdir"], "l1").read_text() == "l1"
        client.commit("l2", "c")
        assert client.stat("l2").parent == "l1"
    second.close()


def test_cli_defaults_and_one_line_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hybrid_erofs.cli import main

    help_text = CliRunner().invoke(main, ["snapshotter", "--help"]).output
    assert "--address" in help_text and "/run/hybrid-erofs/snapshotter.sock" in help_text
    assert "--root" in help_text and "/var/lib/hybrid-erofs/snapshotter" in help_text
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["snapshotter", "--root", str(blocker / "root"),
                                       "--address", str(tmp_path / "sn.sock")])
    assert result.exit_code == 1 and result.exception is not None
    assert result.output == (f"Error: {blocker / 'root'}: cannot keep the snapshotter's state "
                             f"there: Not a directory\n")
    result = CliRunner().invoke(main, ["snapshotter", "--root", str(tmp_path / "root"),
                                       "--address", str(blocker)])
    assert result.exit_code == 1
    assert result.output == f"Error: {blocker}: exists and is not a socket; not replacing it\n"
