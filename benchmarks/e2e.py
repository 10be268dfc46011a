"""End-to-end from a folder (decode + resize + infer, streaming) against engine-only, same backend and batch.

The folder holds N distinct random PNG pairs at the model's size x 4 (so every pair is decoded and
resized, like raw tiles), written once into the work folder.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def make_folder(folder: Path, pairs: int, size: int, seed: int = 0) -> Path:
    """``pairs`` random pathology (RGB) + radiology (L) PNGs of side 4 x ``size`` and a pairs.csv."""
    if (folder / "pairs.csv").is_file():
        with open(folder / "pairs.csv") as fh:
            if sum(1 for _ in fh) == pairs + 1:
                return folder
    rng = np.random.default_rng(seed)
    side = 4 * size
    for sub in ("pathology", "radiology"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(pairs):
        # Smooth-ish content (a random gradient plus noise) so PNG sizes resemble real tiles.
        base = rng.integers(0, 256, size=3)
        ramp = np.linspace(0, 60, side, dtype=np.float32)[None, :, None]
        noise = rng.integers(-25, 26, size=(side, side, 3))
        rgb = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / "pathology" / f"{i:06d}.png")
        Image.fromarray(rgb[:, :, 0]).save(folder / "radiology" / f"{i:06d}.png")
        rows.append([f"{i:06d}", f"pathology/{i:06d}.png", f"radiology/{i:06d}.png"])
    with open(folder / "pairs.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "pathology", "radiology"], *rows])
    return folder


def end_to_end(bundle, folder: Path, batch_size: int, backend: str = "auto", iterations: int = 20) -> dict:
    """Stream ``folder`` through the runtime, then time the engine alone at the same batch size."""
    from crc_runtime.bench import bench_batch
    from crc_runtime.pairs import discover_pairs
    from crc_runtime.predictor import Predictor
    from crc_runtime.timing import throughput

    with Predictor(bundle, backend, batch_size) as predictor:
        # A warmed engine, as in the engine-only measurement below: first-call set-up is not decoding.
        bench_batch(predictor.backend, batch_size, warmup_iters=2, iterations=1)
        result = predictor.predict_folder(discover_pairs(folder), keep_predictions=False)
        engine = bench_batch(predictor.backend, batch_size, warmup_iters=3, iterations=iterations)
    e2e = throughput(result.processed, result.total_seconds)
    return {
        "backend": predictor.backend.name,
        "artifact": predictor.artifact["file"],
        "batch_size": batch_size,
        "pairs": result.processed,
        "decode_workers": result.workers,
        "end_to_end_pairs_per_s": e2e,
        "engine_only_pairs_per_s": engine["throughput_pairs_per_s"],
        "ratio": e2e / engine["throughput_pairs_per_s"],
        "decode_wait_seconds": result.decode_wait_seconds,
    }
