"""`hybrid-erofs serve`: export one layer's device (meta || layer data) over NBD or as a FUSE file.

Foreground; stops cleanly on SIGTERM/SIGINT. The device is built by device.open_device().
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import sys
from pathlib import Path

import click

from ..device import RegistryOptions, open_device
from ..errors import InvalidInput
from ..source import ByteSource
from .options import parse_address, registry_options

log = logging.getLogger(__name__)

_LAYER_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gz")


def default_socket(name: str) -> Path:
    """$XDG_RUNTIME_DIR/hybrid-erofs/NAME.sock, or /run/hybrid-erofs/NAME.sock for root."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        base = Path(runtime) / "hybrid-erofs"
    elif os.geteuid() == 0:
        base = Path("/run/hybrid-erofs")
    else:
        raise click.UsageError("no default socket directory ($XDG_RUNTIME_DIR is not set); "
                               "give --socket PATH")
    return base / f"{name}.sock"


def _export_name(layer: str) -> str:
    base = Path(layer).name
    for suffix in _LAYER_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _looks_like_reference(text: str) -> bool:
    """"host/repo:tag", "repo@sha256:...", "docker://...", "alpine:3.19" (only asked when no
    file of that name exists)."""
    if "://" in text or "@sha256:" in text:
        return True
    if text.startswith(("/", ".")) or text.endswith(_LAYER_SUFFIXES):
        return False
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return True
    return re.fullmatch(r"[a-z0-9._/-]+:\w[\w.-]{0,127}", text) is not None


def _check_layer(layer: str) -> None:
    """A missing local file gets its own message instead of a registry lookup of its name."""
    if os.path.exists(layer) or _looks_like_reference(layer):
        return
    raise InvalidInput(f"{layer}: no such layer file")


