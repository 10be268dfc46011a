"""The training run: read ``train`` top to bottom.

load data -> stats -> model (+ pretrained weights) -> loss, optimiser and schedule (optim.py), EMA
(ema.py), augmentation (augment.py), GradScaler -> [resume from last.pt] -> run dir, config.json (nothing
is written before: a refused run leaves no trace) -> for each epoch: (un)freeze backbones,
``train_one_epoch``, ``evaluate`` (val, on the EMA weights when on), plateau step, keep the best
checkpoint, early stopping, metrics.csv + training_curves.png + last.pt ->
evaluate the best checkpoint on the test split (``evaluation.evaluate_run``: metrics.json, report.md,
test_predictions.npz, figures).

Run dir files written here (through rundir.py, each atomically): config.json, checkpoint.pt (best
epoch), last.pt (resume state, every epoch), metrics.csv (one row per epoch), training_curves.png.

One epoch (``train_one_epoch``): augmentation of each batch on the device, gradient accumulation, AMP,
DDP's ``no_sync``, the per-step schedule and EMA update, a progress bar and the fixed-format log line.
``TrainForward`` is what DistributedDataParallel and ``torch.compile`` wrap: a forward pass that returns
the raw logits and, when the loss needs them, the head's cosine logits (losses.py), so every parameter
use happens inside the wrapped forward and DDP sees all gradients.

Several processes (``torchrun --nproc-per-node N -m crc_train.cli train ...``): torchrun sets RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and ``init_from_env`` reads them. Backend: NCCL on
CUDA, gloo on the CPU. Every rank trains on its DistributedSampler shard with the per-process
``--batch-size``; validation numbers are summed over the ranks with ``all_reduce`` so every rank takes the
same early-stopping and scheduler decisions; only rank 0 writes files. Without those variables (or
WORLD_SIZE=1) the distributed helpers are no-ops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from crc_train.augment import Augment
from crc_train.config import RunConfig, TrainConfig
from crc_train.data import PairedDataset, channel_stats, load_split
from crc_train.ema import ModelEma
from crc_train.errors import CheckpointError, ConfigError, DivergedError, first_line
from crc_train.losses import TrainLoss, cosine_logits
from crc_train.model import build_model, load_pretrained, set_backbones_trainable, source_state_dict
from crc_train.optim import build_optimizer, build_scheduler
from crc_train.plots import CURVES_PNG, plot_training_curves
from crc_train.rundir import (
    FORMAT_VERSION,
    Progress,
    RunDirError,
    capture_rng,
    check_optimizer_state,
    check_run_dir,
    check_state_dict,
    clear_run_dir,
    default_run_dir,
    load_last,
    restore_rng,
    save_checkpoint,
    save_last,
    write_json,
    write_metrics_csv,
)

__all__ = [
    "DistContext",
    "RunResult",
    "TrainForward",
    "all_reduce_sums",
    "autocast",
    "barrier",
    "broadcast_object",
    "evaluate",
    "gather_objects",
    "init_from_env",
    "make_loader",
    "resolve_device",
    "resume",
    "seed_everything",
    "train",
    "train_one_epoch",
    "wrap_forward",
]


log = logging.getLogger(__name__)

#: Settings ``--resume`` may change; everything else comes from the interrupted run.
RESUMABLE_OVERRIDES = ("epochs", "device", "workers", "progress", "log_interval", "evaluate")


@dataclass
class RunResult:
    """What a finished run produced."""

    #: the run directory.
    run_dir: Path
    #: the content of metrics.json (empty on ranks other than 0).
    metrics: dict[str, Any]
    #: the trained model (last epoch's weights, not the best checkpoint's), for callers and tests.
    model: torch.nn.Module | None = None


def resume(run_dir: str | Path, **overrides: Any) -> RunResult:
    """Continue the run in ``run_dir`` from its last.pt (see rundir.py).

    Args:
        run_dir: a run directory written by ``train``.
        overrides: new values for the TrainConfig fields in ``RESUMABLE_OVERRIDES`` (e.g. more epochs).

    Raises:
        CheckpointError: no usable last.pt. ConfigError: an override that cannot change.
    """
    state = load_last(run_dir)
    cfg = RunConfig.from_dict(state["config"])
    bad = sorted(set(overrides) - set(RESUMABLE_OVERRIDES))
    if bad:
        raise ConfigError(f"--resume keeps the run's settings; cannot change {', '.join(bad)}")
    cfg.train = replace(cfg.train, out=str(run_dir), **overrides)
    return train(cfg, resume_state=state)


def train(
    cfg: RunConfig, resume_state: dict[str, Any] | None = None, *, overwrite: bool = False
) -> RunResult:
    """Train, keep the best checkpoint on validation, evaluate it on the test split.

    Args:
        cfg: the run configuration.
        resume_state: a loaded last.pt (``resume`` passes it); None starts a new run.
        overwrite: a new run may replace the run in a non-empty ``cfg.train.out`` (its ``RUN_FILES`` are
            removed once the data has loaded); without it a non-empty folder is refused.

    Raises:
        ConfigError: an invalid configuration (user error).
        DataError: the data cannot be loaded (user error).
        RunDirError: ``out`` holds a run (without ``overwrite``) or files crc-train did not write.
        CheckpointError: ``resume_state`` does not fit the model, optimiser or number of processes.
        DivergedError: the loss became NaN or infinite; the run dir keeps the last finished epoch.
    """
    cfg.validate()
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    if tcfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"--amp fp16 needs a CUDA device, and this run is on {device}; use --amp bf16 or off"
        )
    ctx = init_from_env(device)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    if not ctx.is_main:
        logging.getLogger("crc_train").setLevel(logging.WARNING)
    if resume_state is not None and len(resume_state["rng"]) != ctx.world_size:
        n_saved = len(resume_state["rng"])
        raise ConfigError(f"resume with the run's {n_saved} process(es), not {ctx.world_size}")
    if resume_state is None and tcfg.out:
        check_run_dir(tcfg.out, overwrite)  # every rank, before any writes; rank 0 checks again below
        barrier(ctx)
    pretrained = cfg.model.pretrained if resume_state is None else None
    # read (or download) the weights before anything is written: a failure leaves no run dir behind
    pretrained_state = source_state_dict(pretrained, cfg.model.backbone) if pretrained else None

    # ---- data (before the run dir exists, so a data error leaves nothing behind; so do the model's below)
    splits = {name: load_split(cfg.data, name) for name in ("train", "val")}
    classes = splits["train"].classes
    if cfg.model.num_classes != len(classes):
        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes}; the data has {len(classes)} classes"
        )
    normalization = channel_stats(splits["train"])
    train_set, val_set = PairedDataset(splits["train"]), PairedDataset(splits["val"])
    sampler = None
    if ctx.enabled:
        sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=tcfg.seed)
        val_set = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))  # no padding duplicates
    train_loader = make_loader(train_set, tcfg, device, sampler=sampler, shuffle=True)
    val_loader = make_loader(val_set, tcfg, device)

    # ---- model, loss, optimiser, schedule
    seed_everything(tcfg.seed)
    model = build_model(cfg.model, normalization)
    if pretrained:
        load_pretrained(model, pretrained, cfg.model.backbone, pretrained_state)
    model = model.to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    seed_everything(tcfg.seed + ctx.rank)  # dropout masks differ between ranks; rank 0 as single-process
    counts = np.bincount(splits["train"].labels, minlength=cfg.model.num_classes)
    loss_fn = TrainLoss(
        tcfg.loss, counts, tcfg.ldam_max_margin, tcfg.ldam_scale, tcfg.ldam_weight, tcfg.label_smoothing
    ).to(device)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, len(train_loader))
    per_step_scheduler = scheduler if tcfg.scheduler == "cosine" else None
    scaler = torch.amp.GradScaler(device.type) if tcfg.amp == "fp16" else None
    augment = Augment(tcfg.augment, tcfg.shuffle_pairs)
    ema = ModelEma(model, tcfg.ema_decay) if tcfg.ema_decay is not None else None
    progress, rows, start_epoch = Progress(), [], 1
    if resume_state is not None:
        where = Path(tcfg.out) / "last.pt"
        _restore(resume_state, model, ema, optimizer, scheduler, scaler, train_loader, ctx, where)
        progress = Progress(**resume_state["progress"])
        rows, start_epoch = list(resume_state["rows"]), int(resume_state["epoch"]) + 1
        log.info("resuming after epoch %d (best epoch %d)", start_epoch - 1, progress.best_epoch)

    # ---- run dir (rank 0 decides, every rank learns it), once everything it will hold is ready
    run_dir, run_id = None, None
    if ctx.is_main:
        run_dir = Path(tcfg.out) if tcfg.out else default_run_dir(cfg)
        _make_run_dir(run_dir, new=resume_state is None, overwrite=overwrite)
        run_id = resume_state["run_id"] if resume_state else f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
    run_dir, run_id = broadcast_object(ctx, (run_dir, run_id))
    tcfg.out = str(run_dir)
    config_dict = {**cfg.to_dict(), "run_id": run_id}
    if ctx.is_main:
        write_json(run_dir / "config.json", config_dict)
    log.info("run %s in %s on %s, %d process(es)", run_id, run_dir, device, ctx.world_size)
    log.info(
        "%s/%s, loss %s, %s, %s schedule, augment %s%s, EMA %s",
        cfg.model.backbone,
        cfg.model.fusion,
        tcfg.loss,
        tcfg.optimizer,
        tcfg.scheduler,
        tcfg.augment,
        " + pairs shuffled per step" if tcfg.shuffle_pairs else "",
        tcfg.ema_decay if ema is not None else "off",
    )
    log.info(
        "%.2fM parameters, %d train / %d val pairs, %d x %d pairs per step",
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(splits["train"]),
        len(splits["val"]),
        tcfg.batch_size * ctx.world_size,
        tcfg.accumulation_steps,
    )

    # ---- epochs
    fwd, forward, frozen = TrainForward(model, loss_fn.needs_cosine), None, None
    for epoch in range(start_epoch, tcfg.epochs + 1):
        if progress.stopped:
            break
        if frozen is not (epoch <= tcfg.freeze_epochs) or forward is None:
            frozen = epoch <= tcfg.freeze_epochs
            set_backbones_trainable(model, not frozen)
            forward = wrap_forward(fwd, tcfg, ctx, device)
            if frozen:
                log.info("epoch %d: backbones frozen (until epoch %d)", epoch, tcfg.freeze_epochs)
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(
            forward, train_loader, optimizer, loss_fn, device, epoch,
            accumulation_steps=tcfg.accumulation_steps, amp=tcfg.amp, scaler=scaler, ctx=ctx,
            log_interval=tcfg.log_interval, progress=tcfg.progress, augment=augment, ema=ema,
            scheduler=per_step_scheduler,
        )  # fmt: skip
        val = evaluate(ema.module if ema is not None else model, val_loader, device, amp=tcfg.amp, ctx=ctx)
        if not math.isfinite(val["loss"]):
            raise DivergedError(
                f"the validation loss became {val['loss']} at epoch {epoch}: {_DIVERGED_HINT.format(lr=lr)}"
            )
        if tcfg.scheduler == "plateau":  # stepped per epoch on the validation loss; cosine per step
            scheduler.step(val["loss"])
        rows.append(
            {
                "epoch": epoch,
                "train_loss": f"{train_loss:.6f}",
                "train_acc": f"{train_acc:.6f}",
                "val_loss": f"{val['loss']:.6f}",
                "val_acc": f"{val['acc']:.6f}",
                "lr": f"{lr:.6g}",
                "seconds": f"{time.perf_counter() - t0:.2f}",
            }
        )
        if tcfg.select_on == "val_loss":
            improved = val["loss"] < progress.best_loss
        else:
            improved = val["acc"] > progress.best_acc or (
                val["acc"] == progress.best_acc and val["loss"] < progress.best_loss
            )
        if improved:
            progress.best_acc, progress.best_loss, progress.best_epoch = val["acc"], val["loss"], epoch
        if val["loss"] < progress.es_best_loss:
            progress.es_best_loss, progress.bad_epochs = val["loss"], 0
        else:
            progress.bad_epochs += 1
        progress.stopped = tcfg.patience is not None and progress.bad_epochs >= tcfg.patience
        log.info(
            "epoch %3d done train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f lr %.2e %s",
            epoch, train_loss, train_acc, val["loss"], val["acc"], lr, "(best)" if improved else "",
        )  # fmt: skip
        rng = gather_objects(ctx, capture_rng(train_loader.generator))
        if ctx.is_main:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            ema_state = ema.state_dict() if ema is not None else None
            if improved:
                save_checkpoint(
                    run_dir / "checkpoint.pt",
                    {
                        "format_version": FORMAT_VERSION,
                        "model_config": config_dict["model"],
                        # with EMA on, the averaged weights are the model (validated, tested, exported)
                        "state_dict": ema_state["state_dict"] if ema_state is not None else weights,
                        "classes": list(classes),
                        "image_size": cfg.model.image_size,
                        "normalization": normalization,
                        "config": config_dict,
                        "epoch": epoch,
                        "best_val_metric": progress.best_acc,
                        "run_id": run_id,
                    },
                )
            write_metrics_csv(run_dir / "metrics.csv", rows)
            title = (
                f"{cfg.model.backbone} / fusion {cfg.model.fusion} / loss {tcfg.loss} / "
                f"augment {tcfg.augment}"
            )
            plot_training_curves(rows, run_dir / CURVES_PNG, title, mark_lr_drops=tcfg.scheduler == "plateau")
            save_last(
                run_dir / "last.pt",
                {
                    "config": config_dict,
                    "run_id": run_id,
                    "epoch": epoch,
                    "state_dict": weights,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": ema_state,
                    "progress": progress.to_dict(),
                    "rows": rows,
                    "rng": rng,
                },
            )
        if progress.stopped:
            log.info("early stopping: validation loss flat for %d epochs", tcfg.patience)

    # ---- test the best checkpoint (rank 0), the others wait
    metrics: dict[str, Any] = {}
    if ctx.is_main:
        metrics = _finish(run_dir, device, progress, rows, classes, run_id, tcfg)
    barrier(ctx)
    shutdown(ctx)
    return RunResult(run_dir=run_dir, metrics=metrics, model=model)


_DIVERGED_HINT = (
    "training stopped (lr {lr:.3g}); the run dir keeps the files of the last finished epoch. "
    "Start again with a lower --lr (or --amp off)"
)


def _make_run_dir(run_dir: Path, new: bool, overwrite: bool) -> None:
    """Create the run dir; for a new run, check it again and (``overwrite``) clear the old run's files."""
    if new:
        check_run_dir(run_dir, overwrite)
        removed = clear_run_dir(run_dir) if overwrite else []
        if removed:
            log.info("--overwrite: removed %s from %s", ", ".join(removed), run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the run dir {run_dir}: {exc.strerror or exc}") from None


def _restore(
    state: dict[str, Any],
    model: nn.Module,
    ema: ModelEma | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    train_loader: DataLoader,
    ctx: DistContext,
    where: Path,
) -> None:
    """Load a checked last.pt (``rundir.check_last``) into the model, optimiser, schedule and RNGs.

    What only these objects can tell (tensor names and shapes, the optimiser's groups) is checked here;
    any mismatch is a CheckpointError naming last.pt, not a traceback.
    """
    check_state_dict(model, state["state_dict"], where)
    model.load_state_dict(state["state_dict"])
    if ema is not None:  # check_last checked its fields
        check_state_dict(ema.module, state["ema"]["state_dict"], f"{where} (ema)")
        ema.load_state_dict(state["ema"])
    # the optimiser numbers parameters in the order of its groups (AdamW: decayed, then not decayed)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    check_optimizer_state(state["optimizer"], grouped, where)
    parts = [("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)]
    for name, target in parts:
        if target is None or (name == "scaler" and not state.get("scaler")):
            continue
        try:
            target.load_state_dict(state[name])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"{where}: {name} state does not fit this run: {first_line(exc)}") from None
    try:
        restore_rng(state["rng"][ctx.rank], train_loader.generator)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{where}: rng[{ctx.rank}] is not a usable RNG state ({exc})") from None


def _finish(
    run_dir: Path,
    device: torch.device,
    progress: Progress,
    rows: list[dict[str, Any]],
    classes: list[str],
    run_id: str,
    tcfg: TrainConfig,
) -> dict[str, Any]:
    """Write the training half of metrics.json, then evaluate the best checkpoint on the test split."""
    from crc_train.evaluation import evaluate_run, result_line

    write_json(
        run_dir / "metrics.json",
        {
            "best_epoch": progress.best_epoch,
            "val_accuracy": progress.best_acc,
            "val_loss": progress.best_loss,
            "epochs_run": len(rows),
            "early_stopped": progress.stopped,
            "selected_on": tcfg.select_on,
            "train_loss_kind": tcfg.loss,
            "classes": list(classes),
            "run_id": run_id,
        },
    )
    if not tcfg.evaluate:
        log.info("no test evaluation (evaluate=False): crc-train evaluate %s writes it", run_dir)
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    metrics = evaluate_run(run_dir, device=device.type, batch_size=max(tcfg.batch_size, 64))
    log.info("%s (best epoch %d)", result_line(metrics), progress.best_epoch)
    return metrics


class TrainForward(nn.Module):
    """(raw logits, cosine logits or None) of a FusionNet; ``net`` is the model itself, not a copy."""

    def __init__(self, net: nn.Module, with_cosine: bool) -> None:
        super().__init__()
        self.net = net
        self.with_cosine = with_cosine

    def forward(
        self, pathology: torch.Tensor, radiology: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [N, C] and, with ``with_cosine``, cosine logits [N, C] of the same dropped-out embedding."""
        dropout, linear = self.net.head[0], self.net.head[1]
        h = dropout(self.net.forward_features(pathology, radiology))
        logits = linear(h)
        return logits, cosine_logits(h, linear.weight) if self.with_cosine else None


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for "bf16" / "fp16", a null context for "off"."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _bar(loader: DataLoader, epoch: int, show: bool):  # noqa: ANN202 - tqdm or a plain iterator
    if not show or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=len(loader), desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True)


def train_one_epoch(
    forward: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: TrainLoss,
    device: torch.device,
    epoch: int,
    *,
    accumulation_steps: int = 1,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
    ctx: DistContext | None = None,
    log_interval: int = 50,
    progress: bool = False,
    augment: Augment | None = None,
    ema: ModelEma | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) over the pairs of every rank.

    Each micro-batch is moved to ``device``, then augmented there (``augment``, uint8 in and out) before the
    forward pass. Gradients of ``accumulation_steps`` micro-batches (each loss divided by that number) are
    summed before one optimiser step; a last, shorter group at the end of the epoch still steps. After each
    optimiser step ``scheduler`` (a per-step schedule) steps and ``ema`` takes the new weights. Under DDP
    the gradient all-reduce runs only on the micro-batch that steps (``no_sync`` on the others). The
    reported accuracy is on the augmented batches.
    """
    ctx = ctx or DistContext()
    forward.train()
    bar = _bar(loader, epoch, progress and ctx.is_main)
    if bar is not None:  # log lines go above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm(loggers=[logging.getLogger("crc_train")])
    else:
        redirect = contextlib.nullcontext()
    try:
        with redirect:
            total_loss, correct, seen = _epoch_steps(
                forward, loader, optimizer, loss_fn, device, epoch, accumulation_steps, amp, scaler, ctx,
                log_interval, bar, augment, ema, scheduler,
            )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    total_loss, correct, seen = all_reduce_sums(ctx, [total_loss, correct, seen], device)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _epoch_steps(
    forward,
    loader,
    optimizer,
    loss_fn,
    device,
    epoch,
    accumulation_steps,
    amp,
    scaler,
    ctx,
    log_interval,
    bar,
    augment,
    ema,
    scheduler,
) -> tuple[float, int, int]:  # noqa: ANN001 - the arguments of train_one_epoch
    total_loss, correct, seen = 0.0, 0, 0
    t0, window_pairs = time.perf_counter(), 0
    n_batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
    for i, (pathology, radiology, labels) in enumerate(loader, start=1):
        pathology = pathology.to(device, non_blocking=True)
        radiology = radiology.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if augment is not None:
            pathology, radiology = augment(pathology, radiology)
        steps_now = i % accumulation_steps == 0 or i == n_batches
        sync = contextlib.nullcontext() if steps_now or not hasattr(forward, "no_sync") else forward.no_sync()
        with sync:
            with autocast(device, amp):
                logits, cosine = forward(pathology, radiology)
            loss = loss_fn(logits, cosine, labels)
            scaled = loss / accumulation_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if steps_now:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update()

        n = labels.shape[0]
        loss_value = loss.item()  # syncs once per micro-batch; cheap next to the step itself
        if not math.isfinite(loss_value):  # every later step would be NaN too: stop before it is saved
            lr = optimizer.param_groups[0]["lr"]
            raise DivergedError(
                f"the training loss became {loss_value} at epoch {epoch}, step {i}: "
                + _DIVERGED_HINT.format(lr=lr)
            )
        total_loss += loss_value * n
        batch_correct = int((logits.detach().argmax(1) == labels).sum())
        correct += batch_correct
        seen += n
        window_pairs += n
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        if i % log_interval == 0 or i == n_batches:
            elapsed = time.perf_counter() - t0
            log.info(
                "epoch %3d step %5d loss %.4f pairs/s %8.1f lr %.2e",
                epoch,
                i,
                loss_value,
                window_pairs * ctx.world_size / max(elapsed, 1e-9),
                optimizer.param_groups[0]["lr"],
            )
            t0, window_pairs = time.perf_counter(), 0
    return total_loss, correct, seen


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    amp: str = "off",
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Cross-entropy loss and accuracy over ``loader`` (this rank's shard, summed over all ranks).

    Returns:
        ``{"loss", "acc", "n"}`` plus, single-process only, ``"labels"``, ``"preds"``, ``"probs"`` arrays.
    """
    ctx = ctx or DistContext()
    model.eval()
    total_loss, labels_all, probs_all = 0.0, [], []
    for pathology, radiology, labels in loader:
        with autocast(device, amp):
            logits = model(pathology.to(device), radiology.to(device))
        logits = logits.float()
        labels = labels.to(device)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        labels_all.append(labels.cpu())
        probs_all.append(torch.softmax(logits, dim=1).cpu())
    labels_np = torch.cat(labels_all).numpy().astype(np.int64) if labels_all else np.zeros(0, np.int64)
    probs = torch.cat(probs_all).numpy().astype(np.float32) if probs_all else np.zeros((0, 0), np.float32)
    preds = probs.argmax(1).astype(np.int64) if len(probs) else labels_np
    correct = float((preds == labels_np).sum())
    total_loss, correct, n = all_reduce_sums(ctx, [total_loss, correct, float(len(labels_np))], device)
    out: dict[str, Any] = {"loss": total_loss / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}
    if not ctx.enabled:
        out.update(labels=labels_np, preds=preds, probs=probs)
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # DataLoader workers get torch seeds from the loader's generator; derive numpy/python ones from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def make_loader(
    dataset: Dataset,
    tcfg: TrainConfig,
    device: torch.device,
    sampler: Sampler | None = None,
    shuffle: bool = False,
) -> DataLoader:
    """A DataLoader with its own generator seeded from ``tcfg.seed`` (its state goes into last.pt)."""
    generator = torch.Generator()
    generator.manual_seed(tcfg.seed)
    return DataLoader(
        dataset,
        batch_size=tcfg.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=tcfg.workers,
        worker_init_fn=_seed_worker,
        generator=generator,
        pin_memory=device.type == "cuda",
    )


def wrap_forward(
    fwd: torch.nn.Module, tcfg: TrainConfig, ctx: DistContext, device: torch.device
) -> torch.nn.Module:
    """DDP around the forward (built anew when the set of trainable parameters changes), then compile."""
    wrapped = fwd
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # A 1x1 conv fed channels_last activations gets a gradient whose size-1 dims carry other strides
        # than the parameter; DDP warns once ("Grad strides do not match bucket view strides") and copies.
        wrapped = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if tcfg.compile else wrapped


@dataclass
class DistContext:
    """Where this process stands in the job."""

    #: global rank (0 in a single-process run).
    rank: int = 0
    #: number of processes.
    world_size: int = 1
    #: rank on this machine (picks the GPU).
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and logs progress."""
        return self.rank == 0


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group described by torchrun's environment variables (no-op without them).

    Args:
        device: the device type picks the backend (nccl for cuda, gloo otherwise); for cuda the process
            uses GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined (%s)", ctx.rank, world, backend)
    return ctx


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after the last collective)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sums(ctx: DistContext, values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` element-wise over all ranks (float64, so counts stay exact)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run dir and run id)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (on every rank; small objects only, e.g. RNG states)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank."""
    if ctx.enabled:
        dist.barrier()
