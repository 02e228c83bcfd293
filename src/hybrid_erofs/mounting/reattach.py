"""`hybrid-erofs mount --reattach`: a mount whose daemon died is torn down and mounted again
from its state record (a layer mount, or an image mount from the layers it lists)."""

from __future__ import annotations

import os
from pathlib import Path

from ..device import RegistryOptions
from ..errors import MountError
from ..fetching.background import FetchPolicy
from ..trust.bound import ZinfoLater
from .image import ImageLayer, mount_image
from .layer import mount_layer
from .lifecycle import (
    READY_TIMEOUT_S,
    cleanup_mount,
    daemon_alive,
    find_mount,
    require_root,
    unmount,
)
from .state import MountRecord


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' as recorded -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def reattach(mountpoint: str | os.PathLike[str], *, password: str | None = None,
             timeout_s: float = READY_TIMEOUT_S) -> MountRecord:
    """Restore a mount whose daemon died: tear down what is left, mount again from the record.

    FUSE cannot resume: once its daemon is gone the kernel has aborted the connection and the
    EROFS mount on the file only returns EIO, so this is umount + mount (open files are lost).
    Registry credentials are read again from their source (auth files), or `password`.
    An image mount is mounted again from the layers its record lists.
    """
    require_root("mount --reattach")
    path, paths, record = find_mount(mountpoint)
    if daemon_alive(record):
        try:
            os.listdir(path)
        except OSError:
            unmount(path, lazy=True)
        else:
            raise MountError(f"{mountpoint}: daemon {record.daemon_pid} is alive and the mount "
                             f"answers: nothing to reattach")
    else:
        cleanup_mount(paths, record)
    settings = record.registry
    if settings.password_from == "stdin" and password is None:
        raise MountError(f"{mountpoint}: was mounted with --password-stdin: give the password "
                         f"again (--password-stdin)")
    registry = RegistryOptions(
        platform=settings.platform, layer=settings.layer, blob=settings.blob,
        username=settings.username, password=password, insecure=settings.insecure,
        cache_dir=Path(settings.cache_dir) if settings.cache_dir else None,
        cache_max_bytes=settings.cache_max_bytes, retries=settings.retries,
        retry_delay_s=settings.retry_delay_s, failure_ttl_s=settings.failure_ttl_s,
        memory_cache_bytes=settings.memory_cache_bytes)
    metrics = split_address(record.metrics_address) if record.metrics_address else None
    # Not the warm-up a daemon of the snapshotter followed: it belonged to the first start.
    fetch = FetchPolicy.restored(record.fetch)
    if record.is_image:
        layers = [ImageLayer(layer.source, Path(layer.meta),
                             Path(layer.zinfo) if layer.zinfo else None, layer.blob,
                             trust=layer.trust,
                             prefetch=Path(layer.prefetch) if layer.prefetch else None)
                  for layer in record.layers]
        again = mount_image(record.source, path, layers, registry=registry, via=record.via,
                            timeout_s=timeout_s, metrics_address=metrics, fetch=fetch)
        assert again is not None
        return again
    assert record.meta is not None
    # A layer started on its profile zinfo whose zinfo had not come yet starts on it again
    # (the new daemon fetches the zinfo by its bound digest), or on the zinfo if it came.
    remounted = mount_layer(record.source, path, meta=Path(record.meta),
                            zinfo=Path(record.zinfo) if record.zinfo else None,
                            registry=registry, via=record.via, timeout_s=timeout_s,
                            metrics_address=metrics, trust=record.trust, fetch=fetch,
                            prefetch=Path(record.prefetch) if record.prefetch else None,
                            later=ZinfoLater.from_json(record.later))
    assert remounted is not None
    return remounted
