"""What ``crc-infer FOLDER`` prints when a run is done: pairs, skips, accuracy, throughput, latency."""

from __future__ import annotations

from collections import Counter

import click

from .errors import printable
from .timing import format_latency, format_latency_table, summarize, throughput


def echo_run_summary(
    result,
    selection,
    pairset,
    writer,
    run_report: dict,
    *,
    load_s: float,
    batch_size: int,
    resume: bool,
    output,
    report,
) -> None:
    """Print the summary of a finished folder run (the same numbers as the JSON report).

    Args:
        result: The :class:`~crc_runtime.predict.InferenceResult`.
        selection: The :class:`~crc_runtime.backends.Selection` that ran (backend, artifact, reason).
        pairset: The :class:`~crc_runtime.pairs.PairSet` that was run.
        writer: The :class:`~crc_runtime.predictions.PredictionWriter` (rows a resumed run kept).
        run_report: :func:`~crc_runtime.timing.folder_run_report` of this run.
    """
    backend, artifact = selection.backend, selection.artifact
    n = result.processed
    click.echo(f"backend: {backend.name} on {artifact['file']} ({selection.reason})")
    resumed = f", {result.resumed} already in {writer.partial.name} (resumed)" if resume else ""
    click.echo(f"pairs: {n} processed{resumed}, {len(result.skipped)} skipped (from {pairset.source})")
    for skip in result.skipped:
        click.echo(printable(f"  skipped {skip.item}: {skip.reason}"))
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
    warm = (
        f"the first batch ({result.warmup_pairs} pairs, {result.warmup_seconds * 1e3:.1f} ms) was the "
        "warm-up: its predictions are kept, its time is not in the latency figures"
    )
    if lat["count"]:
        # Per pair from the report, which divides each batch's time by the pairs it really held (the
        # last batch is usually short), not by --batch-size.
        pair_p50 = run_report["latency"]["per_pair"]["median_ms"]
        click.echo(
            f"model latency per batch: {format_latency(lat)}; {pair_p50:.3f} ms per pair at p50 "
            f"({backend.name} {backend.version}, {artifact['file']}, device {backend.device}, "
            f"batch size {batch_size}, {lat['count']} timed batches; {warm})"
        )
        click.echo(format_latency_table(run_report["latency"]))
    elif result.warmup_pairs:
        click.echo(
            f"model latency: no timed batch ({backend.name} {backend.version}, {artifact['file']}, "
            f"device {backend.device}; {warm}); for latency use crc-infer bench"
        )
    click.echo(
        f"engine-only throughput: {run_report['throughput']['engine_only_pairs_per_s']:.1f} pairs/s; "
        f"decode waits {result.decode_wait_seconds:.3f} s ({result.workers} decode workers)"
    )
    click.echo(f"predictions: {output}")
    if report is not None:
        click.echo(f"report: {report}")
