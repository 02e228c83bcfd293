"""`hybrid-erofs mount`, `umount` and `status`: thin wrappers over hybrid_erofs.mounting."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..device import RegistryOptions, is_local
from ..fetching.background import FetchPolicy, fetch_status
from ..mounting.layer import mount_layer, run_mount
from ..mounting.lifecycle import VIAS, mount_statuses, require_root, status_json, unmount
from ..mounting.reattach import reattach as reattach_mount
from ..printable import printable_message
from ..sources.gate import LOCAL, TRUST_KINDS
from ..trust.bound import ZinfoLater
from ..trust.policy import TrustPolicy
from ..units import counted, format_size
from .options import fetch_options, metrics_address_option, registry_options, trust_options


@click.command("mount")
@click.argument("arguments", metavar="REF MOUNTPOINT", nargs=-1, required=True)
@click.option("--meta", type=click.Path(dir_okay=False, path_type=Path),
              help="The layer's EROFS meta image (from `hybrid-erofs index --meta`).")
@click.option("--zinfo", type=click.Path(dir_okay=False, path_type=Path),
              help="The layer's gzip checkpoints (from `hybrid-erofs index -o`).")
@click.option("--via", type=click.Choice(VIAS), default="auto", show_default=True,
              help="auto: kernel NBD when /dev/nbd* exists, else a FUSE file mounted with "
                   "mount(2) (a loop device when the kernel lacks file-backed EROFS).")
@click.option("--foreground", is_flag=True,
              help="Serve in this process until SIGTERM (systemd Type=simple/notify).")
@click.option("--reattach", is_flag=True,
              help="Restore MOUNTPOINT after its daemon died: umount what is left and mount "
                   "again from its state record (`mount --reattach MOUNTPOINT`, no REF).")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the mount to answer.")
@click.option("--_daemon-ready-fd", "ready_fd", type=int, hidden=True)
@click.option("--_trust", "trust", type=click.Choice(TRUST_KINDS), default=LOCAL, hidden=True)
@metrics_address_option
@click.option("--_prefetch", "prefetch", type=click.Path(dir_okay=False, path_type=Path),
              hidden=True)
@click.option("--_profile-zinfo", "profile_zinfo",
              type=click.Path(dir_okay=False, path_type=Path), hidden=True)
@click.option("--_profile-zinfo-digest", "profile_zinfo_digest", hidden=True)
@click.option("--_zinfo-blob", "zinfo_blob", hidden=True)
@registry_options
@trust_options
@fetch_options
def mount(arguments: tuple[str, ...], meta: Path | None, zinfo: Path | None,
          via: str, foreground: bool, reattach: bool, timeout_s: float, ready_fd: int | None,
          trust: str, prefetch: Path | None, profile_zinfo: Path | None,
          profile_zinfo_digest: str | None, zinfo_blob: str | None, metrics_address: tuple[str, int] | None,
          registry: RegistryOptions, policy: TrustPolicy, fetch: FetchPolicy | None) -> None:
    """Mount layer REF (a registry reference or a local .tar.gz) read-only on MOUNTPOINT.

    Without --meta/--zinfo, the index that `hybrid-erofs index REF --all-layers --push`
    published is found in the registry and cached: bound to the image (mount the pull_ref
    it printed), or attached to it and signed by a key this node trusts (--trusted-key);
    an index that is neither is refused unless --accept-unbound (docs/security.md). The
    prefetch profile of a bound or signed index (`hybrid-erofs profile`) has its spans
    fetched first.

    Returns once the mount answers; a daemon keeps serving it (log and state under
    /run/hybrid-erofs). Reads fetch what they need at once; after --fetch-delay seconds the
    rest of a registry layer is fetched in the background (paused while reads come in), kept
    decoded beside the blob's chunks, and the complete layer is verified
    (--no-background-fetch: only what reads need is ever fetched). Needs root.

    \b
    Examples:
        hybrid-erofs mount --meta m.erofs --zinfo layer.zinfo layer.tar.gz /mnt/layer
        hybrid-erofs mount registry.example.com/app:1.2 /mnt/app --layer -1
        hybrid-erofs mount --meta m.erofs --zinfo layer.zinfo \\
            registry.example.com/app:1.2 /mnt/app --layer -1
        echo "$TOKEN" | hybrid-erofs mount --username ci --password-stdin \\
            --meta m.erofs --zinfo layer.zinfo registry.example.com/app:1.2 /mnt/app
        hybrid-erofs status
        hybrid-erofs umount /mnt/app
        hybrid-erofs mount --reattach /mnt/app     # after its daemon died
    """
    if reattach:
        if len(arguments) != 1:
            raise click.UsageError("--reattach takes only MOUNTPOINT (the rest is recorded)")
        again = reattach_mount(arguments[0], password=registry.password, timeout_s=timeout_s)
        click.echo(f"reattached {again.source} on {again.mountpoint} "
                   f"(via {again.transport}, daemon pid {again.daemon_pid})")
        return
    if len(arguments) != 2:
        raise click.UsageError("expected REF MOUNTPOINT (or --reattach MOUNTPOINT)")
    require_root("mount")  # before finding an index in the registry
    source, mountpoint = arguments
    if meta is None and ready_fd is None:
        if zinfo is not None:
            raise click.UsageError("--zinfo needs --meta (or give neither: the index attached "
                                   "to the image in its registry is used)")
        if is_local(source):
            raise click.UsageError(f"{source}: a local layer needs --meta FILE (and --zinfo "
                                   f"for a .tar.gz); only registry images carry their index")
        from ..mounting.discovery import discover_layer

        source, meta, zinfo, registry, trust, prefetch = discover_layer(
            source, registry=registry, policy=policy,
            progress=lambda line: click.echo(line, err=True))
    if meta is None:
        raise click.UsageError("missing --meta FILE (the layer's meta image)")
    if ready_fd is not None or foreground:
        _detach_stdin()
        run_mount(source, mountpoint, meta=meta, zinfo=zinfo, registry=registry, via=via,
                  ready_fd=ready_fd, metrics_address=metrics_address, trust=trust,
                  fetch=fetch, prefetch=prefetch,
                  later=ZinfoLater.from_argv(profile_zinfo, zinfo_blob, profile_zinfo_digest))
        return
    record = mount_layer(source, mountpoint, meta=meta, zinfo=zinfo, registry=registry,
                         via=via, timeout_s=timeout_s, metrics_address=metrics_address,
                         trust=trust, fetch=fetch, prefetch=prefetch)
    assert record is not None
    click.echo(f"mounted {record.source} on {record.mountpoint} (via {record.transport}, "
               f"daemon pid {record.daemon_pid}, log {record.log_file}"
               + (f", metrics http://{record.metrics_address}/metrics"
                  if record.metrics_address else "") + ")")


def _detach_stdin() -> None:
    """The password (if any) was read already: a daemon must not hold the caller's terminal."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, sys.stdin.fileno())
    os.close(devnull)


