"""`hybrid-erofs snapshotter`: a thin wrapper over hybrid_erofs.snapshotter."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import click

from ..fetching.background import FetchPolicy
from ..mounting.lifecycle import READY_TIMEOUT_S, VIAS
from .options import SizeType, fetch_options, metrics_address_option

DEFAULT_ADDRESS = Path("/run/hybrid-erofs/snapshotter.sock")
DEFAULT_ROOT = Path("/var/lib/hybrid-erofs/snapshotter")


@click.command("snapshotter")
@click.option("--address", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_ADDRESS, show_default=True,
              help="Unix socket for containerd's proxy plugin (`address` in its config).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_ROOT, show_default=True,
              help="State: metadata.db and snapshots/ID/{fs,work}.")
@click.option("--accept-unbound-indexes", is_flag=True,
              help="Use indexes found through the registry's referrers that the image digest "
                   "does not cover; their layers are mounted nosuid,nodev for containers.")
@click.option("--no-remote", is_flag=True,
              help="Never mount layers lazily: a plain overlay snapshotter.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Chunk and index cache [default: /var/cache/hybrid-erofs].")
@click.option("--cache-max-size", "cache_max_bytes", type=SizeType(), metavar="SIZE",
              help="Most the chunk cache may hold (see `mount --help`) [default: half the "
                   "free space of its filesystem, at most 10GiB].")
@click.option("--insecure", is_flag=True,
              help="Allow plain HTTP to registries that are not on localhost.")
@click.option("--hosts-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Mirrors and plain-HTTP registries as containerd's hosts.toml files "
                   "(DIR/HOST/hosts.toml, its config_path layout).")
@click.option("--via", type=click.Choice(VIAS), default="auto", show_default=True,
              help="How layer daemons export their device (see `mount --help`).")
@click.option("--mount-timeout", "timeout_s", type=float, default=READY_TIMEOUT_S,
              show_default=True, help="Seconds to wait for a layer's mount to answer.")
@click.option("--no-mount-ahead", is_flag=True,
              help="Mount an image's lazy layers one after the other, as containerd prepares "
                   "them (default: a layer's Prepare starts mounting the layers above it, in "
                   "parallel).")
@metrics_address_option
@fetch_options
def snapshotter_command(address: Path, root: Path, accept_unbound_indexes: bool,
                        no_remote: bool, cache_dir: Path | None,
                        cache_max_bytes: int | None, insecure: bool,
                        hosts_dir: Path | None, via: str, timeout_s: float,
                        no_mount_ahead: bool, metrics_address: tuple[str, int] | None,
                        fetch: FetchPolicy | None) -> None:
    """Serve containerd's snapshots API on ADDRESS, in the foreground, until SIGTERM.

    Layers of images that carry a hybrid-erofs index (`hybrid-erofs index REF --all-layers
    --push`) are mounted lazily when containerd's CRI plugin pulls them with its
    remote-snapshot labels; every other layer is downloaded and applied by containerd into
    ordinary overlay snapshots. Registry credentials come from auth.json / the docker
    config, as for `mount`. Register it in containerd's config as a proxy plugin:

    \b
        [proxy_plugins.hybrid-erofs]
          type = "snapshot"
          address = "/run/hybrid-erofs/snapshotter.sock"
        [plugins."io.containerd.grpc.v1.cri".containerd]
          snapshotter = "hybrid-erofs"
          disable_snapshot_annotations = false

    See docs/containerd.md. Needs root.
    """
    from ..device import RegistryOptions
    from ..metrics.server import MetricsServer
    from ..oci.client import warm_up
    from ..snapshotter.hosts import HostsConfig
    from ..snapshotter.metrics import SnapshotterMetrics
    from ..snapshotter.remote import LazyLayers, TrustPolicy
    from ..snapshotter.server import serve
    from ..snapshotter.snapshotter import Snapshotter

    package_log = logging.getLogger("hybrid_erofs.snapshotter")
    if package_log.getEffectiveLevel() > logging.INFO:
        package_log.setLevel(logging.INFO)  # a daemon says what it does with each layer
    remote = None if no_remote else LazyLayers(
        registry=RegistryOptions(cache_dir=cache_dir, cache_max_bytes=cache_max_bytes,
                                 insecure=insecure),
        policy=TrustPolicy(accept_unbound=accept_unbound_indexes),
        hosts=HostsConfig(hosts_dir), via=via, timeout_s=timeout_s, fetch=fetch)
    metrics = SnapshotterMetrics()
    server = (MetricsServer(metrics.metrics, *metrics_address)
              if metrics_address is not None else None)
    try:
        snapshotter = Snapshotter(root, remote=remote, metrics=metrics,
                                  ahead=not no_mount_ahead)
    except BaseException:
        if server is not None:
            server.close()
        raise

    def restore() -> None:
        try:
            snapshotter.restore()
        except Exception as exc:  # a thread's error would otherwise end as a traceback
            logging.getLogger("hybrid_erofs.snapshotter").error("restoring the state: %s", exc)

    def restore_in_background() -> None:
        # Serving first: containerd's calls must not wait for layers to be mounted again
        # (a Prepare or Mounts that needs one mounts it itself).
        threading.Thread(target=restore, name="restore", daemon=True).start()
        if remote is not None:  # the first pull after a start need not load the HTTP stack
            threading.Thread(target=warm_up, name="registry-warm-up", daemon=True).start()

    try:
        serve(snapshotter, address, ready=restore_in_background)
    finally:
        if server is not None:
            server.close()
        snapshotter.close()


COMMANDS: list[click.Command] = [snapshotter_command]
