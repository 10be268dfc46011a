"""One training epoch and one evaluation pass: gradient accumulation, AMP, DDP, progress bar.

``TrainForward`` is what DistributedDataParallel and ``torch.compile`` wrap: a forward pass that returns
the raw logits and, when the loss needs them, the head's cosine logits (losses.py), so every parameter
use happens inside the wrapped forward and DDP sees all gradients.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from crc_train.distributed import DistContext, all_reduce_sums
from crc_train.losses import TrainLoss, cosine_logits

__all__ = ["TrainForward", "autocast", "evaluate", "train_one_epoch"]

log = logging.getLogger(__name__)


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
) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) over the pairs of every rank.

    Gradients of ``accumulation_steps`` micro-batches (each loss divided by that number) are summed
    before one optimiser step; a last, shorter group at the end of the epoch still steps. Under DDP the
    gradient all-reduce runs only on the micro-batch that steps (``no_sync`` on the others).
    """
    ctx = ctx or DistContext()
    forward.train()
    bar = _bar(loader, epoch, progress and ctx.is_main)
    if bar is not None:  # log lines go above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm(loggers=[logging.getLogger("crc_train")])
    else:
        redirect = contextlib.nullcontext()
    with redirect:
        total_loss, correct, seen = _epoch_steps(
            forward, loader, optimizer, loss_fn, device, epoch, accumulation_steps, amp, scaler, ctx,
            log_interval, bar,
        )  # fmt: skip
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
) -> tuple[float, int, int]:  # noqa: ANN001 - the arguments of train_one_epoch
    total_loss, correct, seen = 0.0, 0, 0
    t0, window_pairs = time.perf_counter(), 0
    n_batches = len(loader)
    optimizer.zero_grad(set_to_none=True)
    for i, (pathology, radiology, labels) in enumerate(loader, start=1):
        pathology = pathology.to(device, non_blocking=True)
        radiology = radiology.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
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

        n = labels.shape[0]
        loss_value = loss.item()  # syncs once per micro-batch; cheap next to the step itself
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
