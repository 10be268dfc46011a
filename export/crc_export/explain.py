"""``model.explain.onnx``: the logits, one class activation map per branch and the head's bias.

The fusion model's head is linear on the average-pooled final maps, so ``FusionNet.forward_cams``
splits every logit exactly into one map per branch plus the bias (DESIGN.md, "Explanations"). This
module exports that computation as its own graph, gates it like every artifact, and records it in the
manifest as kind ``explain`` (docs/bundle.md):

- outputs ``logits`` [N, C] (computed as ``model.onnx`` computes them), ``<branch>_cam`` [N, C, h, w] for
  each branch the head reads (``pathology`` and ``radiology``; ``pathology`` alone for fusion none;
  ``fused`` for early fusion, whose one 4-channel ResNet gives no per-modality map) and ``bias`` [N, C];
- gate: the logits against PyTorch's with the FP32 thresholds, the maps against PyTorch's maps
  (``reference.explain.npz``) cell by cell in logit units within the FP32 ``max_abs_diff``
  (``crc_runtime.explain.explain_parity``), and the identity
  ``logits = sum of the map means + bias`` within 1e-4 on the graph's own outputs;
- weights: the graph's initializers that are byte-identical to ``model.onnx``'s external weights (all
  of the backbones) point into ``model.onnx.data``, so the artifact adds a graph of a few hundred KB,
  not a second copy of the weights.

Why a separate graph and not extra outputs on ``model.onnx``: benchmarks/RESULTS.md ("Explain").
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from crc_runtime.backends import open_onnx
from crc_runtime.explain import EXPLAIN_KIND, cam_output, explain_parity
from crc_runtime.validate import run_reference_outputs
from torch import nn

from .onnx import DEFAULT_OPSET, check_onnx, export_onnx

log = logging.getLogger(__name__)

EXPLAIN_FILE = "model.explain.onnx"
REFERENCE_FILE = "reference.explain.npz"


class ExplainGraph(nn.Module):
    """What ``model.explain.onnx`` computes: ``(logits, <branch>_cam..., bias)`` from uint8 NHWC inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.branches: list[str] = model.branch_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits", *(cam_output(b) for b in self.branches), "bias")

    def forward(self, pathology: torch.Tensor, radiology: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, cams = self.model.forward_cams(pathology, radiology)
        _, bias = self.model.head_weights()
        # The bias per pair ([N, C], not [C]) keeps every output batch-first, as the runtime binds them.
        return (logits, *(cams[b] for b in self.branches), bias.expand_as(logits))


@torch.no_grad()
def torch_cams(
    model: nn.Module, pathology: np.ndarray, radiology: np.ndarray, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """PyTorch FP32 maps of ``model`` on uint8 NHWC arrays (eval mode, CPU), by output name."""
    model = model.eval().float().cpu()
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(pathology), batch_size):
        p = torch.from_numpy(np.ascontiguousarray(pathology[start : start + batch_size]))
        r = torch.from_numpy(np.ascontiguousarray(radiology[start : start + batch_size]))
        _, cams = model.forward_cams(p, r)
        for branch, cam in cams.items():
            chunks.setdefault(cam_output(branch), []).append(cam.float().numpy())
    return {name: np.concatenate(parts).astype(np.float32) for name, parts in chunks.items()}


def share_weights(path: Path, source: Path) -> tuple[int, int]:
    """Point every initializer of ``path`` whose bytes equal one of ``source``'s external weights at them.

    Matching is by content (element type, shape and sha256 of the bytes), not by name, so it holds
    whatever names the exporter gave. Initializers that match nothing stay inside ``path``.

    Returns:
        (initializers shared, bytes not stored twice).
    """
    import onnx
    from onnx import numpy_helper

    src = onnx.load(str(source), load_external_data=False)
    index: dict[tuple, list] = {}
    for tensor in src.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        with open(source.parent / info["location"], "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            raw = fh.read(int(info["length"]))
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
        index.setdefault(key, list(tensor.external_data))
    model = onnx.load(str(path))
    shared = saved = 0
    for tensor in model.graph.initializer:
        raw = numpy_helper.to_array(tensor).tobytes()
        entries = index.get((tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest()))
        if entries is None:
            continue
        onnx_fields = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")
        for name in onnx_fields:
            tensor.ClearField(name)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.extend(entries)
        shared += 1
        saved += len(raw)
    # Serialised as is: onnx.save_model would try to write the (already written) external data again.
    path.write_bytes(model.SerializeToString())
    return shared, saved


def export_explain_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    *,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    weights_from: Path | None = None,
) -> tuple[Path, list[str]]:
    """Export the explain graph of ``model`` to ``path`` and check its signature.

    Args:
        model: the trained FusionNet (left untouched).
        path: destination ``.onnx`` file.
        image_size: S.
        exporter: as for ``export_onnx``.
        opset: as for ``export_onnx``.
        weights_from: ``model.onnx`` with external weights: matching initializers point into its data file
            (``share_weights``); None keeps every weight inside ``path``.

    Returns:
        (path, the external data files it reads).
    """
    graph = ExplainGraph(model).eval()
    path = export_onnx(
        graph, path, image_size, exporter=exporter, opset=opset, output_names=graph.output_names
    )
    external: list[str] = []
    if weights_from is not None:
        shared, saved = share_weights(path, weights_from)
        if shared:
            external = sorted({_location(weights_from)})
        log.info("%s: %d initializers (%.1f MB) read from %s", path.name, shared, saved / 1e6, external)
    check_onnx(path, graph.output_names)
    return path, external


def _location(model_path: Path) -> str:
    """The external data file ``model_path`` names (``model.onnx.data``)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                return entry.value
    raise ValueError(f"{model_path}: has no external data")


def explain_artifact(
    model: nn.Module,
    work: Path,
    image_size: int,
    ref: dict[str, np.ndarray],
    thresholds: dict,
    *,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    batch_size: int = 64,
    weights_from: Path | None = None,
) -> dict:
    """Write ``model.explain.onnx`` and ``reference.explain.npz`` into ``work`` and gate them.

    Returns:
        The manifest entry: file, kind ``explain``, precision ``fp32``, usable, branches, outputs,
        reference, external_data (when weights are shared) and parity (``explain_parity``).
    """
    path, external = export_explain_onnx(
        model, work / EXPLAIN_FILE, image_size, exporter=exporter, opset=opset, weights_from=weights_from
    )
    branches = model.branch_names
    cams = torch_cams(model, ref["pathology"], ref["radiology"], batch_size)
    np.savez(work / REFERENCE_FILE, **cams)
    with open_onnx(path, device="cpu", precision="fp32") as backend:
        outputs = run_reference_outputs(backend, ref, batch_size)
        specs, name = backend.output_specs, backend.name
    parity = {"backend": name, **explain_parity(ref, cams, outputs, branches, thresholds["fp32"])}
    log.info("%s on %s: %s", path.name, name, "PASS" if parity["passed"] else "; ".join(parity["reasons"]))
    entry = {
        "file": path.name,
        "kind": EXPLAIN_KIND,
        "precision": "fp32",
        "usable": parity["passed"],
        "branches": branches,
        "outputs": [
            {
                "name": s.name,
                "dtype": s.dtype,
                "shape": ["batch", *(int(d) for d in outputs[s.name].shape[1:])],
            }
            for s in specs
        ],
        "reference": REFERENCE_FILE,
        "parity": parity,
    }
    if external:
        entry["external_data"] = external
    return entry
