"""What the crc-infer commands share: the default-command group, exit codes, error output, options."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import UserError, printable

DEFAULT_COMMAND = "run"
EXIT_SKIPPED = 3  # the run finished and wrote its predictions, but some inputs were skipped
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the rows written so far stay in OUTPUT.partial


class DefaultGroup(click.Group):
    """A group that runs :data:`DEFAULT_COMMAND` when the first argument names no subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def fail(exc: UserError) -> None:
    click.echo(f"error: {printable(str(exc))}", err=True)
    sys.exit(1)


DEVICE = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="With --backend auto: cpu forces onnxruntime CPU, cuda insists on a GPU backend and fails loudly "
    "without one. validate: the onnxruntime provider (auto: CUDA when it starts, else the CPU).",
)
THREADS = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="onnxruntime intra-op threads (default: onnxruntime decides).",
)
BUNDLE = click.option(
    "--bundle",
    "bundle_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle folder written by crc-export.",
)
VERBOSE = click.option("-v", "--verbose", is_flag=True, help="Log what the runtime does.")
BACKEND = click.option(
    "--backend",
    "backend_name",
    type=click.Choice(["auto", "ort-cpu", "ort-cuda", "trt"]),
    default="auto",
    show_default=True,
    help="auto: TensorRT when a matching engine, tensorrt and a GPU are here, else onnxruntime CUDA when "
    "it starts, else onnxruntime CPU (it says which and why). A GPU backend named here never falls back.",
)
ARTIFACT = click.option(
    "--artifact",
    "artifact_name",
    default=None,
    help="Artifact to run: a manifest file name or a precision (fp32, fp16). Default: the backend's "
    "choice (ort-cpu fp32; ort-cuda fp16 when usable, else fp32; trt the engine for this GPU).",
)
CUDA_GRAPHS = click.option(
    "--cuda-graphs",
    is_flag=True,
    help="trt backend: capture each batch size once as a CUDA graph, replay it.",
)
REPORT = click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the latency report as JSON to this file (atomically).",
)
