"""`hybrid-erofs snapshotter`: a thin wrapper over hybrid_erofs.snapshotter."""

from __future__ import annotations

import logging
from pathlib import Path

import click

DEFAULT_ADDRESS = Path("/run/hybrid-erofs/snapshotter.sock")
DEFAULT_ROOT = Path("/var/lib/hybrid-erofs/snapshotter")


@click.command("snapshotter")
@click.option("--address", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_ADDRESS, show_default=True,
              help="Unix socket for containerd's proxy plugin (`address` in its config).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_ROOT, show_default=True,
              help="State: metadata.db and snapshots/ID/{fs,work}.")
def snapshotter_command(address: Path, root: Path) -> None:
    """Serve containerd's snapshots API on ADDRESS, in the foreground, until SIGTERM.

    Register it in containerd's config as a proxy plugin and select it for CRI:

    \b
        [proxy_plugins.hybrid-erofs]
          type = "snapshot"
          address = "/run/hybrid-erofs/snapshotter.sock"
        [plugins."io.containerd.grpc.v1.cri".containerd]
          snapshotter = "hybrid-erofs"
          disable_snapshot_annotations = false

    See docs/containerd.md. Needs root.
    """
    from ..snapshotter.server import serve
    from ..snapshotter.snapshotter import Snapshotter

    package_log = logging.getLogger("hybrid_erofs.snapshotter")
    if package_log.getEffectiveLevel() > logging.INFO:
        package_log.setLevel(logging.INFO)  # a daemon says what it does with each layer
    snapshotter = Snapshotter(root)
    try:
        serve(snapshotter, address)
    finally:
        snapshotter.close()


COMMANDS: list[click.Command] = [snapshotter_command]
