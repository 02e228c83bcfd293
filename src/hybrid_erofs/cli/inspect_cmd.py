"""`hybrid-erofs inspect` (a zinfo summary, or an image's manifest, layers and config) and
`hybrid-erofs read` (debug read of layer data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..device import RegistryOptions, is_local, open_layer
from ..errors import IndexFormatError
from ..filekind import ZINFO, check_kind
from ..gzindex.format import load_index
from ..gzindex.sidecar import Sidecar, load_sidecar, sha256_digest, sidecar_json, sidecar_path
from ..oci.image import ImageInfo, inspect_image, open_image_client
from ..units import counted, format_size
from .options import SizeType, registry_options


@click.command("inspect")
@click.argument("target", metavar="ZINFO|REF")
@click.option("--checkpoints", "show_all", is_flag=True, help="List every checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@registry_options
def inspect(target: str, show_all: bool, as_json: bool, registry: RegistryOptions) -> None:
    """Show a zinfo file (version, span, checkpoints, sizes), or an image: its platform
    manifest digest, layers and config, refusing malformed images.

    \b
    Examples:
        hybrid-erofs inspect layer.zinfo --checkpoints
        hybrid-erofs inspect ghcr.io/acme/app:1.0 --platform linux/arm64 --json
        hybrid-erofs inspect oci:./layout:latest
    """
    if is_local(target) or target.endswith(".zinfo"):
        _inspect_zinfo(Path(target), show_all=show_all, as_json=as_json)
        return
    with open_image_client(target, username=registry.username, password=registry.password,
                           insecure=registry.insecure, transport=registry.transport) as client:
        info = inspect_image(client, target, registry.platform)
    _show_image(info, as_json=as_json)


def _show_image(info: ImageInfo, *, as_json: bool) -> None:
    """Print an inspected image as JSON or as a short text summary."""
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2))
        return
    c = info.config
    platform = "/".join(p for p in (c.os, c.architecture, c.variant) if p)
    click.echo(f"{info.reference}: {platform} manifest {info.manifest_digest}")
    click.echo(f"  config {info.config_descriptor.digest} ({info.config_descriptor.size} bytes)")
    for name, value in (("entrypoint", c.entrypoint), ("cmd", c.cmd)):
        if value is not None:
            click.echo(f"  {name}: {json.dumps(list(value))}")
    if c.working_dir:
        click.echo(f"  working dir: {c.working_dir}")
    if c.user:
        click.echo(f"  user: {c.user}")
    for variable in c.env:
        click.echo(f"  env: {variable}")
    click.echo(f"  {counted(len(info.layers), 'layer')}:")
    for number, layer in enumerate(info.layers):
        click.echo(f"  {number:>4} {layer.digest} {format_size(layer.size):>10} {layer.media_type}")


def _inspect_zinfo(zinfo: Path, *, show_all: bool, as_json: bool) -> None:
    """Summarise a zinfo file (and its sidecar when present); the JSON vocabulary is
    docs/formats.md's, the checkpoint list only with --checkpoints."""
    try:
        index = load_index(zinfo)
    except IndexFormatError:
        check_kind(zinfo, ZINFO)  # "m.erofs: is an EROFS image, not a zinfo file"
        raise
    data = zinfo.read_bytes()
    cps = index.checkpoints
    info: dict[str, object] = {
        "path": str(zinfo), "digest": sha256_digest(data), "size": len(data),
        "version": index.version, "span": index.span, "checkpoints": len(cps),
        "unaligned": sum(1 for cp in cps if cp.bits),
        "last_checkpoint": {"in": cps[-1].in_offset, "out": cps[-1].out_offset},
    }
    side = sidecar_path(zinfo)
    sidecar: Sidecar | None = None
    if side.exists():
        sidecar = load_sidecar(side, zinfo_bytes=data)
        side_json = sidecar_json(sidecar)
        info["sidecar"] = {"path": str(side), "digest": sha256_digest(side.read_bytes()),
                           "tool": sidecar.tool, "blob": side_json["blob"],
                           "layer": side_json["layer"], "meta": side_json.get("meta"),
                           "span_digests": len(sidecar.spans)}
    if show_all:
        info["checkpoint_list"] = [{"in": cp.in_offset, "out": cp.out_offset, "bits": cp.bits}
                                   for cp in cps]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{zinfo}: zinfo v{index.version}, {counted(len(cps), 'checkpoint')}, "
               f"span {format_size(index.span)}, {format_size(len(data))}")
    click.echo(f"  last checkpoint: compressed {cps[-1].in_offset}, uncompressed {cps[-1].out_offset}; "
               f"{info['unaligned']} start mid-byte")
    if sidecar is not None:
        click.echo(f"  built for {sidecar.blob_digest} ({sidecar.blob_size} bytes, "
                   f"{sidecar.layer_size} bytes of layer data); "
                   f"{counted(len(sidecar.spans), 'span digest')} in {side}")
    else:
        click.echo(f"  no {side.name}: reads through this zinfo are not verified")
    if show_all:
        click.echo(f"  {'#':>6} {'in':>14} {'out':>14} bits")
        for number, cp in enumerate(cps):
            click.echo(f"  {number:>6} {cp.in_offset:>14} {cp.out_offset:>14} {cp.bits:>4}")


@click.command("read")
@click.argument("layer")
@click.option("--zinfo", type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoints of a gzip LAYER.")
@click.option("--offset", type=SizeType(minimum=0), default=0,
              help="Uncompressed offset [default: 0].")
@click.option("--length", type=SizeType(minimum=0), default=None,
              help="Bytes to read (0 reads nothing) [default: to the end].")
def read(layer: str, zinfo: Path | None, offset: int, length: int | None) -> None:
    """Debug read: write layer data bytes OFFSET..OFFSET+LENGTH of LAYER to stdout.

    \b
    Example:
        hybrid-erofs read layer.tar.gz --zinfo layer.zinfo --offset 1MiB --length 512 | xxd
    """
    source = open_layer(layer, zinfo=zinfo)
    try:
        if offset > source.size:
            raise click.BadParameter(f"{offset} is past the end of the layer data ({source.size})",
                                     param_hint="--offset")
        end = source.size if length is None else min(source.size, offset + length)
        out = sys.stdout.buffer
        while offset < end:
            n = min(1 << 20, end - offset)
            out.write(source.pread(n, offset))
            offset += n
        out.flush()
    finally:
        source.close()


COMMANDS: list[click.Command] = [inspect, read]
