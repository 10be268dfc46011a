"""Run directory files, each written atomically (temp file in the same folder + os.replace).

config.json, metrics.csv (one row per epoch, rewritten each epoch), metrics.json, test_predictions.npz;
the checkpoint is written by ``checkpoint.save_checkpoint``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from crc_train.config import RunConfig

__all__ = ["METRICS_CSV_FIELDS", "default_run_dir", "write_json", "write_metrics_csv", "write_predictions"]

METRICS_CSV_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    _write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv atomically with every epoch row so far."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(path, buf.getvalue())


def write_predictions(path: Path, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> None:
    """test_predictions.npz: labels int64 [N], preds int64 [N], probs float32 [N, C] (no pickles)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(
            tmp,
            labels=labels.astype(np.int64),
            preds=preds.astype(np.int64),
            probs=probs.astype(np.float32),
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_run_dir(cfg: RunConfig) -> Path:
    """runs/<UTC timestamp>-<backbone>-<fusion>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.backbone}-{cfg.model.fusion}"
