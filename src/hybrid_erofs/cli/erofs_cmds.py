"""`hybrid-erofs ls`, `cat` and `verify`: read a meta image (and its layer) without mounting."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import click

from ..device import RegistryOptions, is_local, open_image
from ..erofs.layout import Inode
from ..erofs.reader import ErofsImage
from ..erofs.verify import verify_image
from ..errors import InvalidInput
from ..indexing.layer import open_layer_stream
from ..printable import format_time, printable, printable_message
from ..trust.verifier import LayerIndexFiles, LayerVerification, verify_layer
from ..units import counted, format_rate, format_size
from .options import Progress, registry_options

_meta_option = click.option(
    "--meta", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The EROFS metadata image (m.erofs).")
_zinfo_option = click.option(
    "--zinfo", type=click.Path(dir_okay=False, path_type=Path),
    help="Checkpoints of a gzip LAYER (not needed for a plain tar).")
_LAYER_SUFFIXES = (".tar", ".gz", ".tgz")
_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock"}


def _entry(image: ErofsImage, path: str, inode: Inode) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": path, "name": path.rsplit("/", 1)[-1] or "/",
        "type": _TYPES[stat.S_IFMT(inode.mode)], "mode": stat.filemode(inode.mode),
        "nlink": inode.nlink, "uid": inode.uid, "gid": inode.gid, "size": inode.size,
        "mtime": inode.mtime, "mtime_nsec": inode.mtime_nsec, "nid": inode.nid,
    }
    if inode.is_symlink:
        info["target"] = image.readlink(inode)
    if stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
        info["rdev"] = list(inode.rdev)
    return info


def _long_line(info: dict[str, Any]) -> str:
    size = (f"{info['rdev'][0]}, {info['rdev'][1]}" if "rdev" in info else str(info["size"]))
    line = (f"{info['mode']} {info['nlink']:>3} {info['uid']:>5} {info['gid']:>5} {size:>10} "
            f"{format_time(info['mtime'])} {printable(info['name'])}")
    return line + (f" -> {printable(info['target'])}" if "target" in info else "")


def _split_ls_args(args: tuple[str, ...]) -> tuple[str | None, str]:
    """[LAYER] [PATH]: a lone argument is LAYER only if it is a local *.tar/*.gz/*.tgz file."""
    if len(args) > 2:
        raise click.UsageError("expected at most LAYER and PATH")
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1 and args[0].endswith(_LAYER_SUFFIXES) and os.path.isfile(args[0]):
        return args[0], "/"
    return None, args[0] if args else "/"


@click.command("ls")
@_meta_option
@_zinfo_option
@click.argument("args", nargs=-1, metavar="[LAYER] [PATH]")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, links, owner, size, mtime.")
@click.option("-R", "recursive", is_flag=True, help="List subdirectories recursively.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of entries.")
def ls(meta: Path, zinfo: Path | None, args: tuple[str, ...], long: bool, recursive: bool,
       as_json: bool) -> None:
    """List PATH (default /) inside the meta image; LAYER is not needed.

    A lone argument is taken as LAYER only when it is a local .tar/.gz/.tgz file.

    \b
    Examples:
        hybrid-erofs ls --meta m.erofs /etc -l
        hybrid-erofs ls --meta m.erofs -R --json > tree.json
    """
    layer, path = _split_ls_args(args)
    with open_image(meta, layer=layer, zinfo=zinfo) as image:
        top = image.lookup(path, follow_symlinks=path.endswith("/"))
        prefix = "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
        groups: list[tuple[str | None, list[dict[str, Any]]]]
        if not top.is_dir:
            groups = [(None, [_entry(image, prefix, top)])]
        elif recursive:
            found: dict[str, list[dict[str, Any]]] = {prefix: []}
            for child_path, inode in sorted(image.walk(prefix)):
                if child_path != prefix:
                    found[child_path.rsplit("/", 1)[0] or "/"].append(
                        _entry(image, child_path, inode))
                if inode.is_dir:
                    found.setdefault(child_path, [])
            groups = [(name, found[name]) for name in sorted(found)]
        else:
            entries = sorted((e.name, e.nid) for e in image.listdir(top)
                             if e.name not in (".", ".."))
            base = prefix.rstrip("/")
            groups = [(None, [_entry(image, f"{base}/{name}", image.inode(nid))
                              for name, nid in entries])]
    if as_json:
        click.echo(json.dumps([info for _, infos in groups for info in infos], indent=1))
        return
    for number, (header, infos) in enumerate(groups):
        if header is not None:
            click.echo(("\n" if number else "") + f"{printable(header)}:")
        for info in infos:
            click.echo(_long_line(info) if long else printable(info["name"]))


@click.command("cat")
@_meta_option
@_zinfo_option
@click.argument("layer")
@click.argument("path")
def cat(meta: Path, zinfo: Path | None, layer: str, path: str) -> None:
    """Write the contents of file PATH (symlinks followed) to stdout.

    \b
    Example:
        hybrid-erofs cat --meta m.erofs --zinfo layer.zinfo layer.tar.gz /etc/os-release
    """
    with open_image(meta, layer=layer, zinfo=zinfo) as image:
        inode = image.lookup(path, follow_symlinks=True)
        if inode.is_dir:
            raise InvalidInput(f"{path}: is a directory")
        if not inode.is_reg:
            raise InvalidInput(f"{path}: not a regular file (mode {stat.filemode(inode.mode)})")
        out = sys.stdout.buffer
        for piece in image.iter_read(inode, piece=1 << 20):
            out.write(piece)
        out.flush()


@click.command("verify")
@click.option("--meta", type=click.Path(dir_okay=False, path_type=Path),
              help="The EROFS metadata image (m.erofs); without it, LAYER is an image "
                   "reference and the index found for it in the registry is verified.")
@_zinfo_option
@click.argument("layer", required=False)
@click.option("--tar-headers/--no-tar-headers", default=True, show_default=True,
              help="With LAYER: require a tar header describing each file before its data.")
@click.option("--max-problems", type=click.IntRange(min=1), default=20, show_default=True,
              help="Print at most this many problems.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress/--no-progress", default=None,
              help="Progress line on stderr [default: when stderr is a terminal].")
@registry_options
@click.pass_context
def verify(ctx: click.Context, meta: Path | None, zinfo: Path | None, layer: str | None,
           tar_headers: bool, max_problems: int, as_json: bool, progress: bool | None,
           registry: RegistryOptions) -> None:
    """Check the meta image; with LAYER prove that the index describes it; or, as
    `verify REF`, prove it for the index a node would find for image REF.

    With LAYER (a .tar.gz, a plain .tar, or a registry reference), every file is read
    through the meta, and the whole blob is read once more to recompute the index: the
    meta entry by entry against the tar headers (names, types, modes, owners, sizes, link
    targets, data offsets, xattrs, devices), every zinfo checkpoint against the stream, and
    the sidecar's digests. Exit status 1 when a problem is found, one line per problem.

    `verify REF` reads every indexed layer of the image in full from the registry (bound,
    signed or merely attached indexes alike) and checks it the same way, with the
    manifest's layer digests and the config's diff_ids.

    \b
    Examples:
        hybrid-erofs verify --meta m.erofs
        hybrid-erofs verify --meta m.erofs --zinfo layer.zinfo layer.tar.gz
        hybrid-erofs verify registry.example.com/app@sha256:...
    """
    if meta is None:
        if layer is None or is_local(layer) or zinfo is not None:
            raise click.UsageError("give --meta FILE (and LAYER), or an image reference alone")
        _verify_image(ctx, layer, registry=registry, max_problems=max_problems,
                      as_json=as_json, progress=progress)
        return
    with Progress("verifying", enabled=progress) as bar, \
            open_image(meta, layer=layer, zinfo=zinfo, registry=registry) as image:
        report = verify_image(image, read_data=layer is not None, check_tar=tar_headers,
                              max_problems=max_problems, progress=bar)
    checked: LayerVerification | None = None
    if layer is not None:
        stream, digest, size = open_layer_stream(layer, registry)
        try:
            with Progress("checking the index against the layer", size,
                          enabled=progress) as bar:
                checked = verify_layer(stream, LayerIndexFiles(meta, zinfo),
                                       blob_digest=digest, max_problems=max_problems,
                                       progress=bar, name=str(meta))
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
    ok = report.ok and (checked is None or checked.ok)
    if as_json:
        click.echo(json.dumps({
            "meta": {"path": str(meta)}, "source": layer, "ok": ok, "files": report.files,
            "dirs": report.dirs, "symlinks": report.symlinks, "others": report.others,
            "bytes_read": report.bytes_read, "elapsed_s": round(report.elapsed_s, 6),
            "problem_count": report.problem_count,
            "problems": list(report.problems), "warnings": list(report.warnings),
            "layer_check": checked.to_json() if checked is not None else None}, indent=2))
    else:
        for line in report.problems:
            click.echo(f"problem: {printable_message(line)}")
        if report.problem_count > len(report.problems):
            click.echo(f"problem: ... and {report.problem_count - len(report.problems)} more")
        for line in report.warnings:
            click.echo(f"warning: {printable_message(line)}")
        if checked is not None:
            for line in checked.problems:
                click.echo(f"problem: {printable_message(line)}")
            if checked.problem_count > len(checked.problems):
                click.echo(f"problem: ... and {checked.problem_count - len(checked.problems)} "
                           f"more differences from the layer")
        count = report.problem_count + (checked.problem_count if checked else 0)
        summary = (f"{meta}: {'OK' if ok else counted(count, 'problem')}: "
                   f"{counted(report.files, 'file')}, {counted(report.dirs, 'dir')}, "
                   f"{counted(report.symlinks, 'symlink')}, {counted(report.others, 'other')}")
        if layer is not None:
            summary += (f"; read {format_size(report.bytes_read)} in {report.elapsed_s:.2f} s "
                        f"({format_rate(report.bytes_read / max(report.elapsed_s, 1e-9))})")
        if checked is not None and checked.ok:
            summary += f"; the index matches blob {checked.blob_digest}"
        click.echo(summary)
    if not ok:
        ctx.exit(1)


def _verify_image(ctx: click.Context, reference: str, *, registry: RegistryOptions,
                  max_problems: int, as_json: bool, progress: bool | None) -> None:
    from ..trust.imagecheck import check_image_index

    verbose = progress is not False and not as_json
    check = check_image_index(reference, registry=registry, max_problems=max_problems,
                              progress=(lambda line: click.echo(line, err=True)) if verbose
                              else None)
    if as_json:
        click.echo(json.dumps({"reference": reference, "ok": check.ok,
                               "manifest": {"digest": check.manifest},
                               "index": {"digest": check.origin},
                               "layers": [{**layer.to_json(),
                                           "trust": check.trust.get(layer.name)}
                                          for layer in check.layers]},
                              indent=2))
    else:
        for result in check.layers:
            click.echo(printable_message(result.summary()))
            for line in result.problems[1:]:
                click.echo(f"problem: {printable_message(line)}")
        kinds = ", ".join(sorted(set(check.trust.values()))) or "none"
        click.echo(f"{reference}: index {check.origin} ({kinds}): "
                   + ("OK, every indexed layer verified" if check.ok else
                      f"{sum(not r.ok for r in check.layers)} of {len(check.layers)} layers do "
                      f"not match their index"))
    if not check.ok:
        ctx.exit(1)


COMMANDS: list[click.Command] = [ls, cat, verify]
