"""``crc-infer``: run a bundle on folders of image pairs, or validate a bundle against its reference.

Exit codes: 0 success (every pair processed); 1 a user error (one line on stderr), nothing could be
processed, or ``validate`` FAILED; 2 bad command line; 3 predictions written but some inputs were skipped.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from pathlib import Path

import click

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_COMMAND = "run"
EXIT_SKIPPED = 3  # the run finished and wrote its predictions, but some inputs were skipped


class DefaultGroup(click.Group):
    """A group that runs :data:`DEFAULT_COMMAND` when the first argument names no subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(exc: UserError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


DEVICE = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: CUDA when onnxruntime has it, else CPU; cuda insists and fails loudly.",
)
THREADS = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="onnxruntime intra-op threads (default: onnxruntime decides).",
)
VERBOSE = click.option("-v", "--verbose", is_flag=True, help="Log what the runtime does.")


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run a crc-fusion bundle on image pairs (torch-free).

    \b
      crc-infer FOLDER --bundle BUNDLE [options]   predictions for every pair in FOLDER
      crc-infer validate BUNDLE [--device ...]     parity of every artifact on reference.npz
    """


@cli.command(DEFAULT_COMMAND)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--bundle",
    "bundle_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle folder written by crc-export.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per model call."
)
@DEVICE
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Predictions CSV (default: FOLDER/predictions.csv), written atomically.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue a killed run from OUTPUT.partial: pairs already written are not run again.",
)
@click.option(
    "--artifact",
    "artifact_name",
    default="fp32",
    show_default=True,
    help="Artifact to run: a file name from the manifest or a precision (fp32, fp16).",
)
@THREADS
@VERBOSE
def run_command(
    folder: Path,
    bundle_dir: Path,
    batch_size: int,
    device: str,
    output: Path | None,
    resume: bool,
    artifact_name: str,
    threads: int | None,
    verbose: bool,
) -> None:
    """Predict every pair in FOLDER (pairs.csv, or pathology/ + radiology/ matched by file stem).

    Exit 0 when every pair was processed, 3 when predictions were written but some inputs were
    skipped (each listed with its reason), 1 on a user error or when nothing could be processed.
    """
    from .backends.onnxruntime import OrtBackend
    from .bundle import MANIFEST_NAME, load_bundle, sha256_file
    from .pairs import discover_pairs
    from .predict import prediction_columns, prediction_row, run_inference
    from .predictions import PredictionWriter
    from .timing import format_latency, per_pair, summarize, throughput

    _setup_logging(verbose)
    output = output or folder / "predictions.csv"
    try:
        bundle = load_bundle(bundle_dir)
        pairset = discover_pairs(folder)
        artifact = bundle.artifact(artifact_name)
        if artifact.get("kind") != "onnx":
            raise UserError(
                f"{bundle.path / artifact['file']}: kind {artifact.get('kind')!r} has no backend in this "
                "runtime yet; pass --artifact model.onnx"
            )
        t0 = time.perf_counter()
        backend = OrtBackend(
            bundle.file(artifact["file"]),
            device=device,
            intra_op_threads=threads,
            precision=artifact.get("precision", "fp32"),
        )
        load_s = time.perf_counter() - t0
        if output.is_dir() or not output.parent.is_dir():
            raise UserError(
                f"{output}: is a folder or its folder does not exist; pass a file path as --output"
            )
        run_key = {
            "manifest_sha256": sha256_file(bundle.path / MANIFEST_NAME),
            "artifact": artifact["file"],
        }
        writer = PredictionWriter(output, prediction_columns(bundle.classes), resume, run_key)
        try:
            result = run_inference(
                pairset,
                bundle,
                backend,
                batch_size,
                skip_ids=writer.done_ids,
                on_batch=lambda preds: writer.write_rows(prediction_row(p, bundle.classes) for p in preds),
            )
        finally:
            backend.close()
        if not result.predictions and not result.resumed:
            writer.discard()
            first = result.skipped[0] if result.skipped else None
            raise UserError(
                f"{folder}: no pair could be processed ({len(result.skipped)} skipped"
                + (f"; first: {first.item}: {first.reason})" if first else ")")
            )
        try:
            writer.finalize(order=[p.id for p in pairset.pairs])
        except OSError as exc:
            raise UserError(f"{output}: cannot write predictions ({exc.strerror or exc})") from None
    except UserError as exc:
        _fail(exc)
    n = len(result.predictions)
    resumed = f", {result.resumed} already in {writer.partial.name} (resumed)" if resume else ""
    click.echo(f"pairs: {n} processed{resumed}, {len(result.skipped)} skipped (from {pairset.source})")
    for skip in result.skipped:
        click.echo(f"  skipped {skip.item}: {skip.reason}")
    if result.skipped:
        kinds = Counter(skip.kind for skip in result.skipped).most_common()
        click.echo("skipped by reason: " + ", ".join(f"{kind} {count}" for kind, count in kinds))
    # Accuracy over the whole predictions file: this run's pairs plus the rows a resumed run kept.
    old = [row[-1] == "1" for row in writer.resumed_rows if row[-1] != ""]
    labelled, correct = len(old) + result.labelled, sum(old) + result.correct
    if labelled:
        click.echo(f"accuracy: {correct / labelled:.2%} on {labelled} labelled pairs")
    click.echo(
        f"throughput: {throughput(n, result.total_seconds):.1f} pairs/s end-to-end "
        f"(decode + resize + infer, {result.total_seconds:.3f} s; model load {load_s:.3f} s)"
    )
    lat = summarize(result.batch_seconds)
    pair_p50 = per_pair(lat, batch_size)["median_ms"]
    click.echo(
        f"model latency per batch: {format_latency(lat)}; {pair_p50:.3f} ms per pair at p50 "
        f"({backend.name} {backend.version}, {artifact['file']}, device {backend.device}, "
        f"batch size {batch_size}, {lat['count']} batches, first one run once untimed as warm-up)"
    )
    click.echo(f"predictions: {output}")
    if result.skipped:
        sys.exit(EXIT_SKIPPED)


@cli.command("validate")
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@DEVICE
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Pairs per model call."
)
@THREADS
@VERBOSE
def validate_command(
    bundle_dir: Path, device: str, batch_size: int, threads: int | None, verbose: bool
) -> None:
    """Run every usable ONNX artifact of BUNDLE on its reference.npz and gate parity with PyTorch."""
    from .bundle import load_bundle
    from .validate import format_parity_table, validate_bundle

    _setup_logging(verbose)
    try:
        bundle = load_bundle(bundle_dir)
        rows = validate_bundle(bundle, device=device, batch_size=batch_size, intra_op_threads=threads)
    except UserError as exc:
        _fail(exc)
    click.echo(format_parity_table(rows))
    ran = [r for r in rows if r["passed"] is not None]
    if ran and all(r["passed"] for r in ran):
        click.echo(f"PASSED: {len(ran)} artifact(s) match the PyTorch reference")
    else:
        why = (
            "no artifact could be run"
            if not ran
            else f"{sum(not r['passed'] for r in ran)} artifact(s) failed"
        )
        click.echo(f"FAILED: {why}")
        sys.exit(1)


def main() -> None:
    """Console entry point ``crc-infer``."""
    cli()


if __name__ == "__main__":
    main()
