"""The committed snapshots_pb2 module is what tools/gen_snapshots_proto.sh makes of the .proto,
and the wire names and field numbers are containerd's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from hybrid_erofs.snapshotter.api import snapshots_pb2 as pb
from tests.conftest import ROOT, ci_required

API = ROOT / "src" / "hybrid_erofs" / "snapshotter" / "api"


def test_generated_module_matches_the_proto(tmp_path: Path) -> None:
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        ci_required("grpcio-tools is not installed (pip install -e '.[test]')")
    src = tmp_path / "src" / "hybrid_erofs" / "snapshotter" / "api"
    src.mkdir(parents=True)
    shutil.copy(API / "snapshots.proto", src)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--pyi_out=.", "hybrid_erofs/snapshotter/api/snapshots.proto"],
                   cwd=tmp_path / "src", check=True)
    for name in ("snapshots_pb2.py", "snapshots_pb2.pyi"):
        assert (src / name).read_text() == (API / name).read_text(), (
            f"{name} is stale: run tools/gen_snapshots_proto.sh")


def test_wire_names_and_field_numbers_are_containerds() -> None:
    service = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in service.methods] == [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup"]
    assert service.methods_by_name["List"].server_streaming

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert numbers(pb.PrepareSnapshotRequest) == {"snapshotter": 1, "key": 2, "parent": 3,
                                                  "labels": 4}
    assert numbers(pb.CommitSnapshotRequest) == {"snapshotter": 1, "name": 2, "key": 3,
                                                 "labels": 4, "parent": 5}
    assert numbers(pb.Info) == {"name": 1, "parent": 2, "kind": 3, "created_at": 4,
                                "updated_at": 5, "labels": 6}
    assert numbers(pb.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert numbers(pb.UpdateSnapshotRequest) == {"snapshotter": 1, "info": 2, "update_mask": 3}
    assert numbers(pb.ListSnapshotsRequest) == {"snapshotter": 1, "filters": 2}
    assert numbers(pb.UsageResponse) == {"size": 1, "inodes": 2}
    assert {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["Kind"].values} == {
        "UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3}
