"""The training run: read it top to bottom.

load data -> stats -> model (+ pretrained weights) -> loss, Adam, ReduceLROnPlateau, GradScaler ->
[resume from last.pt] -> for each epoch: (un)freeze backbones, train_one_epoch (engine.py), evaluate(val),
scheduler step, keep the best checkpoint, early stopping, metrics.csv + training_curves.png + last.pt ->
evaluate the best checkpoint on the test split (``evaluation.evaluate_run``: metrics.json, report.md,
test_predictions.npz, figures).

Run dir files written here: config.json, checkpoint.pt (best epoch), last.pt (resume state, every epoch),
metrics.csv (one row per epoch), training_curves.png. Every file is written atomically (temp + rename).
Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Subset

from crc_train import distributed as dist_utils
from crc_train.checkpoint import FORMAT_VERSION, save_checkpoint
from crc_train.config import RunConfig, TrainConfig
from crc_train.curves import CURVES_PNG, plot_training_curves
from crc_train.data import PairedDataset, channel_stats, load_split
from crc_train.engine import TrainForward, evaluate, train_one_epoch
from crc_train.errors import ConfigError
from crc_train.launch import make_loader, resolve_device, seed_everything, wrap_forward
from crc_train.losses import TrainLoss
from crc_train.model import build_model
from crc_train.pretrained import load_pretrained, set_backbones_trainable, source_state_dict
from crc_train.resume import Progress, capture_rng, load_last, restore_rng, save_last
from crc_train.rundir import default_run_dir, write_json, write_metrics_csv

__all__ = ["RunResult", "evaluate", "resolve_device", "resume", "seed_everything", "train", "train_one_epoch"]

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
    """Continue the run in ``run_dir`` from its last.pt (see resume.py).

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


def train(cfg: RunConfig, resume_state: dict[str, Any] | None = None) -> RunResult:
    """Train, keep the best checkpoint on validation, evaluate it on the test split.

    Args:
        cfg: the run configuration.
        resume_state: a loaded last.pt (``resume`` passes it); None starts a new run.

    Raises:
        ConfigError: an invalid configuration (user error).
        DataError: the data cannot be loaded (user error).
    """
    cfg.validate()
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    if tcfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"--amp fp16 needs a CUDA device, and this run is on {device}; use --amp bf16 or off"
        )
    ctx = dist_utils.init_from_env(device)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    if not ctx.is_main:
        logging.getLogger("crc_train").setLevel(logging.WARNING)
    pretrained = cfg.model.pretrained if resume_state is None else None
    # read (or download) the weights before anything is written: a failure leaves no run dir behind
    pretrained_state = source_state_dict(pretrained, cfg.model.backbone) if pretrained else None

    # ---- data (before the run dir exists, so a data error leaves nothing behind)
    splits = {name: load_split(cfg.data, name) for name in ("train", "val")}
    classes = splits["train"].classes
    normalization = channel_stats(splits["train"])
    train_set, val_set = PairedDataset(splits["train"]), PairedDataset(splits["val"])
    sampler = None
    if ctx.enabled:
        sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=tcfg.seed)
        val_set = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))  # no padding duplicates
    train_loader = make_loader(train_set, tcfg, device, sampler=sampler, shuffle=True)
    val_loader = make_loader(val_set, tcfg, device)

    # ---- run dir (rank 0 decides, every rank learns it)
    run_dir, run_id = None, None
    if ctx.is_main:
        run_dir = Path(tcfg.out) if tcfg.out else default_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = resume_state["run_id"] if resume_state else f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
    run_dir, run_id = dist_utils.broadcast_object(ctx, (run_dir, run_id))
    tcfg.out = str(run_dir)
    config_dict = {**cfg.to_dict(), "run_id": run_id}
    if ctx.is_main:
        write_json(run_dir / "config.json", config_dict)
    log.info("run %s in %s on %s, %d process(es)", run_id, run_dir, device, ctx.world_size)

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
    loss_fn = TrainLoss(tcfg.loss, counts, tcfg.ldam_max_margin, tcfg.ldam_scale, tcfg.ldam_weight).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = None
    if tcfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=tcfg.plateau_factor, patience=tcfg.plateau_patience
        )
    scaler = torch.amp.GradScaler(device.type) if tcfg.amp == "fp16" else None
    progress, rows, start_epoch = Progress(), [], 1
    if resume_state is not None:
        model.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        progress = Progress(**resume_state["progress"])
        rows, start_epoch = list(resume_state["rows"]), int(resume_state["epoch"]) + 1
        if len(resume_state["rng"]) != ctx.world_size:
            n_saved = len(resume_state["rng"])
            raise ConfigError(f"resume with the run's {n_saved} process(es), not {ctx.world_size}")
        restore_rng(resume_state["rng"][ctx.rank], train_loader.generator)
        log.info("resuming after epoch %d (best epoch %d)", start_epoch - 1, progress.best_epoch)
    log.info(
        "%s/%s, loss %s: %.2fM parameters, %d train / %d val pairs, %d x %d pairs per step",
        cfg.model.backbone,
        cfg.model.fusion,
        tcfg.loss,
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
            log_interval=tcfg.log_interval, progress=tcfg.progress,
        )  # fmt: skip
        val = evaluate(model, val_loader, device, amp=tcfg.amp, ctx=ctx)
        if scheduler is not None:
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
        rng = dist_utils.gather_objects(ctx, capture_rng(train_loader.generator))
        if ctx.is_main:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            if improved:
                save_checkpoint(
                    run_dir / "checkpoint.pt",
                    {
                        "format_version": FORMAT_VERSION,
                        "model_config": config_dict["model"],
                        "state_dict": weights,
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
            title = f"{cfg.model.backbone} / fusion {cfg.model.fusion} / loss {tcfg.loss}"
            plot_training_curves(rows, run_dir / CURVES_PNG, title)
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
    dist_utils.barrier(ctx)
    dist_utils.shutdown(ctx)
    return RunResult(run_dir=run_dir, metrics=metrics, model=model)


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
    from crc_train.evaluation import evaluate_run

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
    log.info(
        "test accuracy %.4f macro-F1 %.4f (best epoch %d)",
        metrics["accuracy"],
        metrics["macro_f1"],
        progress.best_epoch,
    )
    return metrics
