"""The parity gate as crc-export runs it: logits of an artifact against reference.npz's PyTorch logits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from crc_runtime.backends import open_onnx
from crc_runtime.errors import UserError
from crc_runtime.validate import parity_row, run_reference

from .onnx import external_data_name

log = logging.getLogger(__name__)


def parity_entry(
    backend_name: str, ref: dict[str, np.ndarray], logits: np.ndarray, precision: str, thresholds: dict
) -> dict:
    """Parity of ``logits`` against reference.npz's PyTorch logits, gated on ``thresholds[precision]``.

    Returns:
        The manifest's ``parity`` entry: backend, the metrics of ``compare_logits``, passed, reasons,
        thresholds, and would_pass_with (the tightest thresholds these metrics meet).
    """
    limits = thresholds.get(precision)
    if limits is None:
        raise UserError(f"no parity thresholds for precision {precision!r}; known: {sorted(thresholds)}")
    return {"backend": backend_name, **parity_row(ref, logits, precision, limits)}


def run_onnx(
    model_path: Path,
    ref: dict[str, np.ndarray],
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[np.ndarray, str]:
    """Logits of an ONNX file on onnxruntime (``device``: cpu, cuda or auto), and the backend's name.

    TF32 stays off on CUDA: this is a parity run (the runtime's ``open_onnx``).
    """
    with open_onnx(model_path, device=device, precision=precision) as backend:
        return run_reference(backend, ref, batch_size), backend.name


def onnx_artifact(
    path: Path, precision: str, ref: dict, thresholds: dict, batch_size: int, device: str = "cpu"
) -> dict:
    """Gate one ONNX file on the reference set; returns its manifest entry (usable = the gate passed)."""
    logits, backend = run_onnx(path, ref, batch_size, device=device, precision=precision)
    parity = parity_entry(backend, ref, logits, precision, thresholds)
    log.info("%s on %s: %s", path.name, backend, "PASS" if parity["passed"] else "; ".join(parity["reasons"]))
    entry = {
        "file": path.name,
        "kind": "onnx",
        "precision": precision,
        "usable": parity["passed"],
        "parity": parity,
    }
    data = path.with_name(external_data_name(path))
    if data.is_file():
        entry["external_data"] = [data.name]
    return entry
