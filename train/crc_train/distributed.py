"""Multi-process data parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc-per-node N -m crc_train.cli train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; ``init_from_env`` reads them. Backend: NCCL on CUDA, gloo on the CPU. Every rank
trains on its DistributedSampler shard with the per-process ``--batch-size``; validation numbers are
summed over the ranks with ``all_reduce`` so every rank takes the same early-stopping and scheduler
decisions; only rank 0 writes files. Without those variables (or WORLD_SIZE=1) everything here is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "all_reduce_sums", "barrier", "broadcast_object", "gather_objects", "init_from_env"]

log = logging.getLogger(__name__)


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
