"""Run directory files, each written atomically (temp file in the same folder + os.replace).

config.json, metrics.csv (one row per epoch, rewritten each epoch), metrics.json; ``atomic_path`` is what
every other run-dir writer (checkpoints, predictions, figures, report.md) writes through.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crc_train.config import RunConfig

__all__ = [
    "METRICS_CSV_FIELDS",
    "atomic_path",
    "default_run_dir",
    "write_json",
    "write_metrics_csv",
    "write_text_atomic",
]

METRICS_CSV_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto ``path`` when the block succeeds, removed if not.

    Args:
        path: The final file.
        suffix: The temporary file's suffix (writers such as ``np.savez`` or ``savefig`` go by it).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically (no newline translation)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv atomically with every epoch row so far."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def default_run_dir(cfg: RunConfig) -> Path:
    """runs/<UTC timestamp>-<backbone>-<fusion>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.backbone}-{cfg.model.fusion}"
