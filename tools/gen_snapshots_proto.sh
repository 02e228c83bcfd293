#!/usr/bin/env bash
# Regenerate src/hybrid_erofs/snapshotter/api/snapshots_pb2.py(i) from snapshots.proto.
# Needs grpcio-tools (pip install grpcio-tools); the output is committed, so installing
# hybrid-erofs needs only the protobuf runtime. The gRPC service glue is hand-written
# (snapshotter/server.py), so only the message module is generated.
set -euo pipefail
cd "$(dirname "$0")/../src"
python3 -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. hybrid_erofs/snapshotter/api/snapshots.proto
python3 -m grpc_tools.protoc --version
