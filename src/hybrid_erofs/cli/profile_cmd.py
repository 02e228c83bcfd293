"""`hybrid-erofs profile`: record a prefetch profile of an image into its index directory."""

from __future__ import annotations

from pathlib import Path

import click

from ..device import RegistryOptions
from ..fetching.record import record_profile
from ..mounting.lifecycle import VIAS
from .options import registry_options


@click.command("profile")
@click.argument("reference", metavar="REF")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG...]")
@click.option("--index-dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The image's index (`hybrid-erofs index REF --all-layers -o DIR`); the "
                   "profiles are written into it and listed in its index.json.")
@click.option("--via", type=click.Choice(VIAS), default="auto", show_default=True,
              help="How the layers are exported to the kernel while recording.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Seconds CMD may run.")
@registry_options
def profile(reference: str, command: tuple[str, ...], index_dir: Path, via: str,
            timeout_s: float, registry: RegistryOptions) -> None:
    """Record which spans of which layers CMD reads while it starts, as a prefetch profile.

    REF is mounted as --index-dir describes it (without background fetch) and CMD runs with
    ROOTFS set to the mounted tree; each layer's spans, first read first, are written to
    DIR/sha256-<hex>.prefetch.json and listed in DIR/index.json with their digests. Publish
    them with the index (`hybrid-erofs index REF --all-layers -o DIR --push` keeps what is
    there and pushes it): a mount of the image then fetches those spans first, in parallel,
    before the background fetch goes on. Needs root.

    \b
    Example:
        hybrid-erofs profile registry.example.com/app:1.2 --index-dir idx -- \\
            sh -c 'chroot "$ROOTFS" /usr/bin/python3 -c "import json, ssl"'
    """
    if registry.layer is not None or registry.blob is not None:
        raise click.UsageError("--layer and --blob do not apply: every layer is profiled")
    recorded = record_profile(reference, index_dir, command, registry=registry, via=via,
                              timeout_s=timeout_s,
                              progress=lambda line: click.echo(line, err=True))
    for layer in recorded:
        where = f" -> {layer.path.name}" if layer.path is not None else " (none read)"
        click.echo(f"{layer.blob}: {len(layer.spans)} of {layer.span_count} spans{where}")


COMMANDS: list[click.Command] = [profile]
