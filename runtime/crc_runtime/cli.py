"""``crc-infer``: run a bundle on folders of image pairs, or validate a bundle against its reference.

Exit codes: 0 success (every pair processed); 1 a user error (one line on stderr), nothing could be
processed, or ``validate`` FAILED; 2 bad command line; 3 predictions written but some inputs were skipped;
130 interrupted (Ctrl-C), the rows so far kept in OUTPUT.partial for ``--resume``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli_options import (
    ARTIFACT,
    BACKEND,
    BUNDLE,
    CUDA_GRAPHS,
    DEFAULT_COMMAND,
    DEVICE,
    EXIT_INTERRUPTED,
    EXIT_SKIPPED,
    GPU,
    QUIET,
    REPORT,
    SECONDS,
    TF32,
    THREADS,
    VERBOSE,
    DefaultGroup,
    fail,
    progress,
    setup_logging,
)
from .errors import UserError

if TYPE_CHECKING:
    from .predictions import PredictionWriter
    from .run_summary import FolderRun

log = logging.getLogger(__name__)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run a crc-fusion bundle on image pairs (torch-free).

    \b
      crc-infer FOLDER --bundle BUNDLE [options]   predictions for every pair in FOLDER
      crc-infer slide SLIDE --radiology IMAGE --bundle BUNDLE -o OUT   tissue map of a whole slide
      crc-infer validate BUNDLE [--device ...]     parity of every artifact on reference.npz
      crc-infer bench --bundle BUNDLE [options]    engine-only latency per batch size
    """


@dataclass
class RunOptions:
    """The options of ``crc-infer FOLDER`` (see ``crc-infer run --help`` for each)."""

    folder: Path
    bundle_dir: Path
    batch_size: int
    device: str
    gpu: int
    output: Path | None
    resume: bool
    artifact_name: str | None
    backend_name: str
    cuda_graphs: bool
    tf32: bool
    workers: int | None
    explain_dir: Path | None
    report: Path | None
    threads: int | None
    quiet: bool
    verbose: bool


@cli.command(DEFAULT_COMMAND)
@click.argument("folder", type=click.Path(path_type=Path))
@BUNDLE
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per model call."
)
@DEVICE
@GPU
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
@ARTIFACT
@BACKEND
@CUDA_GRAPHS
@TF32
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Decode threads (default: one per core, at most 8; 0 decodes on the main thread). At most "
    "3 x batch size decoded pairs are held at once.",
)
@click.option(
    "--explain",
    "explain_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also explain every prediction: per pair an overlay PNG of each branch's class activation map "
    "in this folder, and the margin split by modality in the predictions (runs model.explain.onnx on "
    "onnxruntime; docs/runtime.md).",
)
@REPORT
@THREADS
@QUIET
@VERBOSE
def run_command(**options) -> None:
    """Predict every pair in FOLDER (pairs.csv, or pathology/ + radiology/ matched by file stem).

    Exit 0 when every pair was processed, 3 when predictions were written but some inputs were
    skipped (each listed with its reason), 1 on a user error or when nothing could be processed.
    """
    from .run_summary import echo_run_summary

    opts = RunOptions(**options)
    setup_logging(opts.verbose)
    try:
        run = _run_folder(opts)
    except UserError as exc:
        fail(exc)
    echo_run_summary(run)
    if run.result.skipped:
        sys.exit(EXIT_SKIPPED)


