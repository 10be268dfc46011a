"""The checkpoint: a plain dict that alone rebuilds the model, loadable with weights_only=True.

Keys: ``format_version`` (1), ``model_config`` (dict), ``state_dict``, ``classes`` (list[str]),
``image_size``, ``normalization`` (dict), ``config`` (the resolved run config as a plain dict),
``epoch``, ``best_val_metric``, ``run_id``.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from crc_train.errors import CheckpointError
from crc_train.model import FusionNet, ModelConfig, build_model
from crc_train.rundir import atomic_path

__all__ = ["CheckpointError", "FORMAT_VERSION", "load_checkpoint", "model_from_checkpoint", "save_checkpoint"]

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
