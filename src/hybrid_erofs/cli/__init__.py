"""Command line: one click group; each command lives in its own thin module.

Library errors (HybridErofsError) become one `Error: ...` line and exit status 1.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..errors import HybridErofsError
from ..printable import printable_message


class _Group(click.Group):
    """Turn library errors into one-line messages; never show a traceback for them."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HybridErofsError as exc:
            # Messages quote archive data (names, link targets): no control character may
            # reach the terminal, and the message stays one line.
            raise click.ClickException(printable_message(str(exc))) from exc
        except BrokenPipeError:
            # `hybrid-erofs cat ... | head`: the reader went away; not an error of ours.
            sys.stderr.close()
            raise SystemExit(0) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hybrid-erofs")
@click.option("-v", "--verbose", count=True, help="Log more on stderr; repeat for debug.")
def main(verbose: int) -> None:
    """Mount gzip container image layers lazily as EROFS.

    \b
    Index a layer once (usually in CI):
        hybrid-erofs index layer.tar.gz -o layer.zinfo --meta m.erofs
    Inspect or read without mounting:
        hybrid-erofs inspect layer.zinfo
        hybrid-erofs ls --meta m.erofs --zinfo layer.zinfo layer.tar.gz /etc
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from . import (
        cache_cmd,
        erofs_cmds,
        index_cmd,
        inspect_cmd,
        mount_cmd,
        mount_helper,
        mount_image_cmd,
        profile_cmd,
        serve_cmd,
        snapshotter_cmd,
    )

    for module in (index_cmd, inspect_cmd, erofs_cmds, serve_cmd, mount_cmd, mount_image_cmd,
                   mount_helper, profile_cmd, cache_cmd, snapshotter_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
