"""The optimiser and the learning-rate schedule of a run.

Optimiser (``TrainConfig.optimizer``):

- ``adamw`` (the default): Adam with decoupled weight decay (Loshchilov & Hutter 2019). With Adam, an L2
  term added to the gradient is rescaled by the adaptive step and barely regularises the weights that
  move most; decoupled decay shrinks every weight by the same fraction per step.
- ``adam``: the paper's optimiser; ``weight_decay`` is then the classic L2 term.

Either way, weight decay applies only to weight matrices and convolution kernels (tensors with two or more
dimensions): biases, BatchNorm scales and shifts and the attention gates (scalars that start at 0) are
not decayed, as in timm and torchvision's reference recipes.

Schedules (``TrainConfig.scheduler``):

- ``cosine`` (the default): linear warm-up over ``warmup_epochs`` epochs of optimiser steps (from lr /
  warm-up steps up to lr), then a half cosine down to 0 at the last step of the last epoch; stepped after
  every optimiser step. Warm-up keeps Adam's first, poorly estimated steps small; the decay to 0 lets a
  short run settle into a minimum instead of ending at full rate.
- ``plateau``: ReduceLROnPlateau on the validation loss, stepped once per epoch (the paper's).
- ``none``: a constant rate.

``--resume`` with more ``--epochs`` recomputes the cosine over the new total, so the rate jumps up to where
the longer schedule would be.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from crc_train.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "cosine_factor", "steps_per_epoch"]


def build_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over every parameter of ``model``; decay only on tensors with two or more dimensions."""
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": tcfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    klass = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    return klass(groups, lr=tcfg.lr)


def steps_per_epoch(batches: int, accumulation_steps: int) -> int:
    """Optimiser steps in one epoch of ``batches`` micro-batches (a last, shorter group still steps)."""
    return max(1, math.ceil(batches / accumulation_steps))


def cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then half cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, tcfg: TrainConfig, batches_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """The schedule named by ``tcfg.scheduler`` (None for "none").

    Args:
        optimizer: the run's optimiser.
        tcfg: the training config (schedule, epochs, warm-up, plateau settings).
        batches_per_epoch: micro-batches per epoch on this process (``len(train_loader)``).

    Returns:
        A ReduceLROnPlateau (step once per epoch with the validation loss), a LambdaLR (step after every
        optimiser step) or None.
    """
    if tcfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=tcfg.plateau_factor, patience=tcfg.plateau_patience
        )
    if tcfg.scheduler == "cosine":
        per_epoch = steps_per_epoch(batches_per_epoch, tcfg.accumulation_steps)
        total = per_epoch * tcfg.epochs
        warmup = min(total, round(tcfg.warmup_epochs * per_epoch))

        def factor(step: int) -> float:  # a closure, so last.pt stores only the step count
            return cosine_factor(step, warmup, total)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None
