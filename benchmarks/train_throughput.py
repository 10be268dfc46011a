"""Training throughput: pairs/s and peak memory of the real training step, per precision mode.

    python benchmarks/train_throughput.py [--device auto] [--backbone resnet50] [--size 64]
        [--batch-size 32] [--steps 20] [--warmup 3] [--modes off,bf16,fp16,fp16+cl] [--augment full]
        [--out train_throughput.json]

The step is crc_train's own (training.train_one_epoch: augmentation on the device, TrainForward, CE+LDAM,
the default optimiser (AdamW), AMP / GradScaler) on random uint8 pairs (speed does not depend on the
data). Each mode runs in a fresh subprocess so peak memory is that mode's alone: peak RSS on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU.
Modes: ``off`` (FP32), ``bf16``, ``fp16`` (CUDA only, with GradScaler); ``+cl`` adds channels_last,
``+compile`` torch.compile. Default: ``off`` on the CPU, ``off,bf16,fp16,fp16+cl`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from crc_train.augment import Augment
    from crc_train.config import ModelConfig, TrainConfig
    from crc_train.losses import TrainLoss
    from crc_train.model import build_model
    from crc_train.optim import build_optimizer
    from crc_train.training import TrainForward, train_one_epoch
    from torch.utils.data import DataLoader, TensorDataset

    amp, *extras = args.child.split("+")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=args.backbone, fusion=args.fusion, image_size=args.size)).to(
        device
    )
    if "cl" in extras:
        model = model.to(memory_format=torch.channels_last)
    n = args.batch_size * (args.steps + args.warmup)
    rng = np.random.default_rng(0)
    data = TensorDataset(
        torch.from_numpy(rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)),
        torch.from_numpy(rng.integers(0, 256, (n, args.size, args.size, 1), dtype=np.uint8)),
        torch.from_numpy(rng.integers(0, 9, n)),
    )
    loss_fn = TrainLoss(args.loss, np.full(9, 100)).to(device)
    forward = TrainForward(model, loss_fn.needs_cosine)
    if "compile" in extras:
        forward = torch.compile(forward)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    augment = Augment(args.augment)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def run(first: int, count: int) -> float:
        loader = DataLoader(torch.utils.data.Subset(data, range(first, first + count * args.batch_size)),
                            batch_size=args.batch_size, pin_memory=device.type == "cuda")  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_one_epoch(
            forward,
            loader,
            optimizer,
            loss_fn,
            device,
            1,
            amp=amp,
            scaler=scaler,
            log_interval=10**9,
            augment=augment,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()  # the timing ends when the GPU is done
        return time.perf_counter() - t0

    run(0, args.warmup)  # warm-up: allocator, cuDNN autotuning, compilation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = run(args.warmup * args.batch_size, args.steps)
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"
    return {
        "mode": args.child,
        "pairs_per_s": args.steps * args.batch_size / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "peak_mib": peak,
        "peak_kind": peak_kind,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--fusion", default="attention")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--loss", default="ce+ldam", choices=["ce", "ldam", "ce+ldam"])
    ap.add_argument("--augment", default="full", choices=["none", "d4", "full"], help="training augmentation")
    ap.add_argument("--modes", default=None, help="comma list, e.g. off,bf16,fp16,fp16+cl,bf16+compile")
    ap.add_argument("--out", type=Path, default=Path("train_throughput.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(_child(args)))
        return
    modes = (args.modes or ("off" if args.device == "cpu" else "off,bf16,fp16,fp16+cl")).split(",")
    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode, *(argv if argv is not None else sys.argv[1:])]
        cmd += ["--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"mode": mode, "error": last})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    setup = {
        k: getattr(args, k)
        for k in ("device", "backbone", "fusion", "size", "batch_size", "steps", "loss", "augment")
    }
    print(f"training throughput: {args.backbone}/{args.fusion} @ {args.size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps, loss {args.loss}, augment {args.augment}, {args.device}")  # fmt: skip
    print(f"{'mode':<16} {'pairs/s':>9} {'ms/step':>9} {'peak MiB':>9}  peak of")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<16} error: {r['error']}")
        else:
            speed = f"{r['pairs_per_s']:9.1f} {r['step_ms']:9.1f}"
            print(f"{r['mode']:<16} {speed} {r['peak_mib']:9.0f}  {r['peak_kind']}")
    args.out.write_text(json.dumps({"setup": setup, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
