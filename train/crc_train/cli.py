"""`crc-train`: train the fusion model (the default command), `evaluate` a run dir, `compare` runs, `table`.

This module imports without torch: torch, torchvision and medmnist are imported inside the commands, and
``main`` first checks that the training extra is installed.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import click

from crc_train.config import (
    AMP_MODES,
    AUGMENTS,
    BACKBONES,
    DATA_SOURCES,
    FUSIONS,
    LOSSES,
    OPTIMIZERS,
    PRESETS,
    SCHEDULERS,
    SELECT_ON,
    SIZES,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from crc_train.errors import UserError


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


class UsageError(UserError):
    """A flag combination that cannot work (e.g. --resume with settings of a new run)."""


REQUIRED_MODULES = ("torch", "torchvision", "medmnist", "sklearn")
#: Ctrl-C: 128 + SIGINT, like crc-infer. Every run-dir file is written atomically, so what is there is whole.
EXIT_INTERRUPTED = 130
INTERRUPTED = (
    "interrupted: the files written so far are whole; a training run continues from its last finished "
    "epoch with crc-train --resume RUN_DIR"
)
MISSING_EXTRA = "crc-train needs the training extra: pip install 'crc-fusion[train]'"

_D, _M, _T = DataConfig(), ModelConfig(), TrainConfig()


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported here, found without importing them.

    Torch-free, so a CLI can name the missing extra before anything heavy loads (crc-export uses it too).
    A broken or blocked package, or a missing parent package (``cuda`` of ``cuda.bindings``), counts as
    missing.
    """
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train the pathology + radiology fusion classifier.

    With no command, runs `train`: `crc-train --epochs 2 ...`; see `crc-train train --help` for its options.
    """


@cli.command("train")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help="paper: the seed paper's recipe (resnet50, attention fusion, 64 px, Adam without weight decay, "
    "batch 32 x accumulation 4, 50 epochs, early stopping patience 10, ReduceLROnPlateau x0.1 after 5, "
    "CE+LDAM without label smoothing, no EMA, best checkpoint on validation loss; augmentation stays on "
    "(full): the paper does not say). Flags given explicitly override the preset.",
)
@click.option(
    "--data-source",
    type=click.Choice(DATA_SOURCES),
    default=_D.source,
    show_default=True,
    help="medmnist npz files, or synthetic ones written first (no download needed).",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with pathmnist{_S}.npz and organamnist{_S}.npz [default: ~/.medmnist].",
)
@click.option(
    "--download/--no-download",
    default=_D.download,
    show_default=True,
    help="Let medmnist download missing npz files.",
)
@click.option(
    "--size",
    type=click.Choice([str(s) for s in SIZES]),
    default=str(_D.size),
    show_default=True,
    help="Image side in pixels.",
)
@click.option(
    "--pairing-seed",
    type=int,
    default=_D.pairing_seed,
    show_default=True,
    help="Seed of the pathology -> radiology pairing permutations.",
)
@click.option("--max-train-pairs", type=int, default=None, help="Use only the first N training pairs.")
@click.option("--backbone", type=click.Choice(BACKBONES), default=_M.backbone, show_default=True)
@click.option(
    "--fusion",
    type=click.Choice(FUSIONS),
    default=_M.fusion,
    show_default=True,
    help="none = pathology-only baseline; attention = the paper's mid + late fusion.",
)
@click.option(
    "--pretrained",
    default=None,
    help="Start both branches from 'imagenet' (torchvision weights, downloaded) or a saved torchvision "
    "ResNet state dict PATH; the 3x3 stem of 28/64-px models takes the centre 3x3 of the 7x7 kernel.",
)
@click.option(
    "--freeze-epochs",
    type=int,
    default=_T.freeze_epochs,
    show_default=True,
    help="Keep both backbones frozen for the first N epochs (fusion blocks and head train).",
)
@click.option("--epochs", type=int, default=_T.epochs, show_default=True, help="At most this many epochs.")
@click.option(
    "--batch-size",
    type=int,
    default=_T.batch_size,
    show_default=True,
    help="Pairs per micro-batch and process.",
)
@click.option(
    "--accumulation-steps",
    type=int,
    default=_T.accumulation_steps,
    show_default=True,
    help="Micro-batches per optimiser step (effective batch = batch size x this x processes).",
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=_T.optimizer,
    show_default=True,
    help="adamw (decoupled weight decay) or adam (the paper's; weight decay is then L2).",
)
@click.option(
    "--lr", type=float, default=_T.lr, show_default=True, help="Peak learning rate (after the warm-up)."
)
@click.option(
    "--weight-decay",
    type=float,
    default=_T.weight_decay,
    show_default=True,
    help="Weight decay of conv kernels and weight matrices (biases, norms, gates: none).",
)
@click.option(
    "--label-smoothing",
    type=float,
    default=_T.label_smoothing,
    show_default=True,
    help="Label smoothing of the cross-entropy term (0 = off).",
)
@click.option(
    "--augment",
    type=click.Choice(AUGMENTS),
    default=_T.augment,
    show_default=True,
    help="Training augmentation: full = pathology D4 flips/rotations + H&E stain and brightness/contrast "
    "jitter, CT small intensity + affine jitter (never flipped); d4 = pathology flips/rotations only; none.",
)
@click.option(
    "--shuffle-pairs/--fixed-pairs",
    default=_T.shuffle_pairs,
    show_default=True,
    help="Re-pair the CT slices across each training batch at every step. Valid only because the pairing "
    "is synthetic: a fixed partner is a per-pair ID a fused model memorises. Validation and test keep the "
    "seeded pairs.",
)
@click.option(
    "--ema-decay",
    type=float,
    default=_T.ema_decay or 0.0,
    show_default=True,
    help="Keep an exponential moving average of the weights with this decay (e.g. 0.999); validation, "
    "checkpoint.pt and the export use it. 0 = off.",
)
@click.option(
    "--loss",
    type=click.Choice(LOSSES),
    default=_T.loss,
    show_default=True,
    help="ce, ldam (on the head's cosine logits) or ce+ldam (CE + weight x LDAM).",
)
@click.option("--ldam-max-margin", type=float, default=_T.ldam_max_margin, show_default=True)
@click.option(
    "--ldam-scale", type=float, default=_T.ldam_scale, show_default=True, help="LDAM logit scale s."
)
@click.option(
    "--ldam-weight", type=float, default=_T.ldam_weight, show_default=True, help="LDAM term weight."
)
@click.option(
    "--patience",
    type=int,
    default=None,
    help="Early stopping: stop after N epochs without a lower validation loss [default: off].",
)
@click.option(
    "--scheduler",
    type=click.Choice(SCHEDULERS),
    default=_T.scheduler,
    show_default=True,
    help="cosine: linear warm-up then cosine decay to 0, per step; plateau: ReduceLROnPlateau on the "
    "validation loss; none: constant.",
)
@click.option(
    "--warmup-epochs",
    type=float,
    default=_T.warmup_epochs,
    show_default=True,
    help="Warm-up of the cosine schedule, in epochs (fractions allowed).",
)
@click.option("--plateau-factor", type=float, default=_T.plateau_factor, show_default=True)
@click.option("--plateau-patience", type=int, default=_T.plateau_patience, show_default=True)
@click.option(
    "--select-on",
    type=click.Choice(SELECT_ON),
    default=_T.select_on,
    show_default=True,
    help="Validation number that picks checkpoint.pt.",
)
@click.option("--seed", type=int, default=_T.seed, show_default=True)
@click.option("--workers", type=int, default=_T.workers, show_default=True, help="DataLoader workers.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_T.device, show_default=True)
@click.option(
    "--amp",
    type=click.Choice(AMP_MODES),
    default=_T.amp,
    show_default=True,
    help="Mixed precision: bf16 (CPU or CUDA autocast) or fp16 (CUDA, with GradScaler).",
)
@click.option("--channels-last", is_flag=True, help="channels_last memory format (faster on tensor cores).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the training forward pass.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory [default: runs/<timestamp>-<backbone>-<fusion>].",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start a new run in a --out folder that holds a run: its run files (config.json, checkpoints, "
    "metrics, report, figures) are removed first; a folder with other files is refused.",
)
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    default=None,
    help="Continue RUN_DIR from its last.pt with its saved settings (only --epochs, --device, --workers, "
    "--log-interval and --quiet may be given with it).",
)
@click.option(
    "--log-interval", type=int, default=_T.log_interval, show_default=True, help="Steps per log line."
)
@click.option(
    "--evaluate/--no-evaluate",
    default=_T.evaluate,
    show_default=True,
    help="Evaluate the best checkpoint on the test split at the end (report.md, figures).",
)
@click.option("--quiet", is_flag=True, help="Only warnings and the final result (no progress bar).")
@click.pass_context
def train_command(ctx: click.Context, **opts) -> None:  # noqa: ANN003 - click passes every option by name
    """Train, keep the best checkpoint on validation, evaluate it on the test split.

    Multi-GPU (or multi-process CPU): torchrun --nproc-per-node N -m crc_train.cli train ...
    """
    from click.core import ParameterSource

    configure_logging(opts["quiet"])
    given = {k for k in opts if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if opts["resume"]:
        _resume(opts, given)
        return
    if opts["preset"]:
        for (_section, name), value in PRESETS[opts["preset"]].items():
            option = "size" if name == "image_size" else name
            if option not in given:
                opts[option] = str(value) if option == "size" else value
    size = int(opts["size"])
    cfg = RunConfig(
        model=ModelConfig(
            backbone=opts["backbone"], fusion=opts["fusion"], image_size=size, pretrained=opts["pretrained"]
        ),
        data=DataConfig(
            source=opts["data_source"],
            root=opts["data_root"],
            size=size,
            download=opts["download"],
            pairing_seed=opts["pairing_seed"],
            mmap=size >= 128,
            max_train_pairs=opts["max_train_pairs"],
        ),
        train=TrainConfig(
            **{f: opts[f] for f in _TRAIN_FLAGS},
            compile=opts["compile_"],
            progress=not opts["quiet"],
            ema_decay=opts["ema_decay"] or None,
        ),
    )
    cfg.validate()  # before importing torch or writing anything: bad values fail fast, naming the flag

    from crc_train.training import train

    _report(train(cfg, overwrite=opts["overwrite"]))


#: TrainConfig fields set by the flag of the same name.
_TRAIN_FLAGS = (
    "epochs", "batch_size", "lr", "weight_decay", "seed", "workers", "device", "out", "log_interval",
    "accumulation_steps", "loss", "ldam_max_margin", "ldam_scale", "ldam_weight", "patience", "scheduler",
    "plateau_factor", "plateau_patience", "select_on", "amp", "channels_last", "freeze_epochs", "evaluate",
    "optimizer", "label_smoothing", "augment", "warmup_epochs", "shuffle_pairs",
)  # fmt: skip
#: The only flags --resume accepts.
_RESUME_FLAGS = ("resume", "epochs", "device", "workers", "log_interval", "quiet", "evaluate")


def _resume(opts: dict, given: set[str]) -> None:
    """`--resume RUN_DIR`: continue a run; only the flags in _RESUME_FLAGS may come with it."""
    extra = sorted(given - set(_RESUME_FLAGS))
    if extra:
        flags = ", ".join("--" + k.rstrip("_").replace("_", "-") for k in extra)
        raise UsageError(f"--resume continues the run with its saved settings; drop {flags}")
    overrides = {
        k: opts[k] for k in ("epochs", "device", "workers", "log_interval", "evaluate") if k in given
    }
    overrides["progress"] = not opts["quiet"]

    from crc_train.training import resume

    _report(resume(opts["resume"], **overrides))


def _report(result) -> None:  # noqa: ANN001 - a training.RunResult
    m = result.metrics
    if not m:  # ranks other than 0 under torchrun print nothing
        return
    if "accuracy" not in m:  # --no-evaluate
        click.echo(
            f"val accuracy {m['val_accuracy']:.4f}  (best epoch {m['best_epoch']}; no test evaluation)"
        )
        click.echo(f"run dir: {result.run_dir}")
        return
    from crc_train.evaluation import result_line

    click.echo(f"{result_line(m)}  (best epoch {m['best_epoch']}, {m['n_test']} test pairs)")
    click.echo(f"run dir: {result.run_dir}")


@click.command("evaluate", short_help="Metrics, report.md and figures of a finished run dir.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--ablation-seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the permutation that shuffles radiology images across the test pairs.",
)
@click.option("--quiet", is_flag=True, help="Only warnings and the final result.")
def evaluate_command(run_dir: str, device: str, batch_size: int, ablation_seed: int, quiet: bool) -> None:
    """(Re)write metrics.json, report.md, test_predictions.npz and the figures of RUN_DIR."""
    configure_logging(quiet)
    from crc_train.evaluation import evaluate_run, result_line

    m = evaluate_run(run_dir, device=device, batch_size=batch_size, ablation_seed=ablation_seed)
    click.echo(
        f"{result_line(m)}  "
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

    from crc_train.compare import CompareError, compare_runs, render_compare

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


@click.command("table", short_help="One fusion table of many runs, grouped by backbone and fusion.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option(
    "--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Also write the table here."
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write the result as JSON here."
)
def table_command(runs: tuple[str, ...], markdown_path: str | None, json_path: str | None) -> None:
    """Group RUNS by backbone / image size / fusion and print one table (the paper's Table 5).

    \b
    crc-train table runs/none-s0 runs/none-s1 runs/attention-s0 runs/attention-s1 --markdown table.md

    Per group: accuracy and macro-F1 mean +- sd over seeds with 95 % CIs, the accuracy with radiology
    shuffled, and McNemar's test against the fusion-none group of the same backbone, run paired with run by
    training seed.
    """
    import json

    from crc_train.table import fusion_table, render_table

    result = fusion_table(list(runs))
    text = render_table(result)
    click.echo(text)
    if markdown_path:
        Path(markdown_path).write_text(text, encoding="utf-8")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


cli.add_command(evaluate_command)
cli.add_command(compare_command)
cli.add_command(table_command)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns (and exits with) the process status."""
    missing = missing_modules(REQUIRED_MODULES)
    if missing:
        click.echo(MISSING_EXTRA, err=True)
        sys.exit(1)

    try:
        code = cli.main(args=argv, prog_name="crc-train", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
        click.echo(INTERRUPTED, err=True)
        code = EXIT_INTERRUPTED
    except click.ClickException as exc:  # unknown flag, bad choice: one line, like every user error
        click.echo(f"error: {exc.format_message()}", err=True)
        code = 1
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    code = code if isinstance(code, int) else 0
    sys.exit(code)


if __name__ == "__main__":
    main()
