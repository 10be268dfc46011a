"""The crc-infer job done the torch way, for the cold-start and peak-RSS comparison.

Same work as ``crc-infer FOLDER --bundle B``: read pairs.csv, decode + resize every pair with the same
rule, rebuild the trained model from the run's checkpoint, predict, write a CSV. Run as a script:

    python benchmarks/torch_job.py RUN_DIR FOLDER OUT_CSV
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(run_dir: str, folder: str, out_csv: str) -> None:
    import numpy as np
    import torch
    import torchvision  # noqa: F401  (the torch path imports it through the model anyway; count it)
    from crc_runtime.images import load_image
    from crc_train.rundir import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    model = model_from_checkpoint(ckpt)
    size = int(ckpt["model_config"].get("image_size", 64))
    root = Path(folder)
    with open(root / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    p = np.stack([load_image(root / r["pathology"], "RGB", size) for r in rows])
    r = np.stack([load_image(root / r["radiology"], "L", size) for r in rows])
    with torch.inference_mode():
        logits = model(torch.from_numpy(p), torch.from_numpy(r)).numpy()
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "predicted"])
        writer.writerows([row["id"], int(i)] for row, i in zip(rows, logits.argmax(1), strict=True))


if __name__ == "__main__":
    main(*sys.argv[1:4])
