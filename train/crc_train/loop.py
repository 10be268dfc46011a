"""The training loop: read it top to bottom.

load data -> stats -> model -> for each epoch: train_one_epoch, evaluate(val), keep the best checkpoint
(val accuracy, tie -> lower val loss) -> reload the best checkpoint -> evaluate(test) -> write metrics.

Run dir files: config.json, checkpoint.pt, metrics.csv (one row per epoch), metrics.json (test),
test_predictions.npz. Every file is written atomically (temp file + os.replace).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from crc_train.checkpoint import FORMAT_VERSION, load_checkpoint, model_from_checkpoint, save_checkpoint
from crc_train.config import RunConfig, TrainConfig
from crc_train.data import PairedDataset, channel_stats, load_split
from crc_train.errors import ConfigError
from crc_train.model import build_model
from crc_train.rundir import default_run_dir, write_json, write_metrics_csv, write_predictions

__all__ = ["RunResult", "evaluate", "resolve_device", "seed_everything", "train", "train_one_epoch"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run produced."""

    #: the run directory.
    run_dir: Path
    #: the content of metrics.json.
    metrics: dict[str, Any]


# ----------------------------------------------------------------------------- helpers


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


def _make_loader(split, tcfg: TrainConfig, shuffle: bool, device: torch.device) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(tcfg.seed)
    return DataLoader(
        PairedDataset(split),
        batch_size=tcfg.batch_size,
        shuffle=shuffle,
        num_workers=tcfg.workers,
        worker_init_fn=_seed_worker,
        generator=generator,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


# ----------------------------------------------------------------------------- train / evaluate


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    log_interval: int = 50,
) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) over the pairs seen."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    window_pairs = 0
    for step, (pathology, radiology, labels) in enumerate(loader, start=1):
        pathology = pathology.to(device, non_blocking=True)
        radiology = radiology.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)

        logits = model(pathology, radiology)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        n = labels.shape[0]
        total_loss += loss.item() * n  # .item() syncs once per step; cheap next to the step itself
        correct += int((logits.argmax(1) == labels).sum())
        seen += n
        window_pairs += n
        if step % log_interval == 0 or step == len(loader):
            elapsed = time.perf_counter() - t0
            log.info(
                "epoch %3d step %5d loss %.4f pairs/s %8.1f lr %.2e",
                epoch,
                step,
                loss.item(),
                window_pairs / max(elapsed, 1e-9),
                optimizer.param_groups[0]["lr"],
            )
            t0, window_pairs = time.perf_counter(), 0
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, Any]:
    """Loss, accuracy and per-pair outputs over ``loader``.

    Returns:
        ``{"loss", "acc", "labels" int64 [N], "preds" int64 [N], "probs" float32 [N, C]}``.
    """
    model.eval()
    total_loss, labels_all, probs_all = 0.0, [], []
    for pathology, radiology, labels in loader:
        logits = model(pathology.to(device), radiology.to(device)).float()
        labels = labels.to(device)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        labels_all.append(labels.cpu())
        probs_all.append(torch.softmax(logits, dim=1).cpu())
    labels_np = torch.cat(labels_all).numpy().astype(np.int64)
    probs = torch.cat(probs_all).numpy().astype(np.float32)
    preds = probs.argmax(1).astype(np.int64)
    n = max(len(labels_np), 1)
    return {
        "loss": total_loss / n,
        "acc": float((preds == labels_np).mean()) if len(labels_np) else 0.0,
        "labels": labels_np,
        "preds": preds,
        "probs": probs,
    }


# ----------------------------------------------------------------------------- the run


def train(cfg: RunConfig) -> RunResult:
    """Train, keep the best checkpoint on validation accuracy, evaluate it on the test split.

    Raises:
        ConfigError: an invalid configuration (user error).
        DataError: the data cannot be loaded (user error).
    """
    from sklearn.metrics import f1_score

    cfg.validate()
    tcfg = cfg.train
    device = resolve_device(tcfg.device)

    # ---- data (before the run dir exists, so a data error leaves nothing behind)
    splits = {name: load_split(cfg.data, name) for name in ("train", "val", "test")}
    classes = splits["train"].classes
    normalization = channel_stats(splits["train"])
    train_loader = _make_loader(splits["train"], tcfg, shuffle=True, device=device)
    val_loader = _make_loader(splits["val"], tcfg, shuffle=False, device=device)
    test_loader = _make_loader(splits["test"], tcfg, shuffle=False, device=device)

    # ---- run dir
    run_dir = Path(tcfg.out) if tcfg.out else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg.out = str(run_dir)
    run_id = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
    config_dict = {**cfg.to_dict(), "run_id": run_id}
    write_json(run_dir / "config.json", config_dict)
    log.info("run %s in %s on %s", run_id, run_dir, device)

    # ---- model and optimiser
    seed_everything(tcfg.seed)
    model = build_model(cfg.model, normalization).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    log.info(
        "%s/%s: %.2fM parameters, %d train / %d val / %d test pairs",
        cfg.model.backbone,
        cfg.model.fusion,
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
    )

    # ---- epochs
    best_acc, best_loss, best_epoch = -1.0, float("inf"), 0
    rows: list[dict[str, Any]] = []
    ckpt_path = run_dir / "checkpoint.pt"
    for epoch in range(1, tcfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss, train_acc = train_one_epoch(
            model, train_loader, optimizer, device, epoch, tcfg.log_interval
        )
        val = evaluate(model, val_loader, device)
        seconds = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        rows.append(
            {
                "epoch": epoch,
                "train_loss": f"{train_loss:.6f}",
                "train_acc": f"{train_acc:.6f}",
                "val_loss": f"{val['loss']:.6f}",
                "val_acc": f"{val['acc']:.6f}",
                "lr": f"{lr:.6g}",
                "seconds": f"{seconds:.2f}",
            }
        )
        write_metrics_csv(run_dir / "metrics.csv", rows)
        improved = val["acc"] > best_acc or (val["acc"] == best_acc and val["loss"] < best_loss)
        log.info(
            "epoch %3d done train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f %s",
            epoch,
            train_loss,
            train_acc,
            val["loss"],
            val["acc"],
            "(best)" if improved else "",
        )
        if improved:
            best_acc, best_loss, best_epoch = val["acc"], val["loss"], epoch
            save_checkpoint(
                ckpt_path,
                {
                    "format_version": FORMAT_VERSION,
                    "model_config": config_dict["model"],
                    "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "classes": list(classes),
                    "image_size": cfg.model.image_size,
                    "normalization": normalization,
                    "config": config_dict,
                    "epoch": epoch,
                    "best_val_metric": best_acc,
                    "run_id": run_id,
                },
            )

    # ---- test the best checkpoint
    best = model_from_checkpoint(load_checkpoint(ckpt_path)).to(device)
    test = evaluate(best, test_loader, device)
    metrics = {
        "accuracy": test["acc"],
        "macro_f1": float(f1_score(test["labels"], test["preds"], average="macro", zero_division=0)),
        "loss": test["loss"],
        "n_test": int(len(test["labels"])),
        "best_epoch": best_epoch,
        "val_accuracy": best_acc,
        "val_loss": best_loss,
        "classes": list(classes),
        "run_id": run_id,
    }
    write_json(run_dir / "metrics.json", metrics)
    write_predictions(run_dir / "test_predictions.npz", test["labels"], test["preds"], test["probs"])
    log.info(
        "test accuracy %.4f macro-F1 %.4f (best epoch %d)",
        metrics["accuracy"],
        metrics["macro_f1"],
        best_epoch,
    )
    return RunResult(run_dir=run_dir, metrics=metrics)
