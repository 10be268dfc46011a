"""Real-data sanity check: does the pipeline learn real histology?

    python benchmarks/real_data.py DATA_DIR [--epochs 3] [--out WORK_DIR]

DATA_DIR holds ``pathmnist_train_subset_1000.npz`` (the first 1,000 real PathMNIST training images,
28 px) and ``organamnist.npz`` (the complete real OrganAMNIST, 28 px). The 1,000 pathology images are
split by a seeded permutation into 900 training and 100 held-out images; a MedMNIST-format folder is
written with train = the 900 and val = test = the 100 (PathMNIST has no real val/test here), next to
the real OrganAMNIST splits. Then crc_train trains the fused model (``--fusion attention``) and the
pathology-only model (``--fusion none``), resnet18 at 28 px on the CPU, evaluates both on the 100
held-out pairs and runs McNemar's test on their paired predictions.

Caveat printed with the numbers: the 100 held-out images also choose the best epoch (they are the
validation split), so the held-out numbers are slightly optimistic; this is a sanity check that the
pipeline learns, not a reproduction of the paper. The pairing with CT images is synthetic.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATHOLOGY_FILE = "pathmnist_train_subset_1000.npz"
RADIOLOGY_FILE = "organamnist.npz"
N_HELD_OUT = 100


def write_medmnist_folder(data_dir: Path, out: Path, split_seed: int) -> dict[str, int]:
    """pathmnist.npz (900 train / 100 val / the same 100 as test) and organamnist.npz in ``out``."""
    with np.load(data_dir / PATHOLOGY_FILE) as npz:
        images, labels = npz["train_images"], npz["train_labels"]
    perm = np.random.default_rng(split_seed).permutation(len(labels))
    held, train = np.sort(perm[:N_HELD_OUT]), np.sort(perm[N_HELD_OUT:])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "pathmnist.npz",
        train_images=images[train], train_labels=labels[train],
        val_images=images[held], val_labels=labels[held],
        test_images=images[held], test_labels=labels[held],
    )  # fmt: skip
    target = out / "organamnist.npz"
    target.unlink(missing_ok=True)
    try:
        target.symlink_to((data_dir / RADIOLOGY_FILE).resolve())
    except OSError:
        shutil.copyfile(data_dir / RADIOLOGY_FILE, target)
    return {"train": len(train), "held_out": len(held)}


def train_and_evaluate(root: Path, run_dir: Path, fusion: str, args: argparse.Namespace) -> dict:
    """Train one model with crc_train's own entry point and evaluate it on the held-out pairs."""
    from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from crc_train.evaluation import evaluate_run
    from crc_train.training import train

    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion=fusion, image_size=28),
        data=DataConfig(source="medmnist", root=str(root), size=28),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device="cpu",
            out=str(run_dir),
        ),
    )
    t0 = time.perf_counter()
    train(cfg, overwrite=True)  # a rerun with the same --out WORK_DIR trains afresh
    seconds = time.perf_counter() - t0
    metrics = evaluate_run(run_dir)
    return {**metrics, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help=f"folder with {PATHOLOGY_FILE} and {RADIOLOGY_FILE}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="training seed (both models)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 900 / 100 split")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here [default: a temp dir]")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    missing = [f for f in (PATHOLOGY_FILE, RADIOLOGY_FILE) if not (args.data_dir / f).is_file()]
    if missing:
        print(f"error: {args.data_dir} lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    work = args.out or Path(tempfile.mkdtemp(prefix="crc-real-"))
    try:
        from crc_train.compare import compare_runs, render_compare

        counts = write_medmnist_folder(args.data_dir, work / "data", args.split_seed)
        print(
            f"real PathMNIST: {counts['train']} train / {counts['held_out']} held out (split seed "
            f"{args.split_seed}); real OrganAMNIST paired by seeded permutation (synthetic pairing)"
        )
        results = {}
        for name, fusion in (("fused", "attention"), ("pathology_only", "none")):
            m = train_and_evaluate(work / "data", work / name, fusion, args)
            results[name] = m
            print(
                f"{name:15s} fusion={fusion:9s} held-out accuracy {m['accuracy']:.4f}  "
                f"macro-F1 {m['macro_f1']:.4f}  (best epoch {m['best_epoch']}, val accuracy "
                f"{m['val_accuracy']:.4f}, radiology shuffled {m['ablation_accuracy']:.4f}, "
                f"{m['train_seconds']:.0f} s)"
            )
        comparison = compare_runs([work / "fused"], [work / "pathology_only"])
        (t,) = comparison["tests"]
        print(
            f"McNemar fused vs pathology-only on the {comparison['n_test']} held-out pairs: "
            f"b={t['table'][0][1]} c={t['table'][1][0]} {t['method']} statistic {t['statistic']:.4f} "
            f"p = {t['pvalue']:.4g}"
        )
        print("caveat: the held-out 100 also picked the best epoch (val split): slightly optimistic numbers")
        if args.json:
            keep = (
                "accuracy",
                "macro_f1",
                "val_accuracy",
                "best_epoch",
                "ablation_accuracy",
                "train_seconds",
            )
            args.json.write_text(
                json.dumps(
                    {
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "models": {n: {k: m[k] for k in keep} for n, m in results.items()},
                        "mcnemar": t,
                        "compare_markdown": render_compare(comparison),
                    },
                    indent=2,
                )
                + "\n"
            )
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
