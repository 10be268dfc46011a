"""Resume state: ``last.pt`` (written atomically after every epoch) and the RNG states it carries.

``last.pt`` holds everything that the next epoch depends on, as tensors and plain Python values only,
so it loads with ``torch.load(weights_only=True)``: the model (``state_dict``), optimiser, scheduler and
GradScaler states, the early-stopping / best-checkpoint bookkeeping, the metrics.csv rows so far, and per
rank the RNG states of torch (CPU and CUDA), numpy, python ``random`` and the DataLoader generator.
Restoring them makes a resumed CPU run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crc_train.checkpoint import save_checkpoint
from crc_train.errors import CheckpointError

__all__ = ["LAST_FORMAT", "Progress", "capture_rng", "load_last", "restore_rng", "save_last"]

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