def parse_listen(text: str, *, allow_any: bool) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); non-loopback hosts need `allow_any`."""
    host, port = parse_address(text, param_hint="--listen")
    loopback = ipaddress.ip_address(host).is_loopback
    if not loopback and not allow_any:
        raise click.BadParameter(
            f"{host} is not a loopback address and NBD has no authentication or encryption "
            f"here; add --listen-any to expose the layer to the network anyway",
            param_hint="--listen")
    if not loopback:
        log.warning("listening on %s:%d: anyone who can reach it can read the layer", host, port)
    return host, port


def _say(text: str) -> None:
    """Readiness and usage hints go to stdout, one flush per message (scripts wait for them)."""
    click.echo(text)
    sys.stdout.flush()


@click.command("serve")
@click.argument("layer", metavar="SOURCE")
@click.option("--meta", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The layer's EROFS meta image (from `hybrid-erofs index --meta`).")
@click.option("--zinfo", type=click.Path(dir_okay=False, path_type=Path),
              help="The layer's gzip checkpoints (needed for a .tar.gz layer).")
@click.option("--socket", "socket_path", metavar="PATH",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Serve NBD on this unix socket (mode 0600) [the default transport].")
@click.option("--listen", metavar="HOST:PORT",
              help="Serve NBD on TCP (loopback only unless --listen-any).")
@click.option("--listen-any", is_flag=True,
              help="Allow a non-loopback --listen address (no authentication!).")
@click.option("--fuse", "fuse_dir", metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Mount a FUSE filesystem on DIR holding the device as one file.")
@click.option("--name", help="Export name (NBD) and default socket name [default: from SOURCE].")
@click.option("--file-name", default="disk.img", show_default=True,
              help="Name of the device file inside the --fuse directory.")
@click.option("--allow-other", is_flag=True,
              help="--fuse: let other users read the file (needs user_allow_other for non-root).")
@registry_options
def serve(layer: str, meta: Path, zinfo: Path | None, socket_path: Path | None,
          listen: str | None, listen_any: bool, fuse_dir: Path | None, name: str | None,
          file_name: str, allow_other: bool, registry: RegistryOptions) -> None:
    """Serve SOURCE's device (META followed by the uncompressed layer) until SIGTERM/SIGINT.

    SOURCE is a local layer file (.tar.gz with --zinfo, or a plain .tar) or a registry
    reference (with --zinfo; --layer/--blob/--platform pick the layer). Give one of --socket, --listen or --fuse; without any, NBD is served
    on $XDG_RUNTIME_DIR/hybrid-erofs/NAME.sock (root without XDG_RUNTIME_DIR:
    /run/hybrid-erofs/NAME.sock).

    \b
    Examples:
        hybrid-erofs serve --meta m.erofs --zinfo layer.zinfo layer.tar.gz --socket /run/l.sock
          nbdinfo 'nbd+unix:///?socket=/run/l.sock'
          nbdfuse /mnt/dev/disk.img --unix /run/l.sock &   # then mount the file as below
        hybrid-erofs serve --meta m.erofs --zinfo layer.zinfo layer.tar.gz --listen 127.0.0.1:10809
        hybrid-erofs serve --meta m.erofs --zinfo layer.zinfo registry.example/app:1 --layer -1
        hybrid-erofs serve --meta m.erofs --zinfo layer.zinfo layer.tar.gz --fuse /run/l
          mount -t erofs -o ro /run/l/disk.img /mnt        # util-linux: via a loop device
          umount /mnt                                       # before stopping the server
    """
    if sum(x is not None for x in (socket_path, listen, fuse_dir)) > 1:
        raise click.UsageError("give only one of --socket, --listen and --fuse")
    if listen_any and listen is None:
        raise click.UsageError("--listen-any goes with --listen")
    if allow_other and fuse_dir is None:
        raise click.UsageError("--allow-other goes with --fuse")
    name = name or _export_name(layer)
    address = parse_listen(listen, allow_any=listen_any) if listen is not None else None
    _check_layer(layer)
    # No background fetch here, so no decoded spans are stored either (docs/fetch.md): the
    # layer stays as lazy as its reads; spans stored by a mount are still served.
    device = open_device(layer, meta=meta, zinfo=zinfo, registry=registry, store_reads=False)
    with contextlib.closing(device):
        if fuse_dir is not None:
            _serve_fuse(device, fuse_dir, file_name=file_name, allow_other=allow_other,
                        head_bytes=meta.stat().st_size)
        else:
            _serve_nbd(device, socket_path=socket_path, address=address, name=name)


def _serve_fuse(device: ByteSource, fuse_dir: Path, *, file_name: str,
                allow_other: bool, head_bytes: int) -> None:
    from ..export.fuse import serve_fuse  # mfusepy is an optional dependency
    created = not fuse_dir.exists()
    if created:
        fuse_dir.mkdir(mode=0o755, parents=True)
    try:
        path = fuse_dir.absolute() / file_name

        def ready() -> None:
            _say(f"serving {path} ({device.size} bytes)\n"
                 f"  mount -t erofs -o ro {path} MOUNTPOINT   (util-linux mount uses a loop "
                 f"device; a file-backed mount needs mount(2) on the file)\n"
                 f"  unmount MOUNTPOINT before stopping this server")

        logging.getLogger("fuse").setLevel(max(logging.getLogger().level, logging.WARNING))
        serve_fuse(device, fuse_dir, name=file_name, ready=ready, allow_other=allow_other,
                   head_bytes=head_bytes)
    finally:
        if created:
            with contextlib.suppress(OSError):
                fuse_dir.rmdir()
    _say(f"stopped serving {path}")


def _serve_nbd(device: ByteSource, *, socket_path: Path | None,
               address: tuple[str, int] | None, name: str) -> None:
    from ..export.nbd import NbdServer, serve_nbd
    if socket_path is None and address is None:
        socket_path = default_socket(name)
        socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def ready(server: NbdServer) -> None:
        if server.socket_path is not None:
            uri = f"nbd+unix:///{name}?socket={server.socket_path}"
            _say(f"serving {device.size} bytes as NBD export {name!r} on {server.socket_path}\n"
                 f"  nbdinfo '{uri}'\n"
                 f"  nbdfuse DIR/disk.img '{uri}' &   then: mount -t erofs -o ro DIR/disk.img "
                 f"MOUNTPOINT")
        tcp = server.tcp_address
        if tcp is not None:
            host = f"[{tcp[0]}]" if ":" in tcp[0] else tcp[0]
            _say(f"serving {device.size} bytes as NBD export {name!r} on {host}:{tcp[1]}\n"
                 f"  nbdinfo 'nbd://{host}:{tcp[1]}/{name}'")

    serve_nbd(device, socket_path=socket_path, listen=address, export_name=name, ready=ready)
    _say("stopped")


COMMANDS: list[click.Command] = [serve]
