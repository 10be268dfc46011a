"""Plumbing of a training run: seeds, device, DataLoaders, and the DDP / torch.compile wrapping."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from crc_train.config import TrainConfig
from crc_train.distributed import DistContext
from crc_train.errors import ConfigError

__all__ = ["make_loader", "resolve_device", "seed_everything", "wrap_forward"]


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
