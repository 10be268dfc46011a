"""`crc-train evaluate` and `crc-train compare`: the commands that read finished run directories."""

from __future__ import annotations

from pathlib import Path

import click

from crc_train.cli_common import configure_logging


@click.command("evaluate", short_help="Metrics, report.md and figures of a finished run dir.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--ablation-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the permutation that shuffles radiology images across the test pairs.",
)
@click.option("--quiet", is_flag=True, help="Only warnings and the final result.")
def evaluate_command(run_dir: str, device: str, batch_size: int, ablation_seed: int, quiet: bool) -> None:
    """(Re)write metrics.json, report.md, test_predictions.npz and the figures of RUN_DIR."""
    configure_logging(quiet)
    from crc_train.evaluation import evaluate_run

    m = evaluate_run(run_dir, device=device, batch_size=batch_size, ablation_seed=ablation_seed)
    click.echo(
        f"test accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
        f"ROC AUC ovr {m['roc_auc_ovr'] if m['roc_auc_ovr'] is None else round(m['roc_auc_ovr'], 4)}  "
        f"radiology shuffled {m['ablation_accuracy']:.4f}  ({m['n_test']} test pairs)"
    )
    click.echo(f"report: {run_dir}/report.md")


@click.command(
    "compare",
    context_settings={"ignore_unknown_options": True},
    short_help="McNemar's test between runs on their paired test predictions.",
)
@click.argument("runs", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Also write the report here."
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write the result as JSON here."
)
def compare_command(runs: tuple[str, ...], markdown_path: str | None, json_path: str | None) -> None:
    """Compare run(s) A against run(s) B on the same test pairs.

    \b
    crc-train compare RUN_A RUN_B
    crc-train compare RUN_A1 RUN_A2 RUN_A3 --vs RUN_B1 RUN_B2 RUN_B3

    McNemar's test (exact binomial when the discordant count is below 25, else chi-square with
    continuity correction) per seed pair A_i vs B_i, or on the first pair when the sides differ in
    size; mean +- sd of accuracy and macro-F1 per side.
    """
    import json

    from crc_train.compare import CompareError, compare_runs
    from crc_train.report import render_compare

    args = list(runs)
    bad = [a for a in args if a.startswith("-") and a != "--vs"]
    if bad:
        raise click.UsageError(f"no such option: {bad[0]}")
    if args.count("--vs") > 1:
        raise CompareError("--vs may appear once: crc-train compare RUN_A... --vs RUN_B...")
    if "--vs" in args:
        i = args.index("--vs")
        side_a, side_b = args[:i], args[i + 1 :]
    elif len(args) == 2:
        side_a, side_b = args[:1], args[1:]
    else:
        raise CompareError("give two runs, or RUN_A... --vs RUN_B... for several seeds per side")
    result = compare_runs(side_a, side_b)
    text = render_compare(result)
    click.echo(text)
    if markdown_path:
        Path(markdown_path).write_text(text, encoding="utf-8")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
