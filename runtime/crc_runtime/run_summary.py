"""A finished ``crc-infer FOLDER`` run, and what it prints: pairs, skips, accuracy, throughput, latency."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .errors import printable
from .timing import format_latency, format_latency_table, summarize, throughput

if TYPE_CHECKING:
    from .explain import ExplainWriter
    from .pairs import PairSet
    from .predict import InferenceResult
    from .predictions import PredictionWriter
    from .predictor import Predictor
    from .slide import SlideJob


@dataclass
class FolderRun:
    """Everything one folder run produced: what the summary prints and the JSON report holds.

    Attributes:
        result: The pipeline's counts and timings.
        predictor: The predictor that ran (backend, artifact, why, batch size, model load time).
        pairset: The pairs found in the folder and the items skipped while finding them.
        writer: The predictions writer (rows a resumed run kept, the partial file).
        report: The latency report (:func:`~crc_runtime.timing.folder_run_report`).
        output: The predictions CSV.
        report_path: Where the report was written, if asked for.
        resume: Whether the run continued an earlier one.
        explainer: What ``--explain`` wrote (None without it).
    """

    result: InferenceResult
    predictor: Predictor
    pairset: PairSet
    writer: PredictionWriter
    report: dict
    output: Path
    report_path: Path | None = None
    resume: bool = False
    explainer: ExplainWriter | None = None


def echo_run_summary(run: FolderRun) -> None:
    """Print the summary of a finished folder run (the same numbers as the JSON report)."""
    result, predictor = run.result, run.predictor
    backend, artifact = predictor.backend, predictor.artifact
    n = result.processed
    click.echo(f"backend: {backend.name} on {artifact['file']} ({predictor.reason})")
    resumed = f", {result.resumed} already in {run.writer.partial.name} (resumed)" if run.resume else ""
    click.echo(f"pairs: {n} processed{resumed}, {len(result.skipped)} skipped (from {run.pairset.source})")
    for skip in result.skipped:
        click.echo(printable(f"  skipped {skip.item}: {skip.reason}"))
    if result.skipped:
        kinds = Counter(skip.kind for skip in result.skipped).most_common()
        click.echo("skipped by reason: " + ", ".join(f"{kind} {count}" for kind, count in kinds))
    # Accuracy over the whole predictions file: this run's pairs plus the rows a resumed run kept.
    old = [row[-1] == "1" for row in run.writer.resumed_rows if row[-1] != ""]
    labelled, correct = len(old) + result.labelled, sum(old) + result.correct
    if labelled:
        click.echo(f"accuracy: {correct / labelled:.2%} on {labelled} labelled pairs")
    click.echo(
        f"throughput: {throughput(n, result.total_seconds):.1f} pairs/s end-to-end "
        f"(decode + resize + infer, {result.total_seconds:.3f} s; model load {predictor.load_seconds:.3f} s)"
    )
    lat = summarize(result.batch_seconds)
    warm = (
        f"the first batch ({result.warmup_pairs} pairs, {result.warmup_seconds * 1e3:.1f} ms) was the "
        "warm-up: its predictions are kept, its time is not in the latency figures"
    )
    ran = (
        f"{backend.name} {backend.version}, {artifact['file']}, {backend.precision}, device {backend.device}"
    )
    if lat["count"]:
        # Per pair from the report, which divides each batch's time by the pairs it really held (the
        # last batch is usually short), not by --batch-size.
        pair_p50 = run.report["latency"]["per_pair"]["median_ms"]
        click.echo(
            f"model latency per batch: {format_latency(lat)}; {pair_p50:.3f} ms per pair at p50 "
            f"({ran}, batch size {predictor.batch_size}, {lat['count']} timed batches; {warm})"
        )
        click.echo(format_latency_table(run.report["latency"]))
    elif result.warmup_pairs:
        click.echo(f"model latency: no timed batch ({ran}; {warm}); for latency use crc-infer bench")
    click.echo(
        f"engine-only throughput: {run.report['throughput']['engine_only_pairs_per_s']:.1f} pairs/s; "
        f"decode waits {result.decode_wait_seconds:.3f} s ({result.workers} decode workers)"
    )
    click.echo(f"predictions: {run.output}")
    if run.explainer is not None:
        _echo_explanations(run.explainer)
    if run.report_path is not None:
        click.echo(f"report: {run.report_path}")


def echo_slide_summary(job: SlideJob, predictor: Predictor, summary: dict, *, resume: bool) -> None:
    """Print the summary of a finished ``crc-infer slide`` run (the numbers of its summary.json).

    Args:
        job: The finished :class:`~crc_runtime.slide.SlideJob`.
        predictor: The predictor that ran (backend, artifact, why).
        summary: What :meth:`~crc_runtime.slide.SlideJob.write_outputs` returned.
    """
    s, t, tissue, run = summary["slide"], summary["tiles"], summary["tissue"], summary["run"]
    result = job.result
    click.echo(
        f"slide: {s['path']} ({s['vendor']}, {s['width']} x {s['height']} px, "
        f"{s['mpp_x']:g} x {s['mpp_y']:g} um/px from {s['mpp_source']})"
    )
    click.echo(
        f"tiles: {t['tile_um']:g} um every {t['stride_um']:g} um, read at level {t['read_level']} "
        f"({t['read_px'][0]} x {t['read_px'][1]} px; resample: {t['resample']}); "
        f"{tissue['tissue_tiles']} of {tissue['grid_tiles']} grid tiles hold >= "
        f"{tissue['min_tissue_fraction']:.0%} tissue, {tissue['glass_tiles_skipped']} skipped as glass"
    )
    click.echo(
        f"backend: {predictor.backend.name} on {predictor.artifact['file']} ({predictor.reason}); "
        f"radiology: {summary['radiology']['path']} paired with every tile"
    )
    resumed = f", {result.resumed} already in {job.writer.partial.name} (resumed)" if resume else ""
    click.echo(f"tiles classified: {result.processed}{resumed}")
    tp = run["throughput"]
    click.echo(
        f"throughput: {tp['end_to_end_pairs_per_s']:.1f} tiles/s end-to-end (read + resample + infer, "
        f"{tp['end_to_end_seconds']:.3f} s), {tp['engine_only_pairs_per_s']:.1f} tiles/s engine-only; "
        f"the model waited {tp['decode_wait_seconds']:.3f} s for tiles ({result.workers} reader threads)"
    )
    lat = summarize(result.batch_seconds)
    if lat["count"]:
        click.echo(f"model latency per batch: {format_latency(lat)} ({lat['count']} timed batches)")
    width = max(len(name) for name in summary["classes"])
    for name, c in summary["classes"].items():
        tiles, area, share = c["tiles"], c["area_mm2"], c["area_fraction"]
        click.echo(f"  {name:<{width}}  {tiles:>7} tiles  {area:>9.3f} mm2  {share:>6.1%}")
    tsr = summary["tumour_stroma_ratio"]
    value = "n/a (" + tsr.get("why_null", "") + ")" if tsr["value"] is None else f"{tsr['value']:.3f}"
    click.echo(f"tissue: {summary['tissue_area_mm2']:.3f} mm2; tumour-stroma ratio (stroma share): {value}")
    click.echo(f"outputs: {job.out}/ " + " ".join(summary["outputs"].values()))


def _echo_explanations(explainer: ExplainWriter) -> None:
    from .explain import IDENTITY_TOLERANCE

    click.echo(
        f"explanations: {explainer.written} overlay PNGs in {explainer.folder} "
        f"({', '.join(explainer.branches)} per pair); margin split in the predictions"
    )
    if explainer.identity_failures:
        click.echo(
            f"warning: for {len(explainer.identity_failures)} pairs the branch terms miss the logit margin "
            f"by more than {IDENTITY_TOLERANCE:g} (first: {explainer.identity_failures[0]}); see -v",
            err=True,
        )
