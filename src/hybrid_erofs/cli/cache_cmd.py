"""`hybrid-erofs cache ls|prune`: show and trim the on-disk chunk cache of blob bytes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from ..sources.cachedir import BlobInfo, default_cache_dir, prune_cache, scan_blobs
from ..units import counted, format_size
from .options import SizeType

_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class DurationType(click.ParamType):  # type: ignore[type-arg]
    """'90s', '30m', '12h', '7d', '2w' or plain seconds -> seconds."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]?)\s*", str(value))
        if not match or match.group(2).lower() not in _DURATION_UNITS:
            self.fail(f"not a duration: {value!r} (examples: 90s, 30m, 12h, 7d, 2w)", param, ctx)
        return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


_CACHE_DIR = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Cache directory [default: $XDG_CACHE_HOME/hybrid-erofs, ~/.cache/hybrid-erofs, "
         "or /var/cache/hybrid-erofs for root].")


def _when(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_s)) if epoch_s else "-"


def _as_dict(blob: BlobInfo) -> dict[str, object]:
    return {"digest": blob.digest, "size": blob.size, "chunk_size": blob.chunk_size,
            "chunks": blob.chunks, "chunks_present": blob.chunks_present,
            "disk_bytes": blob.disk_bytes, "last_access": _when(blob.last_access_s),
            "last_access_s": blob.last_access_s, "in_use": blob.in_use, "path": str(blob.path)}


@click.group("cache")
def cache() -> None:
    """Inspect and prune the on-disk cache of compressed blob bytes.

    Every mount and process that reads a blob shares its cached chunks, keyed by the blob's
    digest. Blobs in use by a running process are never removed.
    """


@cache.command("ls")
@_CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def ls(cache_dir: Path | None, as_json: bool) -> None:
    """List cached blobs, least recently used first.

    \b
    Examples:
        hybrid-erofs cache ls
        hybrid-erofs cache ls --cache-dir /var/cache/hybrid-erofs --json
    """
    directory = default_cache_dir() if cache_dir is None else cache_dir
    blobs = scan_blobs(directory)
    total = sum(blob.disk_bytes for blob in blobs)
    if as_json:
        click.echo(json.dumps({"cache_dir": str(directory), "disk_bytes": total,
                               "blobs": [_as_dict(blob) for blob in blobs]}, indent=2))
        return
    if blobs:
        click.echo(f"{'DIGEST':<71}  {'CHUNKS':>13}  {'CHUNK':>8}  {'ON DISK':>10}  LAST ACCESS")
    for blob in blobs:
        chunks = f"{blob.chunks_present}/{blob.chunks}"
        click.echo(f"{blob.digest:<71}  {chunks:>13}  {format_size(blob.chunk_size):>8}  "
                   f"{format_size(blob.disk_bytes):>10}  {_when(blob.last_access_s)}"
                   + ("  (in use)" if blob.in_use else ""))
    click.echo(f"{counted(len(blobs), 'blob')}, {format_size(total)} on disk in {directory}")


@cache.command("prune")
@_CACHE_DIR
@click.option("--max-size", "max_bytes", type=SizeType(), default=None,
              help="Remove least recently used blobs until the cache is at most this big.")
@click.option("--older-than", "older_than_s", type=DurationType(), default=None,
              help="Remove blobs not used for this long (90s, 30m, 12h, 7d, 2w).")
@click.option("--all", "remove_all", is_flag=True, help="Remove every blob not in use.")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
def prune(cache_dir: Path | None, max_bytes: int | None, older_than_s: float | None,
          remove_all: bool, dry_run: bool) -> None:
    """Remove whole cached blobs; a blob in use by a running process is always kept.

    With several criteria, a blob is removed if any of them applies.

    \b
    Examples:
        hybrid-erofs cache prune --max-size 10GiB
        hybrid-erofs cache prune --older-than 7d --dry-run
        hybrid-erofs cache prune --all
    """
    if max_bytes is None and older_than_s is None and not remove_all:
        raise click.UsageError("give at least one of --max-size, --older-than, --all")
    directory = default_cache_dir() if cache_dir is None else cache_dir
    result = prune_cache(directory, max_bytes=max_bytes, older_than_s=older_than_s,
                         remove_all=remove_all, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for blob in result.removed:
        click.echo(f"{verb} {blob.digest} ({format_size(blob.disk_bytes)})")
    for blob in result.kept_in_use:
        click.echo(f"kept {blob.digest} ({format_size(blob.disk_bytes)}): in use")
    freed = result.bytes_before - result.bytes_after
    click.echo(f"{verb} {counted(len(result.removed), 'blob')}, {format_size(freed)}; "
               f"{format_size(result.bytes_after)} left in {directory}")


COMMANDS = [cache]
