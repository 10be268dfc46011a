"""What the crc-train commands share: the default-command group and the log format."""

from __future__ import annotations

import logging
import sys

import click


class DefaultGroup(click.Group):
    """A group that runs ``default_command`` when the first argument names no subcommand.

    So ``crc-train --epochs 2`` trains, and ``crc-train evaluate RUN_DIR`` can be added later.
    """

    default_command = "train"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("crc_train")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
