"""Generated protobuf messages of containerd's snapshots API (tools/gen_snapshots_proto.sh)."""
