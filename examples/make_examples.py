"""Rebuild the demo data in examples/ from real MedMNIST files.

The repository ships a small real slice so that a newcomer's first run trains on real tissue and real CT
without a download. This script is how that slice was made; run it again to check or to regenerate:

    python examples/make_examples.py --pathmnist PATH/pathmnist_train_subset_1000.npz \
        --organamnist PATH/organamnist.npz

Inputs are MedMNIST npz files (28 px). PathMNIST: the first 1,000 official *training* images (the only
real PathMNIST we carry), re-split here by a seeded permutation into train / val / test. OrganAMNIST: a
seeded sample of each official split. Outputs:

- examples/medmnist/pathmnist.npz, examples/medmnist/organamnist.npz: MedMNIST's exact npz layout, read by
  ``crc-train --data-root examples/medmnist`` through the medmnist package like the real files.
- examples/pairs/: PNG pairs from the slice's test split (two per tissue class) and a pairs.csv with
  labels, for ``crc-infer``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_SIZES = {"train": 700, "val": 150, "test": 150}
SEED = 20261123


def _split_pathmnist(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
    order = rng.permutation(len(images))
    out, start = {}, 0
    for split, n in SPLIT_SIZES.items():
        idx = np.sort(order[start : start + n])
        out[f"{split}_images"], out[f"{split}_labels"] = images[idx], labels[idx]
        start += n
    return out


def _sample_organamnist(organ: np.lib.npyio.NpzFile, rng: np.random.Generator) -> dict:
    out = {}
    for split, n in SPLIT_SIZES.items():
        images, labels = organ[f"{split}_images"], organ[f"{split}_labels"]
        idx = np.sort(rng.choice(len(images), size=n, replace=False))
        out[f"{split}_images"], out[f"{split}_labels"] = images[idx], labels[idx]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pathmnist", required=True, type=Path, help="PathMNIST 28-px npz (train split used)"
    )
    parser.add_argument("--organamnist", required=True, type=Path, help="OrganAMNIST 28-px npz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    import medmnist  # only for the official class names

    classes = [medmnist.INFO["pathmnist"]["label"][str(i)] for i in range(9)]
    rng = np.random.default_rng(SEED)
    path = np.load(args.pathmnist)
    path_split = _split_pathmnist(path["train_images"], path["train_labels"], rng)
    organ_split = _sample_organamnist(np.load(args.organamnist), rng)

    data_dir = args.out / "medmnist"
    data_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(data_dir / "pathmnist.npz", **path_split)
    np.savez_compressed(data_dir / "organamnist.npz", **organ_split)

    # Two test pairs per class; the radiology partner follows the default pairing idea (a seeded draw).
    pairs_dir = args.out / "pairs"
    for sub in ("pathology", "radiology"):
        (pairs_dir / sub).mkdir(parents=True, exist_ok=True)
    test_labels = path_split["test_labels"].ravel()
    rows = []
    for cls in range(9):
        for k, i in enumerate(np.flatnonzero(test_labels == cls)[:2]):
            pair_id = f"{classes[cls].replace(' ', '-')}-{k + 1}"
            j = int(rng.integers(len(organ_split["test_images"])))
            Image.fromarray(path_split["test_images"][i], "RGB").save(
                pairs_dir / "pathology" / f"{pair_id}.png"
            )
            Image.fromarray(organ_split["test_images"][j], "L").save(
                pairs_dir / "radiology" / f"{pair_id}.png"
            )
            rows.append([pair_id, f"pathology/{pair_id}.png", f"radiology/{pair_id}.png", classes[cls]])
    with open(pairs_dir / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "pathology", "radiology", "label"])
        writer.writerows(rows)
    print(f"wrote {data_dir} and {len(rows)} pairs in {pairs_dir}")


if __name__ == "__main__":
    main()
