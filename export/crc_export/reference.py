"""The parity reference set: fixed test pairs with their PyTorch FP32 logits."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def torch_logits(
    model: torch.nn.Module, pathology: np.ndarray, radiology: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """FP32 logits of ``model`` on uint8 NHWC arrays, computed in eval mode on the CPU."""
    model = model.eval().float().cpu()
    chunks = []
    for start in range(0, len(pathology), batch_size):
        p = torch.from_numpy(np.ascontiguousarray(pathology[start : start + batch_size]))
        r = torch.from_numpy(np.ascontiguousarray(radiology[start : start + batch_size]))
        chunks.append(model(p, r).float().numpy())
    return np.concatenate(chunks).astype(np.float32)


def build_reference(
    model: torch.nn.Module, split, n_pairs: int, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Take the first ``n_pairs`` pairs of ``split`` and attach PyTorch FP32 logits.

    Args:
        model: the trained model.
        split: a ``crc_train.data.PairedSplit`` (uint8 pathology/radiology, int64 labels).
        n_pairs: how many pairs to keep (fewer if the split is smaller).
        batch_size: inference batch size.

    Returns:
        Arrays ``pathology``, ``radiology``, ``labels`` and ``logits`` as stored in ``reference.npz``.
    """
    if n_pairs < 1:
        raise ValueError(f"the reference set needs at least one pair, got {n_pairs}")
    n = min(n_pairs, len(split.labels))
    pathology = np.ascontiguousarray(split.pathology[:n], dtype=np.uint8)
    radiology = np.ascontiguousarray(split.radiology[:n], dtype=np.uint8)
    labels = np.asarray(split.labels[:n], dtype=np.int64)
    logits = torch_logits(model, pathology, radiology, batch_size)
    log.info("reference set: %d pairs, PyTorch accuracy %.4f", n, float((logits.argmax(1) == labels).mean()))
    return {"pathology": pathology, "radiology": radiology, "labels": labels, "logits": logits}


def reference_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise the reference arrays as an uncompressed npz (no pickled objects)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_reference(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``reference.npz``; the caller writes the whole bundle into a temporary folder first."""
    path = Path(path)
    path.write_bytes(reference_bytes(arrays))
    return path
