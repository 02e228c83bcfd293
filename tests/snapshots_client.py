"""A client of containerd's snapshots API for tests: what containerd's proxy plugin sends,
with the project's generated messages, and an in-process server on a unix socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from hybrid_erofs.snapshotter.api import snapshots_pb2 as pb
from hybrid_erofs.snapshotter.server import SERVICE, serve
from hybrid_erofs.snapshotter.snapshotter import Snapshotter

_RESPONSES: dict[str, Any] = {
    "Prepare": pb.PrepareSnapshotResponse, "View": pb.ViewSnapshotResponse,
    "Mounts": pb.MountsResponse, "Commit": empty_pb2.Empty, "Remove": empty_pb2.Empty,
    "Stat": pb.StatSnapshotResponse, "Update": pb.UpdateSnapshotResponse,
    "Usage": pb.UsageResponse, "Cleanup": empty_pb2.Empty,
}


class SnapshotsClient:
    """One method per RPC, named as containerd's; `snapshotter` is the proxy plugin's name."""

    def __init__(self, address: Path, snapshotter: str = "hybrid-erofs") -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.name = snapshotter

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Any) -> Any:
        stub = self.channel.unary_unary(f"/{SERVICE}/{method}",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=_RESPONSES[method].FromString)
        return stub(request, timeout=60)

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None
                ) -> list[pb.Mount]:
        return list(self.call("Prepare", pb.PrepareSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels=labels or {})).mounts)

    def view(self, key: str, parent: str = "") -> list[pb.Mount]:
        return list(self.call("View", pb.ViewSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent)).mounts)

    def mounts(self, key: str) -> list[pb.Mount]:
        return list(self.call("Mounts", pb.MountsRequest(snapshotter=self.name, key=key)).mounts)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.call("Commit", pb.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key,
                                                     labels=labels or {}))

    def remove(self, key: str) -> None:
        self.call("Remove", pb.RemoveSnapshotRequest(snapshotter=self.name, key=key))

    def stat(self, key: str) -> pb.Info:
        return self.call("Stat", pb.StatSnapshotRequest(snapshotter=self.name, key=key)).info

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> pb.Info:
        info = pb.Info(name=name, labels=labels)
        req = pb.UpdateSnapshotRequest(snapshotter=self.name, info=info)
        req.update_mask.paths.extend(paths)
        return self.call("Update", req).info

    def list(self, *filters: str) -> list[list[pb.Info]]:
        """The streamed batches."""
        stub = self.channel.unary_stream(f"/{SERVICE}/List",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=pb.ListSnapshotsResponse.FromString)
        return [list(reply.info) for reply in stub(pb.ListSnapshotsRequest(
            snapshotter=self.name, filters=list(filters)), timeout=60)]

    def usage(self, key: str) -> pb.UsageResponse:
        return self.call("Usage", pb.UsageRequest(snapshotter=self.name, key=key))

    def cleanup(self) -> None:
        self.call("Cleanup", pb.CleanupRequest(snapshotter=self.name))


@contextmanager
def running(snapshotter: Snapshotter, address: Path) -> Iterator[SnapshotsClient]:
    """Serve `snapshotter` on `address` in a thread for the duration."""
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(snapshotter, address),
                              kwargs={"ready": ready.set, "stop": stop}, daemon=True)
    thread.start()
    assert ready.wait(10), "the snapshotter did not start"
    client = SnapshotsClient(address)
    try:
        yield client
    finally:
        client.close()
        stop.set()
        thread.join(10)
