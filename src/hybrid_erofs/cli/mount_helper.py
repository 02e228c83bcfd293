"""mount(8) and umount(8) helpers for `-t hybrid-erofs`, and `hybrid-erofs install-mount-helper`
that puts them in place (/sbin/mount.hybrid-erofs, /sbin/umount.hybrid-erofs).

`mount -t hybrid-erofs -o meta=m.erofs,zinfo=layer.zinfo REF /mnt` runs `hybrid-erofs mount`
(`-o image`: `mount-image`) with the command's own options; credentials never come from `-o`.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from ..errors import HybridErofsError
from ..mounting.kernel import MOUNT_FLAGS, restrict_mount
from ..mounting.lifecycle import find_mount, unmount
from ..mounting.utab import HELPER, record_helper
from ..outfile import write_atomic

MOUNT_FAILURE = 32  # mount(8)'s exit status for "mount failure"
USAGE = 1  # mount(8): "incorrect invocation or permissions"
# Options mount(8) and fstab use that mean nothing more here. EROFS is read-only whatever is
# asked: mount(8) passes "rw" when nothing is said, so it cannot be refused.
GENERIC = {"ro", "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
           "owner", "group", "suid", "dev", "exec", "atime", "noatime", "relatime",
           "strictatime", "diratime", "nodiratime", "async"}
CREDENTIALS = {"username", "password", "password-stdin", "password-file", "token"}
NOT_FOR_HELPERS = {"foreground", "reattach", "help"}


class HelperError(Exception):
    """One line for stderr; `status` is the exit status mount(8) passes on."""

    def __init__(self, message: str, status: int = USAGE) -> None:
        super().__init__(message)
        self.status = status


def split_options(text: str) -> list[str]:
    """`a,b=c,d="x,y"`: commas separate options except inside double quotes (libmount)."""
    options, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            options.append(current)
            current = ""
            continue
        current += char
    options.append(current)
    return [option for option in options if option]


def command_arguments(command: click.Command, options: Sequence[str], *,
                      sloppy: bool = False) -> tuple[list[str], list[str]]:
    """(CLI arguments of `command` for the -o options, per-mount flags to apply after).

    `key=value` becomes `--key value` and `flag` becomes `--flag`, for the command's own
    options (underscores may stand for dashes); HelperError for anything else, except that
    `sloppy` (mount -s) skips options it does not know. Credentials are refused even then.
    """
    known: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            for opt in param.opts:
                if opt.startswith("--"):
                    known[opt[2:]] = param
    argv: list[str] = []
    flags: list[str] = []
    for option in options:
        key, has_value, value = option.partition("=")
        name = key.strip().replace("_", "-")
        value = value.strip('"')
        if name == "image" and not has_value:
            continue
        if key.strip() in GENERIC or name.startswith(("x-", "comment", "helper", "uhelper")):
            continue
        if name in MOUNT_FLAGS and not has_value:
            flags.append(name)
            continue
        if name in CREDENTIALS:
            raise HelperError(
                f"-o {name}: credentials are never taken from mount options (fstab is "
                f"world-readable and options land in argv); keep them in an auth file "
                f"($REGISTRY_AUTH_FILE, ~/.docker/config.json) or a credential helper")
        option_of = known.get(name)
        if option_of is None or name in NOT_FOR_HELPERS:
            if sloppy:
                continue
            raise HelperError(f"-o {key}: not an option of `hybrid-erofs {command.name}` "
                              f"(see docs/mount.md, \"mount(8) and fstab\")")
        if option_of.is_flag:
            if has_value:
                raise HelperError(f"-o {option}: {name} takes no value")
            argv.append(f"--{name}")
        else:
            if not has_value or not value:
                raise HelperError(f"-o {key}: needs a value ({key}=...)")
            argv += [f"--{name}", value]
    return argv, flags


def parse_mount_argv(argv: Sequence[str]) -> tuple[str, str, list[str], set[str]]:
    """mount(8)'s helper call `SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`:
    (spec, dir, options, single-letter flags)."""
    positional: list[str] = []
    options: list[str] = []
    letters: set[str] = set()
    items = list(argv)
    while items:
        item = items.pop(0)
        if item in ("-o", "-t", "-N"):
            if not items:
                raise HelperError(f"{item} needs a value")
            value = items.pop(0)
            if item == "-o":
                options += split_options(value)
            elif item == "-N":
                raise HelperError("-N: mounting in another namespace is not supported")
        elif item.startswith("-") and len(item) > 1:
            letters.update(item[1:])
        else:
            positional.append(item)
    if len(positional) != 2:
        raise HelperError("usage: mount.hybrid-erofs REF MOUNTPOINT [-o OPTIONS] (called by "
                          "`mount -t hybrid-erofs`)")
    return positional[0], positional[1], options, letters


def mount_main(argv: Sequence[str]) -> int:
    """`mount.hybrid-erofs SPEC DIR -o ...`: mount as `hybrid-erofs mount` (or `mount-image`
    with -o image) does, record the umount helper in utab, apply nosuid/nodev/noexec."""
    from . import main

    try:
        spec, target, options, letters = parse_mount_argv(argv)
        image = any(option.strip() == "image" for option in options)
        command = main.commands["mount-image" if image else "mount"]
        unknown = letters - set("sfnvi")
        if unknown:
            raise HelperError(f"-{''.join(sorted(unknown))}: not a mount helper flag")
        arguments, flags = command_arguments(command, options, sloppy="s" in letters)
        if "f" in letters:  # mount -f: everything but the mount itself
            return 0
        _run_command(command.name or "mount", [*arguments, "--", spec, target],
                     verbose="v" in letters)
        path = os.path.realpath(target)
        if flags:
            restrict_mount(path, flags)
        if "n" not in letters:
            record_helper(path)
        return 0
    except HelperError as exc:
        click.echo(f"mount.{HELPER}: {exc}", err=True)
        return exc.status
    except HybridErofsError as exc:
        click.echo(f"mount.{HELPER}: {exc}", err=True)
        return MOUNT_FAILURE


def _run_command(name: str, arguments: list[str], *, verbose: bool) -> None:
    """`hybrid-erofs NAME ARGUMENTS` in this process; its report only with -v."""
    from . import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out if not verbose else sys.stdout):
            main.main(args=[name, *arguments], prog_name="hybrid-erofs", standalone_mode=False)
    except click.ClickException as exc:
        raise HelperError(exc.format_message(), MOUNT_FAILURE) from exc
    except click.exceptions.Exit as exc:
        if exc.exit_code:
            raise HelperError(f"exit status {exc.exit_code}", MOUNT_FAILURE) from exc


def umount_main(argv: Sequence[str]) -> int:
    """`umount.hybrid-erofs DIR [-nlfvr]`: `hybrid-erofs umount` (the daemon stops too); a
    mountpoint hybrid-erofs does not know (a stale utab entry) is unmounted as umount -i does."""
    targets = [item for item in argv if not item.startswith("-")]
    letters = {c for item in argv if item.startswith("-") for c in item[1:]}
    if len(targets) != 1:
        click.echo(f"umount.{HELPER}: usage: umount.{HELPER} MOUNTPOINT [-l]", err=True)
        return USAGE
    target = targets[0]
    try:
        find_mount(target)
    except HybridErofsError:
        plain = ["umount", "--internal-only", *(["-l"] if "l" in letters else []), target]
        return subprocess.run(plain).returncode
    try:
        message = unmount(target, lazy="l" in letters)
    except HybridErofsError as exc:
        click.echo(f"umount.{HELPER}: {exc}", err=True)
        return MOUNT_FAILURE
    if "v" in letters:
        click.echo(message)
    return 0


def helper_script(kind: str) -> str:
    """The /sbin/{mount,umount}.hybrid-erofs wrapper: this Python, this package."""
    call = f"from hybrid_erofs.cli.mount_helper import {kind}_main; sys.exit({kind}_main(sys.argv[1:]))"
    return (f"#!/bin/sh\n# {kind}(8) helper for -t {HELPER}, written by "
            f"`hybrid-erofs install-mount-helper`.\n"
            f"exec {sys.executable} -c 'import sys; {call}' \"$@\"\n")


@click.command("install-mount-helper")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/sbin"), show_default=True,
              help="Where mount(8) looks for helpers.")
@click.option("--remove", is_flag=True, help="Remove the helpers instead.")
def install_mount_helper(directory: Path, remove: bool) -> None:
    """Install mount.hybrid-erofs and umount.hybrid-erofs, so that mount(8), umount(8) and
    /etc/fstab know `-t hybrid-erofs`. Needs root.

    Every option of `hybrid-erofs mount` works as `-o NAME=VALUE` or `-o FLAG` (`-o image`:
    mount-image, with its options), plus nosuid, nodev, noexec. Credentials never come from
    -o: use an auth file or a credential helper. A plain `umount MOUNTPOINT` stops the daemon.

    \b
    Examples:
        hybrid-erofs install-mount-helper
        mount -t hybrid-erofs -o meta=/idx/m.erofs,zinfo=/idx/layer.zinfo \\
            registry.example.com/app:1.2 /mnt/app
        mount -t hybrid-erofs -o image,index-dir=/idx/app oci:/srv/layout:1.2 /srv/app
        umount /mnt/app
        # /etc/fstab
        registry.example.com/app:1.2 /mnt/app hybrid-erofs meta=/idx/m.erofs,zinfo=/idx/layer.zinfo,_netdev,nodev 0 0
    """
    for kind in ("mount", "umount"):
        path = directory / f"{kind}.{HELPER}"
        if remove:
            path.unlink(missing_ok=True)
            click.echo(f"removed {path}")
            continue
        write_atomic(path, helper_script(kind).encode(), mode=0o755)
        click.echo(f"installed {path}")


COMMANDS: list[click.Command] = [install_mount_helper]
