"""DistributedDataParallel on the CPU: two processes, gloo, the real `train` path (torch.multiprocessing).

Each process trains its DistributedSampler shard; gradients are all-reduced, so the two ranks' weights
stay identical; only rank 0 writes the run dir; the second rank returns no metrics. GPU variants (NCCL,
AMP) run on a CUDA machine via torchrun and are covered by the gpu-marked tests.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, dump: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from crc_train.training import train

    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion="attention", image_size=28, attention_dim=16),
        data=DataConfig(source="medmnist", root=data, max_train_pairs=8),
        train=TrainConfig(
            epochs=1, batch_size=2, accumulation_steps=2, loss="ce+ldam", device="cpu", seed=0,
            progress=False, evaluate=False, out=out,
        ),
    )  # fmt: skip
    result = train(cfg)
    params = {k: v.detach().clone() for k, v in result.model.named_parameters()}
    torch.save(
        {"params": params, "metrics": result.metrics, "run_dir": str(result.run_dir)}, f"{dump}/{rank}.pt"
    )


def test_two_gloo_ranks_train_in_step(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(synthetic_root), str(out), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    # the ranks' weights are identical after the steps (DDP averaged the gradients of different shards) ...
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    # ... and training moved them: the head differs from the checkpoint-free fresh init of the same seed
    from crc_train.config import ModelConfig
    from crc_train.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", fusion="attention", image_size=28, attention_dim=16)
    fresh = dict(build_model(cfg).named_parameters())
    assert not torch.equal(fresh["head.1.weight"], r0["params"]["head.1.weight"])
    # only rank 0 wrote files and reported metrics
    for name in (
        "config.json",
        "checkpoint.pt",
        "last.pt",
        "metrics.csv",
        "metrics.json",
        "training_curves.png",
    ):
        assert (out / name).is_file(), name
    assert r0["metrics"]["best_epoch"] == 1 and r1["metrics"] == {}
    assert r0["run_dir"] == r1["run_dir"] == str(out)
    last = torch.load(out / "last.pt", weights_only=True)
    assert len(last["rng"]) == 2  # one RNG state per rank, for an exact resume
    # the checkpoint holds rank 0's weights, which are everyone's
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ckpt[k], r1["params"][k]) for k in r1["params"])
