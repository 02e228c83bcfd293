"""A containerd remote snapshotter: the snapshots gRPC API over sqlite state, overlay mounts,
and image layers mounted lazily as EROFS (with containerd applying the layer as fallback)."""