def _run_folder(opts: RunOptions) -> FolderRun:
    """Open the bundle on its backend, stream the folder through it, write predictions and the report."""
    from .bundle import load_bundle
    from .explain import ExplainWriter
    from .pairs import discover_pairs
    from .predict import default_workers, prediction_columns, prediction_row
    from .predictions import PredictionWriter, check_outputs
    from .predictor import Predictor
    from .run_summary import FolderRun
    from .timing import folder_run_report

    output = opts.output or opts.folder / "predictions.csv"
    bundle = load_bundle(opts.bundle_dir)
    pairset = discover_pairs(opts.folder, bundle.classes)
    check_outputs(
        {"--output": output, "--report": opts.report},
        {"the bundle": bundle.paths(), "the input folder": pairset.paths()},
    )
    with Predictor(
        bundle,
        opts.backend_name,
        opts.batch_size,
        artifact=opts.artifact_name,
        device=opts.device,
        gpu=opts.gpu,
        threads=opts.threads,
        cuda_graphs=opts.cuda_graphs,
        tf32=opts.tf32,
        explain=opts.explain_dir is not None,
    ) as predictor:
        run_key = predictor.model_key()
        explainer = None
        if predictor.explain is not None:
            workers = default_workers() if opts.workers is None else opts.workers
            explainer = ExplainWriter(
                opts.explain_dir, bundle, predictor.explain, dict(predictor.plan), workers, pairset.confined
            )
            explainer.check_targets(pairset.pairs, [*bundle.paths(), *pairset.paths(), output])
        columns = prediction_columns(bundle.classes, explainer.columns if explainer else ())
        writer = PredictionWriter(output, columns, opts.resume, run_key)
        todo = sum(pair.id not in writer.done_ids for pair in pairset.pairs)
        try:
            with _keeping_rows(writer), progress(todo, opts.quiet, "predicting") as advance:
                result = predictor.predict_folder(
                    pairset,
                    skip_ids=writer.done_ids,
                    on_batch=lambda preds: writer.write_rows(
                        prediction_row(p, bundle.classes) for p in preds
                    ),
                    workers=opts.workers,
                    keep_predictions=False,  # rows stream to the writer: memory stays flat
                    on_progress=advance,
                    explainer=explainer,
                )
        finally:
            if explainer is not None:
                explainer.close()
    if not result.processed and not result.resumed:
        writer.discard()
        first = result.skipped[0] if result.skipped else None
        raise UserError(
            f"{opts.folder}: no pair could be processed ({len(result.skipped)} skipped"
            + (f"; first: {first.item}: {first.reason})" if first else ")")
        )
    try:
        writer.finalize(order=[p.id for p in pairset.pairs])
    except OSError as exc:
        raise UserError(
            f"{output}: cannot write predictions ({exc.strerror or exc}); the rows are kept in "
            f"{writer.partial}: make room and run the same command with --resume"
        ) from None
    report = folder_run_report(result, predictor)
    if opts.report is not None:
        _write_report(opts.report, report)
    return FolderRun(result, predictor, pairset, writer, report, output, opts.report, opts.resume, explainer)


