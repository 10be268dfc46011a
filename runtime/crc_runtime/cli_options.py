"""What the crc-infer commands share: the default-command group, exit codes, error output, options."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from .errors import UserError, printable

DEFAULT_COMMAND = "run"
EXIT_SKIPPED = 3  # the run finished and wrote its predictions, but some inputs were skipped
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the rows written so far stay in OUTPUT.partial


class DefaultGroup(click.Group):
    """A group that runs :data:`DEFAULT_COMMAND` when the first argument names no subcommand.

    A first argument that names a subcommand and is also a folder of pairs here (one holding pairs.csv,
    pathology/ or radiology/) is taken as that folder, with a note saying so: ``crc-infer validate
    --bundle B`` runs on ./validate when it holds pairs. When a subcommand's own arguments do not parse,
    the usage error says how to pass a folder of that name instead (``crc-infer run ./validate``).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in ctx.help_option_names:
            first = args[0]
            if first not in self.commands:
                args = [DEFAULT_COMMAND, *args]
            elif first != DEFAULT_COMMAND and _holds_pairs(first):
                click.echo(
                    f"note: {first} is a folder of image pairs here, so crc-infer runs on it "
                    f"(crc-infer {DEFAULT_COMMAND} ./{first}); for the {first} command, run it from "
                    "another folder",
                    err=True,
                )
                args = [DEFAULT_COMMAND, *args]
            else:
                ctx.meta["crc_infer.command_typed"] = first
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        """Also: Ctrl-C anywhere a command has not handled it (loading the bundle, listing the folder,
        ...) is one line and exit 130, not click's "Aborted!" and exit 1."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.UsageError as exc:
            typed = ctx.meta.get("crc_infer.command_typed")
            if typed not in (None, DEFAULT_COMMAND) and exc.ctx is not None and exc.ctx.info_name == typed:
                exc.message += (
                    f"; to run on a folder named {typed}, pass it as: crc-infer {DEFAULT_COMMAND} "
                    f"./{typed} --bundle BUNDLE"
                )
            raise


@contextlib.contextmanager
def progress(length: int, quiet: bool, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal and not ``--quiet``; yields ``advance(pairs)``.

    Off a terminal nothing at all is printed (click's bar would still print its label there).
    """
    if quiet or length <= 0 or not sys.stderr.isatty():
        yield lambda done: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


class Seconds(click.ParamType):
    """A duration in seconds, as :func:`crc_runtime.bench.check_duration` allows (``nan`` never ends)."""

    name = "seconds"

    def convert(self, value, param, ctx) -> float:
        from .bench import check_duration

        try:
            return check_duration(float(value))
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        except UserError as exc:
            self.fail(str(exc), param, ctx)


SECONDS = Seconds()


def _holds_pairs(name: str) -> bool:
    """Whether ``name`` is a folder with the input layout of ``crc-infer FOLDER``."""
    folder = Path(name)
    return (folder / "pairs.csv").is_file() or any((folder / m).is_dir() for m in ("pathology", "radiology"))


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
    help="Where the model runs: cpu (onnxruntime on the CPU), cuda (a GPU backend, never the CPU: "
    "fails with the reason when none starts) or auto (a GPU backend when one starts, else the CPU).",
)
GPU = click.option(
    "--gpu",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="CUDA device ordinal for the GPU backends (the report's device says cuda:N).",
)
TF32 = click.option(
    "--tf32",
    is_flag=True,
    help="ort-cuda: let FP32 math run in TF32 (faster on Ampere and newer, less exact; the report's "
    "precision says tf32). Off by default; parity checks never use it.",
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
QUIET = click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal)."
)
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
    help="Artifact to run: a manifest file name or a precision (fp32, fp16, int8). Default: the fastest "
    "usable one for the backend (ort-cpu int8, else fp32; ort-cuda fp16, else fp32; trt the engine for "
    "this GPU). A precision the bundle lacks, or marked unusable, is an error.",
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
