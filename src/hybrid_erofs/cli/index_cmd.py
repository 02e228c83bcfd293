"""`hybrid-erofs index`: build the zinfo and the EROFS meta of a local layer in one pass."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..device import RegistryOptions, is_local
from ..gzindex.build import DEFAULT_SPAN
from ..indexing.image import DEFAULT_MIN_LAYER_SIZE, ImageIndexReport, index_image
from ..indexing.imageindex import INDEX_NAME, SKIPPED_SMALL
from ..indexing.layer import index_layer
from ..units import counted, format_rate, format_size
from .options import Progress, SizeType, UuidType, registry_options


@click.command("index")
@click.argument("layer", metavar="LAYER")
@click.option("-o", "--output", "zinfo", type=click.Path(path_type=Path),
              help="Write the gzip checkpoints here (SOCI zinfo v2); with --all-layers, the "
                   "output directory.")
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
@click.option("--all-layers", is_flag=True,
              help="Index every gzip layer of image REF into directory -o (DIR/index.json "
                   "lists them; overlay whiteouts, for mount-image).")
@click.option("--all-platforms", is_flag=True,
              help="With --all-layers: every platform of a multi-platform image.")
@click.option("--min-layer-size", type=SizeType(minimum=0), default=DEFAULT_MIN_LAYER_SIZE,
              show_default="10MiB",
              help="With --all-layers: skip smaller layers (a mount indexes them on the node).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="With --all-layers: layers indexed at once [default: CPUs, at most 4].")
@click.option("--push", is_flag=True,
              help="With --all-layers: attach the outputs to the image in its registry (OCI "
                   "referrers; a sha256-<hex> tag where the registry lacks the API).")
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --push: sign the index artifacts and the bound image with this PEM "
                   "private key, where cosign keeps signatures (nodes trusting the public key "
                   "use the indexes for the original image too).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--progress/--no-progress", default=None,
              help="Progress line on stderr [default: when stderr is a terminal].")
@registry_options
def index(layer: str, zinfo: Path | None, meta: Path | None, no_meta: bool, span: int,
          every_member: bool, aufs: bool, uuid: bytes | None, build_time: int | None,
          engine: str, all_layers: bool, all_platforms: bool, min_layer_size: int,
          jobs: int | None, push: bool, sign_key: Path | None, as_json: bool,
          progress: bool | None, registry: RegistryOptions) -> None:
    """Index LAYER (a .tar.gz, a plain .tar, - for stdin, or a registry reference) in one pass.

    A registry layer is streamed once (nothing is stored on disk) and its digest checked
    (and, with --all-layers, its uncompressed sha256 against the image config's diff_id).

    \b
    Examples:
        hybrid-erofs index layer.tar.gz -o layer.zinfo              # + m.erofs beside it
        hybrid-erofs index layer.tar.gz -o layer.zinfo --meta m.erofs --span 1MiB
        curl -sL "$BLOB_URL" | hybrid-erofs index - -o layer.zinfo --meta m.erofs
        hybrid-erofs index layer.tar --meta m.erofs                 # plain tar: meta only
        hybrid-erofs index ghcr.io/acme/app:1.0 --layer -1 -o app.zinfo --meta app.erofs
        hybrid-erofs index ghcr.io/acme/app:1.0 --all-layers -o app-index/
        hybrid-erofs index ghcr.io/acme/app:1.0 --all-layers --all-platforms \\
            -o app-index/ --push                                   # nodes then: mount REF
        hybrid-erofs index oci:build/layout:1.0 --all-layers -o app-index/
    """
    if all_layers:
        if zinfo is None:
            raise click.UsageError("--all-layers needs -o DIR (the output directory)")
        for flag, given in (("--meta", meta is not None), ("--no-meta", no_meta),
                            ("--every-member", every_member), ("--uuid", uuid is not None),
                            ("--build-time", build_time is not None),
                            ("--layer", registry.layer is not None),
                            ("--blob", registry.blob is not None)):
            if given:
                raise click.UsageError(f"{flag} does not apply to --all-layers")
        if is_local(layer):
            raise click.UsageError(f"{layer}: --all-layers needs an image reference "
                                   f"(registry or oci:DIR[:TAG]), not a layer file")
        if sign_key is not None and not push:
            raise click.UsageError("--sign-key needs --push")
        _index_all(layer, zinfo, all_platforms=all_platforms, min_layer_size=min_layer_size,
                   jobs=jobs, span=span, push=push, sign_key=sign_key, as_json=as_json,
                   progress=progress, registry=registry)
        return
    for flag, given in (("--all-platforms", all_platforms), ("--jobs", jobs is not None),
                        ("--push", push), ("--sign-key", sign_key is not None)):
        if given:
            raise click.UsageError(f"{flag} needs --all-layers")
    if zinfo is not None and zinfo.is_dir():
        raise click.UsageError(f"-o {zinfo}: is a directory (a directory is for --all-layers)")
    if no_meta:
        if meta is not None:
            raise click.UsageError("--meta and --no-meta contradict each other")
    elif meta is None and zinfo is not None:
        meta = zinfo.parent / "m.erofs"
    if layer == "-" and sys.stdin.isatty():
        raise click.UsageError("LAYER - reads the layer from standard input, which is a "
                               "terminal: pipe one in (curl -sL URL | hybrid-erofs index - ...)")
    replaced = _recorded_blob(meta)
    total = os.path.getsize(layer) if is_local(layer) and os.path.isfile(layer) else None
    with Progress("indexing", total, enabled=progress) as bar:
        report = index_layer(layer, zinfo=zinfo, meta=meta, span=span, every_member=every_member,
                             aufs=aufs, uuid=uuid, build_time=build_time, engine=engine,
                             progress=bar, registry=registry)
    if replaced is not None and replaced != report.blob_digest:
        # m.erofs is the default name for every layer: say so when another layer's meta
        # was replaced (commands given that layer's zinfo now refuse this meta by name).
        click.echo(f"note: replaced {meta}, which was built for another layer (blob "
                   f"{replaced}); give each layer its own --meta", err=True)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return
    parts = [f"{report.layer}: {report.format} {format_size(report.blob_size)} -> "
             f"{format_size(report.layer_size)} layer data"]
    if report.zinfo is not None:
        parts.append(f"{counted(report.checkpoints, 'checkpoint')} (span "
                     f"{format_size(report.span)}) in {report.zinfo} "
                     f"({format_size(report.zinfo_size)})")
    if report.meta is not None:
        parts.append(f"{counted(report.entries, 'entry', 'entries')} in {report.meta} "
                     f"({format_size(report.meta_size)})")
    rate = report.layer_size / report.elapsed_s if report.elapsed_s > 0 else 0.0
    parts.append(f"{report.elapsed_s:.2f}s, {format_rate(rate)}")
    click.echo("; ".join(parts))



def _recorded_blob(meta: Path | None) -> str | None:
    """The blob an existing meta at `meta` was built for, if it says."""
    if meta is None or not meta.is_file():
        return None
    from ..errors import HybridErofsError
    from ..source import FileSource
    from ..trust.binding import meta_blob_digest

    try:
        source = FileSource(meta)
    except (HybridErofsError, OSError):
        return None
    try:
        return meta_blob_digest(source, name=str(meta))
    except (HybridErofsError, OSError):
        return None
    finally:
        source.close()


def _index_all(reference: str, directory: Path, *, all_platforms: bool, min_layer_size: int,
               jobs: int | None, span: int, push: bool, sign_key: Path | None, as_json: bool,
               progress: bool | None, registry: RegistryOptions) -> None:
    verbose = (progress is not False) and not as_json

    def say(line: str) -> None:
        if verbose:
            click.echo(line, err=True)

    report = index_image(reference, directory, all_platforms=all_platforms,
                         min_layer_size=min_layer_size, jobs=jobs, span=span,
                         registry=registry, progress=say)
    pushed: list[dict[str, object]] = []
    pull_ref = _pinned(reference, report)
    signatures: list[str] = []
    if push:
        from ..indexing.publish import publish_bound_image, push_image_index, sign_artifacts

        key = sign_key.read_bytes() if sign_key is not None else None
        pushed = push_image_index(reference, report.directory, report.index,
                                  registry=registry, progress=say)
        bound = publish_bound_image(reference, report.index, report.directory,
                                    registry=registry, sign_key=key, progress=say)
        pull_ref = bound.pull_ref
        signatures = list(bound.signatures)
        if key is not None:
            signatures += sign_artifacts(reference, [_digest_of(p["artifact"]) for p in pushed],
                                         registry=registry, sign_key=key)
    if as_json:
        click.echo(json.dumps({
            "directory": str(report.directory), "index": report.index.to_json(),
            "indexed": [{"digest": d} for d in report.indexed],
            "reused": [{"digest": d} for d in report.reused],
            "skipped": [{"digest": d, "status": s} for d, s in report.skipped],
            "layer_bytes": report.layer_bytes, "elapsed_s": round(report.elapsed_s, 3),
            "pushed": pushed, "pull_ref": pull_ref,
            "signatures": [{"digest": d} for d in signatures]},
            indent=2, sort_keys=True))
        return
    rate = report.layer_bytes / report.elapsed_s if report.elapsed_s > 0 else 0.0
    parts = [f"{reference}: {counted(len(report.index.images), 'platform')}, "
             f"{counted(len(report.indexed), 'layer')} indexed "
             f"({format_size(report.layer_bytes)}, {report.elapsed_s:.1f}s, "
             f"{format_rate(rate)})"]
    if report.reused:
        parts.append(f"{len(report.reused)} already indexed")
    small = sum(1 for _, s in report.skipped if s == SKIPPED_SMALL)
    other = len(report.skipped) - small
    if small:
        parts.append(f"{small} below --min-layer-size {format_size(min_layer_size)} (mounts index "
                     f"them on the node)")
    if other:
        parts.append(f"{other} not gzip (cannot be indexed)")
    click.echo("; ".join(parts) + f" -> {report.directory / INDEX_NAME}")
    for entry in pushed:
        click.echo(f"pushed {entry['platform']}: artifact {_digest_of(entry['artifact'])} "
                   f"({entry['summary']})")
    if signatures:
        click.echo(f"signed: {len(signatures)} signature manifest(s) written")
    click.echo(f"pull_ref: {pull_ref}" + (" (the image with its index bound in: mount or "
                                          "pull this)" if push else ""))


def _digest_of(value: object) -> str:
    assert isinstance(value, dict)
    return str(value["digest"])


def _pinned(reference: str, report: ImageIndexReport) -> str:
    """The reference as given, pinned to the digest it was indexed at (nothing published)."""
    from ..oci.layout import is_layout_reference
    from ..oci.reference import parse_reference

    if is_layout_reference(reference):
        return reference
    ref = parse_reference(reference)
    images = report.index.images
    digest = images[0].manifest if len(images) == 1 else ref.digest
    return f"{ref.registry}/{ref.repository}@{digest}" if digest else reference


COMMANDS: list[click.Command] = [index]