@contextlib.contextmanager
def _keeping_rows(writer: PredictionWriter) -> Iterator[None]:
    """Around a streaming run: on Ctrl-C one line says how to go on (exit 130); on an error an empty
    partial goes, rows already written stay for ``--resume`` and the error line says so."""
    try:
        yield
    except KeyboardInterrupt:  # what is on disk stays there
        click.echo(
            f"interrupted: {len(writer.ids)} rows kept in {writer.partial}; "
            "run the same command with --resume to continue",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        kept = writer.abandon()
        if kept and isinstance(exc, UserError):
            raise UserError(f"{exc}; {kept}") from None
        raise


def _write_report(path: Path, report: dict) -> None:
    from .timing import write_report

    try:
        write_report(path, report)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the report ({exc.strerror or exc})") from None


@cli.command("slide")
@click.argument("slide_path", metavar="SLIDE", type=click.Path(path_type=Path))
@click.option(
    "--radiology",
    type=click.Path(path_type=Path),
    default=None,
    help="The patient's radiology image, paired with every tile (patient-level pairing).",
)
@BUNDLE
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per call."
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Microns per pixel of level 0, for a slide whose metadata lacks it (overrides the slide's own).",
)
@click.option(
    "--stride",
    "stride_um",
    type=click.FloatRange(min=8, max=112),
    default=112.0,
    show_default=True,
    help="Microns between tile origins (tiles are 112 um; less overlaps them).",
)
@click.option(
    "--min-tissue",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Tissue fraction (from the tissue mask) a tile needs to be classified.",
)
@click.option("--resume", is_flag=True, help="Continue a killed run from OUT/tiles.csv.partial.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Tile reader threads (default: one per core, at most 8).",
)
@DEVICE
@GPU
@ARTIFACT
@BACKEND
@CUDA_GRAPHS
@TF32
@THREADS
@QUIET
@VERBOSE
def slide_command(
    slide_path: Path,
    radiology: Path | None,
    bundle_dir: Path,
    out_dir: Path,
    batch_size: int,
    mpp: float | None,
    stride_um: float,
    min_tissue: float,
    resume: bool,
    workers: int | None,
    device: str,
    gpu: int,
    artifact_name: str | None,
    backend_name: str,
    cuda_graphs: bool,
    tf32: bool,
    threads: int | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Tissue map of a whole-slide image: every 112-um tile with tissue classified (crc-fusion[slides]).

    Writes OUT/tiles.csv, tissue_map.png, overlay.png, tissue_mask.png, tiles.geojson and summary.json.
    """
    from .bundle import load_bundle
    from .predictor import Predictor
    from .run_summary import echo_slide_summary
    from .slide import SlideJob

    setup_logging(verbose)
    try:
        bundle = load_bundle(bundle_dir)
        job = SlideJob(slide_path, radiology, bundle, out_dir, mpp, stride_um, min_tissue)
        try:
            with Predictor(
                bundle, backend_name, batch_size, artifact=artifact_name, device=device, gpu=gpu,
                threads=threads, cuda_graphs=cuda_graphs, tf32=tf32,
            ) as predictor:  # fmt: skip
                writer = job.start(predictor, resume)
                with _keeping_rows(writer), progress(job.todo, quiet, "tiles") as advance:
                    job.run(predictor, workers, on_progress=advance)
            summary = job.write_outputs(predictor)
        finally:
            job.close()
    except UserError as exc:
        fail(exc)
    echo_slide_summary(job, predictor, summary, resume=resume)


@cli.command("bench")
@BUNDLE
@click.option(
    "--batch-sizes", default="1,8,32,64,128,256", show_default=True, help="Comma-separated batch sizes."
)
@BACKEND
@ARTIFACT
@DEVICE
@GPU
@CUDA_GRAPHS
@TF32
@click.option("--warmup-iters", type=click.IntRange(min=0), default=10, show_default=True)
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=None,
    help="Timed calls per batch size (default: --duration).",
)
@click.option(
    "--duration",
    type=SECONDS,
    default=3.0,
    show_default=True,
    help="Seconds of timed calls per batch size when --iterations is not given.",
)
@REPORT
@THREADS
@VERBOSE
def bench_command(
    bundle_dir: Path,
    batch_sizes: str,
    backend_name: str,
    artifact_name: str | None,
    device: str,
    gpu: int,
    cuda_graphs: bool,
    tf32: bool,
    warmup_iters: int,
    iterations: int | None,
    duration: float,
    report: Path | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Time the engine alone on synthetic uint8 inputs for each batch size (like trtexec)."""
    from .backends import open_backend
    from .bench import format_bench_table, parse_batch_sizes, run_bench
    from .bundle import load_bundle
    from .predictions import check_outputs
    from .timing import backend_section, environment

    setup_logging(verbose)
    try:
        sizes = parse_batch_sizes(batch_sizes)
        bundle = load_bundle(bundle_dir)
        check_outputs({"--report": report}, {"the bundle": bundle.paths()})
        selection = open_backend(bundle, backend_name, artifact_name, device, gpu, threads, cuda_graphs, tf32)
        with selection.backend as backend:
            rows = run_bench(backend, sizes, warmup_iters, iterations, duration)
            bench_report = {
                "kind": "crc-infer bench",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "environment": environment(backend),
                "backend": backend_section(backend, selection.artifact, selection.reason),
                "inputs": "synthetic uint8, fixed seed 0",
                "cuda_graphs": cuda_graphs,
                "results": rows,
            }
        if report is not None:
            _write_report(report, bench_report)
    except UserError as exc:
        fail(exc)
    b = bench_report["backend"]
    click.echo(
        f"backend: {b['name']} ({b['version']}, {b['artifact']}, {b['precision']}, device {b['device']}; "
        f"{selection.reason})"
    )
    click.echo(
        f"engine only, synthetic uint8 inputs; {warmup_iters} warm-up calls, then "
        + (f"{iterations} timed calls" if iterations else f"{duration:g} s of timed calls")
        + " per batch size"
    )
    click.echo(format_bench_table(rows))
    if report is not None:
        click.echo(f"report: {report}")


def _threshold_overrides(ctx, param, values) -> dict[str, dict[str, float]]:
    """``--threshold fp16.max_abs_diff=0.05`` (repeatable) -> ``{"fp16": {"max_abs_diff": 0.05}}``."""
    from .validate import parse_threshold

    overrides: dict[str, dict[str, float]] = {}
    for text in values:
        try:
            precision, key, value = parse_threshold(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        overrides.setdefault(precision, {})[key] = value
    return overrides


@cli.command("validate")
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@DEVICE
@GPU
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Pairs per model call."
)
@click.option(
    "--threshold",
    "overrides",
    multiple=True,
    callback=_threshold_overrides,
    metavar="PRECISION.KEY=VALUE",
    help="Gate with this threshold instead of the one the manifest records for each artifact of that "
    "precision (repeatable), e.g. fp32.max_abs_diff=0.002.",
)
@THREADS
@VERBOSE
def validate_command(
    bundle_dir: Path,
    device: str,
    gpu: int,
    batch_size: int,
    overrides: dict[str, dict[str, float]],
    threads: int | None,
    verbose: bool,
) -> None:
    """Run every usable artifact of BUNDLE (ONNX on onnxruntime, engines on TensorRT where this machine
    can) on its reference.npz and gate parity with PyTorch, with the thresholds the manifest records.
    """
    from .bundle import load_bundle
    from .validate import format_parity_table, validate_bundle

    setup_logging(verbose)
    try:
        bundle = load_bundle(bundle_dir)
        rows = validate_bundle(bundle, device, batch_size, overrides, threads, gpu)
    except UserError as exc:
        fail(exc)
    click.echo(format_parity_table(rows))
    for r in rows:
        if r["passed"] is not None:
            limits = ", ".join(f"{k} {v:g}" for k, v in r["thresholds"].items())
            click.echo(f"  {r['artifact']}: thresholds from {r['thresholds_source']}: {limits}")
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
