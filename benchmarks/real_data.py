"""Real-data sanity check: does the pipeline learn real histology, and what does each recipe change buy?

    python benchmarks/real_data.py DATA_DIR [--epochs 3] [--variants fused,pathology-only] [--amp off]
        [--out WORK_DIR] [--json FILE]

DATA_DIR holds ``pathmnist_train_subset_1000.npz`` (the first 1,000 real PathMNIST training images,
28 px) and ``organamnist.npz`` (the complete real OrganAMNIST, 28 px). The 1,000 pathology images are
split by a seeded permutation into 900 training and 100 held-out images; a MedMNIST-format folder is
written with train = the 900 and val = test = the 100 (PathMNIST has no real val/test here), next to
the real OrganAMNIST splits. Then crc_train trains one resnet18 28-px model per variant on the CPU
(``VARIANTS``: by default the fused model and the pathology-only model, both with crc-train's default
recipe), evaluates each on the 100 held-out pairs (accuracy and macro-F1 with their 95 % CIs) and runs
McNemar's test of every later variant against the first on their paired predictions. Every variant uses
the same seed, epochs, batch size, learning rate and AMP mode; only what its ``VARIANTS`` entry sets
differs.

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

#: TrainConfig / ModelConfig settings per variant; everything not named is crc-train's default.
_LEGACY = {"augment": "none", "optimizer": "adam", "weight_decay": 0.0, "label_smoothing": 0.0}
VARIANTS: dict[str, dict[str, object]] = {
    # crc-train's default recipe: augmentation full, AdamW, cosine with warm-up, label smoothing
    "fused": {"fusion": "attention"},
    "pathology-only": {"fusion": "none"},
    # the default recipe with the CT partners re-drawn across each training batch (--shuffle-pairs)
    "fused-shuffled": {"fusion": "attention", "shuffle_pairs": True},
    # the default recipe without augmentation
    "fused-noaug": {"fusion": "attention", "augment": "none"},
    "pathology-only-noaug": {"fusion": "none", "augment": "none"},
    # the default recipe with the eight flips / rotations only (--augment d4)
    "fused-d4": {"fusion": "attention", "augment": "d4"},
    "pathology-only-d4": {"fusion": "none", "augment": "d4"},
    # the recipe before augmentation and regularisation existed: Adam, constant rate, plain CE
    "fused-legacy": {"fusion": "attention", "scheduler": "none", **_LEGACY},
    "pathology-only-legacy": {"fusion": "none", "scheduler": "none", **_LEGACY},
}


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


def train_and_evaluate(root: Path, run_dir: Path, variant: str, args: argparse.Namespace) -> dict:
    """Train one variant with crc_train's own entry point and evaluate it on the held-out pairs."""
    from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from crc_train.training import train

    settings = dict(VARIANTS[variant])
    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion=str(settings.pop("fusion")), image_size=28),
        data=DataConfig(source="medmnist", root=str(root), size=28),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            amp=args.amp,
            device="cpu",
            progress=False,
            out=str(run_dir),
            **settings,
        ),
    )
    t0 = time.perf_counter()
    # a rerun with the same --out WORK_DIR trains afresh; train ends with evaluate_run on the held-out pairs
    metrics = train(cfg, overwrite=True).metrics
    return {**metrics, "train_seconds": time.perf_counter() - t0, "settings": VARIANTS[variant]}


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help=f"folder with {PATHOLOGY_FILE} and {RADIOLOGY_FILE}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast mode (all variants)")
    parser.add_argument(
        "--variants",
        default="fused,pathology-only",
        help=f"comma-separated, McNemar of each against the first; from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (every variant)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the 900 / 100 split")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here [default: a temp dir]")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or len(variants) < 2:
        print(f"error: --variants needs two or more of {', '.join(VARIANTS)}", file=sys.stderr)
        return 1

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
        from crc_train.evaluation import format_ci

        results = {}
        for name in variants:
            m = train_and_evaluate(work / "data", work / name, name, args)
            results[name] = m
            print(
                f"{name:22s} held-out accuracy {m['accuracy']:.4f} (95% CI {format_ci(m['accuracy_ci'])})  "
                f"macro-F1 {m['macro_f1']:.4f} (95% CI {format_ci(m['macro_f1_ci'])})  (best epoch "
                f"{m['best_epoch']}, radiology shuffled {m['ablation_accuracy']:.4f}, "
                f"{m['train_seconds']:.0f} s)",
                flush=True,
            )
        tests = {}
        for name in variants[1:]:
            comparison = compare_runs([work / variants[0]], [work / name])
            (t,) = comparison["tests"]
            tests[name] = {**t, "compare_markdown": render_compare(comparison)}
            print(
                f"McNemar {variants[0]} vs {name} on the {comparison['n_test']} held-out pairs: "
                f"b={t['table'][0][1]} (only {variants[0]} right) c={t['table'][1][0]} (only {name} right) "
                f"{t['method']} statistic {t['statistic']:.4f} p = {t['pvalue']:.4g}"
            )
        print("caveat: the held-out 100 also picked the best epoch (val split): slightly optimistic numbers")
        if args.json:
            keep = (
                "accuracy", "accuracy_ci", "macro_f1", "macro_f1_ci", "val_accuracy", "best_epoch",
                "ablation_accuracy", "train_seconds", "settings",
            )  # fmt: skip
            args.json.write_text(
                json.dumps(
                    {
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "models": {n: {k: m[k] for k in keep} for n, m in results.items()},
                        "mcnemar": tests,
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