@click.command("umount")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("-l", "--lazy", is_flag=True,
              help="Detach now even if busy; the daemon serves open files until closed.")
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount MOUNTPOINT: EROFS, then the FUSE file / loop / NBD device, then the daemon.

    An image mount (`mount-image`): the overlay first, then each layer's EROFS, loop / FUSE /
    NBD, then the daemon. A busy mount is left alone (the processes using it are named)
    unless --lazy. The leftovers of a daemon that died are cleaned up.

    \b
    Examples:
        hybrid-erofs umount /mnt/layer
        hybrid-erofs umount --lazy /mnt/layer
    """
    click.echo(unmount(mountpoint, lazy=lazy))


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--prune", is_flag=True, help="Clean up mounts whose daemon died.")
def status(as_json: bool, prune: bool) -> None:
    """List hybrid-erofs mounts (layers and images): source, transport, daemon, bytes fetched,
    cache hit rate (an image's summed over its layers), and the background fetch: spans
    local / total, bytes it fetched, whether the layer is complete and verified (per layer
    under "layers" in --json).

    \b
    Examples:
        hybrid-erofs status
        hybrid-erofs status --json | jq '.[].stats.bytes_fetched'
        hybrid-erofs status --prune
    """
    statuses = mount_statuses(prune=prune)
    if as_json:
        click.echo(status_json(statuses))
        return
    if not statuses:
        click.echo("no hybrid-erofs mounts")
        return
    for entry in statuses:
        stats = entry.stats
        fresh = time.time() - stats.get("updated", 0) < 10
        state = entry.state + (" (cleaned)" if prune and entry.state == "stale" else "")
        kind = f"image of {entry.layer_count} layers, " if entry.record.is_image else ""
        click.echo(f"{entry.record.mountpoint}: {state}, {kind}via {entry.record.transport}, "
                   f"daemon {entry.record.daemon_pid}, up {entry.uptime_s:.0f}s")
        click.echo(f"  source  {entry.record.source}")
        if stats:
            for line in _stats_lines(stats):
                click.echo(f"  {line}")
            trust = stats.get("trust")
            if isinstance(trust, dict) and trust.get("index") != "local":
                detail = f": {trust['detail']}" if trust.get("detail") else ""
                click.echo(f"  index   {trust.get('index')}, {trust.get('state')}"
                           f"{printable_message(str(detail))}")
            if not fresh and entry.state != "stale":
                click.echo("  (stats not current: the daemon does not answer)")
        for line in _fetch_lines(stats or {}):
            click.echo(f"  {line}")
        if entry.record.metrics_address and entry.state != "stale":
            click.echo(f"  metrics http://{entry.record.metrics_address}/metrics")
        if entry.state == "stale" and not prune:
            click.echo("  daemon died: `hybrid-erofs umount` or `status --prune` cleans up")


def _fetch_lines(stats: dict[str, Any]) -> list[str]:
    """Each layer's background fetch (and a failed check) as `status` prints it."""
    lines = []
    layers = stats.get("layers") or []
    for n, layer in enumerate(layers):
        fetch = fetch_status(layer)
        where = f"layer {n + 1}: " if len(layers) > 1 else ""
        if fetch is not None:
            reason = layer.get("fetch_reason")
            lines.append(f"{where}background fetch {fetch['state']}: {fetch['spans_local']}/"
                         f"{fetch['spans_total']} spans local, {format_size(fetch['bytes_fetched'])} "
                         f"fetched, {'complete' if fetch['complete'] else 'not complete'}, "
                         f"{'verified' if fetch['verified'] else 'not verified'}"
                         + (f" ({reason})" if reason else ""))
        if layer.get("failure"):
            lines.append(f"{where}FAILED: every read fails with EIO: {layer['failure']}")
    return lines


def _stats_lines(stats: dict[str, Any]) -> list[str]:
    """The counters of `status` (the same values /metrics serves), a few lines of text."""
    def count(key: str) -> int:
        return int(stats.get(key) or 0)

    reads = count("reads")
    latency = (f", {1000 * stats['read_duration_seconds_sum'] / reads:.2f} ms mean"
               if reads and stats.get("read_duration_seconds_sum") is not None else "")
    lines = [f"reads   {reads} ({format_size(count('bytes_served'))} served){latency}, "
             f"{counted(count('errors'), 'error')} (EIO)",
             f"fetched {format_size(count('bytes_fetched'))}"
             + (f" in {counted(count('registry_requests'), 'request')}, "
                f"{counted(count('registry_retries'), 'retry', 'retries')}, "
                f"{count('registry_failures')} failed, {count('failure_memory_hits')} "
                f"failed at once (failure memory)" if "registry_requests" in stats else "")]
    if stats.get("cache_hits") is not None:
        rate = stats.get("hit_rate")
        size = (f", {format_size(count('chunk_cache_size_bytes'))} of "
                f"{format_size(count('chunk_cache_limit_bytes'))} on disk"
                if stats.get("chunk_cache_limit_bytes") else "")
        lines.append(f"cache   {'n/a' if rate is None else f'{100 * rate:.0f}%'} hits "
                     f"({counted(count('cache_hits'), 'hit')}, "
                     f"{counted(count('cache_misses'), 'miss', 'misses')}); "
                     f"{counted(count('chunk_cache_evicted_chunks'), 'chunk')} evicted{size}")
    decoded = (f"{counted(count('spans_decoded'), 'span')} decoded, "
               f"{count('spans_verified')} verified")
    failures = count("verification_failures")
    lines.append(decoded + (f", {failures} failed verification" if failures else ""))
    if stats.get("resident_memory_bytes"):
        lines.append(f"memory  {format_size(count('resident_memory_bytes'))} resident")
    return lines


COMMANDS: list[click.Command] = [mount, umount, status]
