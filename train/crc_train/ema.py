"""Exponential moving average (EMA) of a model's weights, updated after every optimiser step.

    ema = d * ema + (1 - d) * weights,     d = min(decay, (1 + n) / (10 + n)),  n = optimiser steps so far

The warm-up term (as in timm's ``ModelEma`` and TensorFlow's ``ExponentialMovingAverage``) keeps the early
average from being dominated by the random initial weights in short runs: after 20 steps d is at most
0.7, after 200 steps 0.96. Floating-point buffers (BatchNorm running statistics) are averaged like the
parameters, integer buffers (``num_batches_tracked``) copied, so the averaged model is self-consistent.

When EMA is on, validation, the best-checkpoint choice, checkpoint.pt (hence the test evaluation and the
exported bundle) all use the averaged weights; last.pt carries the raw weights and the EMA state for
``--resume``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma:
    """An averaged copy of ``model`` (same device, eval mode, no gradients), following ``model``.

    Args:
        model: the model being trained (the raw weights); ``update`` reads it.
        decay: the largest decay d (the warm-up term lowers it early on).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.source = model
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the source model's current weights (after each optimiser step)."""
        d = self.current_decay()
        ema_state = self.module.state_dict()
        for name, raw in self.source.state_dict().items():
            avg = ema_state[name]
            if avg.is_floating_point():
                avg.lerp_(raw.detach(), 1.0 - d)  # avg += (1 - d) * (raw - avg)
            else:
                avg.copy_(raw)
        self.steps += 1

    def state_dict(self) -> dict:
        """``{"decay", "steps", "state_dict"}`` (CPU tensors, weights_only-safe) for last.pt."""
        weights = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        return {"decay": self.decay, "steps": self.steps, "state_dict": weights}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of ``state_dict``."""
        self.decay = float(state["decay"])
        self.steps = int(state["steps"])
        self.module.load_state_dict(state["state_dict"])
