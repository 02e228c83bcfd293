"""`hybrid-erofs index`: build the zinfo and the EROFS meta of a local layer in one pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..device import RegistryOptions, is_local
from ..gzindex.build import DEFAULT_SPAN
from ..indexer import index_layer
from .options import Progress, SizeType, UuidType, human, registry_options


@click.command("index")
@click.argument("layer", metavar="LAYER")
@click.option("-o", "--output", "zinfo", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the gzip checkpoints here (SOCI zinfo v2).")
@click.option("--meta", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the EROFS metadata image here [default: m.erofs beside -o].")
@click.option("--no-meta", is_flag=True, help="Write only the zinfo.")
@click.option("--span", type=SizeType(), default=DEFAULT_SPAN, show_default="4MiB",
              help="Uncompressed distance between checkpoints (e.g. 1MiB, 4MiB).")
@click.option("--every-member", is_flag=True,
              help="Also checkpoint every gzip member start (erofs-utils' rule).")
@click.option("--aufs", is_flag=True,
              help="Turn .wh.* entries into overlayfs whiteouts (as mkfs.erofs --aufs).")
@click.option("--uuid", type=UuidType(), default=None,
              help="Filesystem UUID of the meta image [default: all zeros, reproducible].")
@click.option("--build-time", type=int, default=None,
              help="Build time in seconds since 1970 [default: $SOURCE_DATE_EPOCH, else now].")
@click.option("--engine", type=click.Choice(["auto", "zlib-ng", "zlib"]), default="auto",
              show_default=True, help="Inflate library for the checkpoint pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=None,
              help="Progress line on stderr [default: when stderr is a terminal].")
@registry_options
def index(layer: str, zinfo: Path | None, meta: Path | None, no_meta: bool, span: int,
          every_member: bool, aufs: bool, uuid: bytes | None, build_time: int | None,
          engine: str, as_json: bool, progress: bool | None, registry: RegistryOptions) -> None:
    """Index LAYER (a .tar.gz, a plain .tar, - for stdin, or a registry reference) in one pass.

    A registry layer is streamed once (nothing is stored on disk) and its digest checked.

    \b
    Examples:
        hybrid-erofs index layer.tar.gz -o layer.zinfo              # + m.erofs beside it
        hybrid-erofs index layer.tar.gz -o layer.zinfo --meta m.erofs --span 1MiB
        curl -sL "$BLOB_URL" | hybrid-erofs index - -o layer.zinfo --meta m.erofs
        hybrid-erofs index layer.tar --meta m.erofs                 # plain tar: meta only
        hybrid-erofs index ghcr.io/acme/app:1.0 --layer -1 -o app.zinfo --meta app.erofs
    """
    if no_meta:
        if meta is not None:
            raise click.UsageError("--meta and --no-meta contradict each other")
    elif meta is None and zinfo is not None:
        meta = zinfo.parent / "m.erofs"
    total = os.path.getsize(layer) if is_local(layer) and os.path.isfile(layer) else None
    bar = Progress("indexing", total, enabled=progress)
    try:
        report = index_layer(layer, zinfo=zinfo, meta=meta, span=span, every_member=every_member,
                             aufs=aufs, uuid=uuid, build_time=build_time, engine=engine,
                             progress=bar, registry=registry)
    finally:
        bar.done()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return
    parts = [f"{report.layer}: {report.format} {human(report.blob_size)} -> "
             f"{human(report.layer_size)} layer data"]
    if report.zinfo is not None:
        parts.append(f"{report.checkpoints} checkpoints (span {human(report.span)}) "
                     f"in {report.zinfo} ({human(report.zinfo_size)})")
    if report.meta is not None:
        parts.append(f"{report.entries} entries in {report.meta} ({human(report.meta_size)})")
    parts.append(f"{report.elapsed_s:.2f}s, {report.mb_per_s:.0f} MB/s")
    click.echo("; ".join(parts))


COMMANDS: list[click.Command] = [index]
