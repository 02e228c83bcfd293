"""gRPC glue: containerd.services.snapshots.v1.Snapshots on a unix socket, backed by a
Snapshotter. Errors travel as the status codes containerd maps back to its errdefs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from ..errors import HybridErofsError, SnapshotError
from .api import snapshots_pb2 as pb
from .filters import parse_filters
from .snapshotter import Mount, Snapshotter
from .store import Snapshot

log = logging.getLogger(__name__)

SERVICE = "containerd.services.snapshots.v1.Snapshots"
LIST_BATCH = 100  # Info messages per List reply, as containerd's own snapshots service

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _mounts(mounts: list[Mount]) -> list[pb.Mount]:
    return [pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _info(snap: Snapshot) -> pb.Info:
    info = pb.Info(name=snap.name, parent=snap.parent, kind=snap.kind.name,
                   labels=dict(snap.labels))
    info.created_at.FromNanoseconds(snap.created_ns)
    info.updated_at.FromNanoseconds(snap.updated_ns)
    return info


class SnapshotsService:
    """One method per RPC; each turns a request into a Snapshotter call."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def Prepare(self, req: pb.PrepareSnapshotRequest) -> pb.PrepareSnapshotResponse:
        return pb.PrepareSnapshotResponse(
            mounts=_mounts(self.sn.prepare(req.key, req.parent, dict(req.labels))))

    def View(self, req: pb.ViewSnapshotRequest) -> pb.ViewSnapshotResponse:
        return pb.ViewSnapshotResponse(
            mounts=_mounts(self.sn.view(req.key, req.parent, dict(req.labels))))

    def Mounts(self, req: pb.MountsRequest) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(req.key)))

    def Commit(self, req: pb.CommitSnapshotRequest) -> empty_pb2.Empty:
        self.sn.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    def Remove(self, req: pb.RemoveSnapshotRequest) -> empty_pb2.Empty:
        self.sn.remove(req.key)
        return empty_pb2.Empty()

    def Stat(self, req: pb.StatSnapshotRequest) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(self.sn.stat(req.key)))

    def Update(self, req: pb.UpdateSnapshotRequest) -> pb.UpdateSnapshotResponse:
        snap = self.sn.update(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info(snap))

    def List(self, req: pb.ListSnapshotsRequest) -> Iterator[pb.ListSnapshotsResponse]:
        batch: list[pb.Info] = []
        for snap in self.sn.walk(parse_filters(req.filters)):
            batch.append(_info(snap))
            if len(batch) == LIST_BATCH:
                yield pb.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield pb.ListSnapshotsResponse(info=batch)

    def Usage(self, req: pb.UsageRequest) -> pb.UsageResponse:
        usage = self.sn.usage(req.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, req: pb.CleanupRequest) -> empty_pb2.Empty:
        self.sn.cleanup()
        return empty_pb2.Empty()


def _abort(context: grpc.ServicerContext, name: str, exc: Exception) -> None:
    if isinstance(exc, SnapshotError):
        log.debug("%s: %s", name, exc)
        context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
    log.error("%s: %s", name, exc, exc_info=not isinstance(exc, HybridErofsError | OSError))
    context.abort(grpc.StatusCode.UNKNOWN, f"{name}: {exc}")


def _unary(name: str, fn: Callable[[_Req], _Resp]) -> Callable[[_Req, grpc.ServicerContext], _Resp]:
    def handler(req: _Req, context: grpc.ServicerContext) -> _Resp:
        try:
            return fn(req)
        except Exception as exc:
            _abort(context, name, exc)
            raise AssertionError("unreachable") from exc

    return handler


def _stream(name: str, fn: Callable[[_Req], Iterator[_Resp]]
            ) -> Callable[[_Req, grpc.ServicerContext], Iterator[_Resp]]:
    def handler(req: _Req, context: grpc.ServicerContext) -> Iterator[_Resp]:
        try:
            yield from fn(req)
        except Exception as exc:
            _abort(context, name, exc)

    return handler


def generic_handler(service: SnapshotsService) -> grpc.GenericRpcHandler:
    """The method table, written out instead of a generated *_pb2_grpc module."""
    requests: Mapping[str, Any] = {
        "Prepare": pb.PrepareSnapshotRequest, "View": pb.ViewSnapshotRequest,
        "Mounts": pb.MountsRequest, "Commit": pb.CommitSnapshotRequest,
        "Remove": pb.RemoveSnapshotRequest, "Stat": pb.StatSnapshotRequest,
        "Update": pb.UpdateSnapshotRequest, "Usage": pb.UsageRequest,
        "Cleanup": pb.CleanupRequest,
    }
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(name, getattr(service, name)), request_deserializer=req.FromString,
            response_serializer=lambda msg: msg.SerializeToString())
        for name, req in requests.items()
    }
    handlers["List"] = grpc.unary_stream_rpc_method_handler(
        _stream("List", service.List), request_deserializer=pb.ListSnapshotsRequest.FromString,
        response_serializer=lambda msg: msg.SerializeToString())
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def serve(snapshotter: Snapshotter, address: Path, *, max_workers: int = 16,
          ready: Callable[[], None] | None = None,
          stop: threading.Event | None = None) -> None:
    """Serve on unix socket `address` until SIGTERM/SIGINT (or `stop` is set)."""
    try:
        address.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        if address.is_socket():
            address.unlink()  # a previous instance's; bind() would fail on it
    except OSError as exc:
        raise SnapshotError(f"{address}: cannot listen there: {exc.strerror or exc}") from exc
    if address.exists():
        raise SnapshotError(f"{address}: exists and is not a socket; not replacing it")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="snapshots"))
    server.add_generic_rpc_handlers((generic_handler(SnapshotsService(snapshotter)),))
    old_umask = os.umask(0o177)  # the socket: root only, as containerd's own
    try:
        server.add_insecure_port(f"unix://{address}")
    except RuntimeError as exc:  # grpc's way to say bind() failed
        raise SnapshotError(f"{address}: cannot listen there: {exc}") from exc
    finally:
        os.umask(old_umask)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    server.start()
    log.info("serving containerd snapshots API on %s (root %s)", address, snapshotter.root)
    if ready is not None:
        ready()
    try:
        stop.wait()
    finally:
        server.stop(grace=5).wait()
        with contextlib.suppress(FileNotFoundError):
            address.unlink()
