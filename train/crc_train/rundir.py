"""The run directory: every file crc-train keeps there, each written atomically (temp file + rename).

- ``config.json`` (the resolved config), ``metrics.csv`` (one row per epoch, rewritten each epoch),
  ``metrics.json``; ``atomic_path`` is what every other run-dir writer (predictions, figures, report.md)
  writes through. Files follow the umask, like any other file the user creates.
- ``checkpoint.pt``: a plain dict that alone rebuilds the model, loadable with ``weights_only=True``.
  Keys: ``format_version`` (1), ``model_config`` (dict), ``state_dict``, ``classes`` (list[str]),
  ``image_size``, ``normalization`` (dict), ``config`` (the resolved run config as a plain dict),
  ``epoch``, ``best_val_metric``, ``run_id``.
- ``last.pt``: the resume state, written after every epoch. It holds everything that the next epoch
  depends on, as tensors and plain Python values only, so it loads with ``torch.load(weights_only=True)``:
  the model (``state_dict``), optimiser, scheduler and GradScaler states, the early-stopping /
  best-checkpoint bookkeeping (``Progress``), the metrics.csv rows so far, and per rank the RNG states of
  torch (CPU and CUDA), numpy, python ``random`` and the DataLoader generator. Restoring them makes a
  resumed CPU run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crc_train.config import RunConfig
from crc_train.errors import CheckpointError
from crc_train.model import FusionNet, ModelConfig, build_model

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "LAST_FORMAT",
    "METRICS_CSV_FIELDS",
    "Progress",
    "atomic_path",
    "capture_rng",
    "default_run_dir",
    "load_checkpoint",
    "load_last",
    "model_from_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "save_last",
    "write_json",
    "write_metrics_csv",
    "write_text_atomic",
]


METRICS_CSV_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file here: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto ``path`` when the block succeeds, removed if not.

    The file gets the mode any new file gets (the umask applies), not mkstemp's private 0600.

    Args:
        path: The final file.
        suffix: The temporary file's suffix (writers such as ``np.savez`` or ``savefig`` go by it).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _new_file_mode())
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


FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "model_config",
    "state_dict",
    "classes",
    "image_size",
    "normalization",
    "config",
    "epoch",
    "best_val_metric",
    "run_id",
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except (RuntimeError, OSError) as exc:  # torch reports a full disk as "basic_ios::clear: iostream error"
        free = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointError(
            f"cannot write checkpoint {path}: {_first_line(exc)} ({free:.0f} MiB free on that disk)"
        ) from exc


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, is not a readable checkpoint, or lacks required keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a crc-train checkpoint (expected a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a crc-train checkpoint: missing {', '.join(missing)}")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {ckpt['format_version']}; this crc-train reads "
            f"{FORMAT_VERSION}: use the crc-fusion version that wrote it"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> FusionNet:
    """Rebuild the model from a checkpoint dict; returned in eval mode on the CPU."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(ckpt["model_config"]) - known)
    if unknown:
        raise CheckpointError(
            f"checkpoint model_config has fields this crc-train does not know: {', '.join(unknown)}"
        )
    cfg = ModelConfig(**ckpt["model_config"])
    model = build_model(cfg, ckpt["normalization"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


#: Version of the last.pt layout.
LAST_FORMAT = 1
LAST_KEYS = ("last_format", "config", "run_id", "epoch", "state_dict", "optimizer", "progress", "rows", "rng")


@dataclass
class Progress:
    """Early-stopping and best-checkpoint bookkeeping carried from epoch to epoch."""

    #: validation accuracy of the selected (best) epoch.
    best_acc: float = -1.0
    #: validation loss of the selected (best) epoch.
    best_loss: float = float("inf")
    #: the epoch checkpoint.pt holds (0 = none yet).
    best_epoch: int = 0
    #: lowest validation loss seen (early stopping watches it).
    es_best_loss: float = float("inf")
    #: epochs since es_best_loss last improved.
    bad_epochs: int = 0
    #: True once early stopping ended the run.
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the checkpoint."""
        return asdict(self)


def capture_rng(loader_generator: torch.Generator | None) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (weights_only-safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator | None) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


def save_last(path: Path, state: dict[str, Any]) -> None:
    """Write last.pt atomically (temp file + rename)."""
    save_checkpoint(path, {"last_format": LAST_FORMAT, **state})


def load_last(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN_DIR/last.pt`` with ``weights_only=True``.

    Raises:
        CheckpointError: no last.pt, unreadable, or not a crc-train resume checkpoint.
    """
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (is {run_dir} a crc-train run dir?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read {path}: {first}") from exc
    if not isinstance(state, dict) or any(k not in state for k in LAST_KEYS):
        raise CheckpointError(f"{path} is not a crc-train resume checkpoint")
    if state["last_format"] != LAST_FORMAT:
        found = state["last_format"]
        raise CheckpointError(f"{path} has last_format {found}; this crc-train reads {LAST_FORMAT}")
    return state
