"""`hybrid-erofs mount-image`: a thin wrapper over hybrid_erofs.mounting.image."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..device import RegistryOptions
from ..fetching.background import FetchPolicy
from ..mounting.image import load_plan, mount_image, run_image_mount
from ..mounting.lifecycle import READY_TIMEOUT_S, VIAS, require_root
from ..trust.policy import TrustPolicy
from .mount_cmd import _detach_stdin
from .options import fetch_options, metrics_address_option, registry_options, trust_options


@click.command("mount-image")
@click.argument("reference", metavar="REF")
@click.argument("mountpoint")
@click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where `hybrid-erofs index REF --all-layers -o DIR` wrote index.json and "
                   "each layer's zinfo and meta (layers it skipped for their size are indexed "
                   "here, into the cache).")
@click.option("--via", type=click.Choice(VIAS), default="auto", show_default=True,
              help="auto: kernel NBD when /dev/nbd* exists, else a FUSE file per layer "
                   "mounted with mount(2) (a loop device when the kernel lacks file-backed "
                   "EROFS).")
@click.option("--foreground", is_flag=True,
              help="Serve in this process until SIGTERM (systemd Type=simple/notify).")
@click.option("--timeout", "timeout_s", type=float, default=READY_TIMEOUT_S, show_default=True,
              help="Seconds to wait for the mount to answer.")
@click.option("--_daemon-ready-fd", "ready_fd", type=int, hidden=True)
@click.option("--_plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path),
              hidden=True)
@metrics_address_option
@registry_options
@trust_options
@fetch_options
def mount_image_command(reference: str, mountpoint: str, index_dir: Path | None, via: str,
                        foreground: bool, timeout_s: float, ready_fd: int | None,
                        plan_file: Path | None, metrics_address: tuple[str, int] | None,
                        registry: RegistryOptions, policy: TrustPolicy,
                        fetch: FetchPolicy | None) -> None:
    """Mount every layer of image REF lazily and stack them read-only on MOUNTPOINT.

    REF is a registry reference or oci:DIR[:TAG]. Without --index-dir, the index that
    `hybrid-erofs index REF --all-layers --push` published is found in the registry and
    cached: bound to the image (mount the pull_ref it printed), or attached to it and signed
    by a key this node trusts; an index that is neither is refused unless --accept-unbound
    (layers too small to have been indexed are indexed here);
    with it, each layer's zinfo and meta come from that directory. One daemon serves all
    layers; each is mounted as EROFS and overlayfs merges them (deleted files, opaque
    directories and all), read-only. --platform picks the image of a multi-platform index
    [default: this host's]. After --fetch-delay seconds every layer is fetched in full in
    the background and verified (--no-background-fetch: only what reads need). Needs root.

    \b
    Examples:
        hybrid-erofs mount-image registry.example.com/app:1.2 /srv/app
        hybrid-erofs index registry.example.com/app:1.2 --all-layers -o /var/lib/idx/app
        hybrid-erofs mount-image --index-dir /var/lib/idx/app \\
            registry.example.com/app:1.2 /srv/app
        echo "$TOKEN" | hybrid-erofs mount-image --username ci --password-stdin \\
            --platform linux/arm64 --index-dir idx registry.example.com/app:1.2 /srv/app
        hybrid-erofs mount-image --index-dir idx oci:./layout:1.2 /srv/app
        hybrid-erofs status
        hybrid-erofs umount /srv/app
    """
    if registry.layer is not None or registry.blob is not None:
        raise click.UsageError("--layer and --blob do not apply: mount-image mounts every "
                               "layer of the image")
    require_root("mount-image")  # before finding an index in the registry
    if plan_file is not None:  # the daemon that `mount-image` started
        layers = load_plan(plan_file)
    else:
        from ..mounting.discovery import discover_image_plan, plan_from_index

        def say(line: str) -> None:
            click.echo(line, err=True)

        if index_dir is None:
            plan = discover_image_plan(reference, registry=registry, policy=policy,
                                       progress=say)
        else:
            plan = plan_from_index(index_dir, reference, registry=registry, progress=say)
        layers = list(plan.layers)
        # Each layer is looked up in the manifest of the indexed platform.
        registry = dataclasses.replace(registry, platform=registry.platform or plan.platform)
    if ready_fd is not None or foreground:
        _detach_stdin()
        run_image_mount(reference, mountpoint, layers, registry=registry, via=via,
                        ready_fd=ready_fd, metrics_address=metrics_address, fetch=fetch)
        return
    record = mount_image(reference, mountpoint, layers, registry=registry, via=via,
                         timeout_s=timeout_s, metrics_address=metrics_address,
                         fetch=fetch)
    assert record is not None
    click.echo(f"mounted {record.source} ({len(record.layers)} layers) on {record.mountpoint} "
               f"(via {record.transport}, daemon pid {record.daemon_pid}, "
               f"log {record.log_file}"
               + (f", metrics http://{record.metrics_address}/metrics"
                  if record.metrics_address else "") + ")")


COMMANDS: list[click.Command] = [mount_image_command]
