"""``model.int8.onnx``: static INT8 quantization of ``model.onnx`` (QDQ), calibrated on training pairs.

Route: onnxruntime's own tools. ``quant_pre_process`` runs shape inference and onnxruntime's basic graph
optimizations (batch norms folded into their convolutions, constants folded), then ``quantize_static``
measures the range of every activation on calibration pairs and writes QuantizeLinear /
DequantizeLinear pairs around the ops it quantizes (QDQ format: the graph stays a plain ONNX graph that
onnxruntime fuses into integer kernels on the CPU and TensorRT builds as an explicitly quantized network).

What is quantized and what is not:

- Every convolution (both ResNet branches and the 1x1 projections of the attention blocks), with
  per-output-channel symmetric INT8 weights, and the residual additions and ReLUs between them, so INT8
  tensors flow from one convolution to the next.
- FP32, by operator type: the attention scores and weighting (``MatMul``), the softmax and the score
  scaling (``Mul``), the head (``Gemm``), and the pooling / concatenation that feed it. A softmax over
  8-bit scores and an 8-bit embedding in front of the classifier are where quantization moves the argmax.
- FP32, by position in the graph (found by walking it, not by node names): the preprocessing (uint8 ->
  float cast, scaling, z-score, gray -> RGB), every node from the graph inputs up to the first
  convolutions; and everything downstream of the global pooling. The first convolution's input is then
  quantized like every other activation.

Two encodings of the same calibration (the same pairs, the same activation ranges):

- ``model.int8.onnx``, for onnxruntime: **uint8 activations with a zero point** (asymmetric) and int8
  symmetric weights ("U8S8", onnxruntime's recommendation for x86). Measured on this project's resnet50
  @ 64 px model: 2.85x FP32 at batch 8, where signed symmetric activations gave 1.11x, because a ReLU
  cannot be folded into a symmetric range: it stays between each convolution and its QuantizeLinear and
  onnxruntime then fuses only 70 of 122 convolutions into QLinearConv (benchmarks/RESULTS.md).
- ``model.int8.trt.onnx``, for ``crc-export --trt --int8`` only: **signed int8 activations with a
  symmetric range** (zero point 0), the only INT8 Q/DQ TensorRT accepts; TensorRT fuses the ReLUs itself.

Calibration runs on ``calibration_pairs`` pairs drawn (seeded, without replacement) from the run's
**training** split, never from the test pairs of reference.npz; the manifest records which and how many.
The choice of method and of ``reduce_range`` is explained in docs/export.md, with the measurements in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
INT8_TRT_FILE = "model.int8.trt.onnx"  # the symmetric encoding TensorRT builds its INT8 engine from
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# What quantize_static may quantize. Everything else (MatMul, Softmax, Mul, Gemm, pooling, Concat ...)
# keeps its FP32 inputs and outputs.
QUANTIZED_OP_TYPES = ("Conv", "Add", "Relu", "Clip", "MaxPool")
# The global pooling in front of the head: it and everything after it stay FP32.
_POOLING = ("GlobalAveragePool", "ReduceMean")


@dataclass
class Int8Config:
    """Every choice of the INT8 export, with its default."""

    calibration_pairs: int = 256  # training pairs the activation ranges are measured on
    method: str = "percentile"  # calibration: minmax, entropy or percentile
    percentile: float = 99.999  # percentile method: the |activation| percentile that becomes the range
    reduce_range: bool = False  # 7-bit weights, for x86 CPUs without VNNI (see docs/export.md)
    per_channel: bool = True  # one weight scale per output channel
    batch_size: int = 16  # calibration batch (the histogram methods hold one batch's activations)
    seed: int = 0  # seed of the draw of calibration pairs from the training split

    def validate(self) -> None:
        """Raise ValueError on an impossible setting (the CLI's choices make these bugs, not user errors)."""
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of {CALIBRATION_METHODS}")
        if self.calibration_pairs < 1 or self.batch_size < 1:
            raise ValueError("calibration needs at least one pair and a batch size of at least 1")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")


def calibration_indices(available: int, wanted: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(wanted, available)`` pairs drawn without replacement with ``seed``."""
    rng = np.random.default_rng(seed)
    n = min(wanted, available)
    return np.sort(rng.choice(available, size=n, replace=False))


class PairReader:
    """onnxruntime ``CalibrationDataReader`` over uint8 pairs, ``batch_size`` pairs per batch.

    ``set_range`` (in batches) lets quantize_static collect statistics one batch at a time, so the
    histogram methods never hold more than one batch of activations.
    """

    def __init__(self, pathology: np.ndarray, radiology: np.ndarray, batch_size: int) -> None:
        self._batches = [
            {
                "pathology": np.ascontiguousarray(pathology[i : i + batch_size]),
                "radiology": np.ascontiguousarray(radiology[i : i + batch_size]),
            }
            for i in range(0, len(pathology), batch_size)
        ]
        self._pending = iter(self._batches)

    def get_next(self) -> dict | None:
        return next(self._pending, None)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self._batches[start_index:end_index])


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def fp32_regions(model) -> dict[str, list[str]]:
    """Names of the nodes kept FP32 by position: ``preprocessing`` and ``head`` (module docstring).

    ``model.graph.node`` is in topological order (the ONNX rule), so one forward pass settles each node.
    Preprocessing: every input comes from a graph input, an initializer or another preprocessing node
    (a convolution stops the walk). Head: a global pooling node, or a node fed by a head node.
    """
    graph = model.graph
    pre_tensors = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    constants = {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    pre_tensors |= constants
    head_tensors: set[str] = set()
    regions: dict[str, list[str]] = {"preprocessing": [], "head": []}
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        inputs = [name for name in node.input if name]
        if node.op_type != "Conv" and all(name in pre_tensors for name in inputs):
            regions["preprocessing"].append(node.name)
            pre_tensors.update(node.output)
        elif node.op_type in _POOLING or any(name in head_tensors for name in inputs):
            regions["head"].append(node.name)
            head_tensors.update(node.output)
    unnamed = [k for k, names in regions.items() if any(not n for n in names)]
    if unnamed:  # quantize_static excludes by name: an unnamed node could not be kept FP32
        raise RuntimeError(f"unnamed nodes in the {', '.join(unnamed)} of the graph; cannot exclude them")
    return regions


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def quantize_model(
    fp32_path: str | Path,
    out_path: str | Path,
    pathology: np.ndarray,
    radiology: np.ndarray,
    cfg: Int8Config,
    trt_path: str | Path | None = None,
) -> dict:
    """Write the INT8 QDQ model of ``fp32_path`` to ``out_path``, calibrated on the given pairs.

    Args:
        fp32_path: the FP32 ONNX file (its external weights beside it).
        out_path: destination of the onnxruntime model (uint8 activations); one self-contained file
            (the INT8 weights are a quarter of FP32's).
        pathology: calibration pathology images, uint8 [N, S, S, 3] (training pairs only).
        radiology: calibration radiology images, uint8 [N, S, S, 1].
        cfg: calibration method, percentile, reduce_range, per_channel, batch size.
        trt_path: also write the TensorRT encoding (symmetric int8 activations) here.

    Returns:
        The ``quantization`` record of the manifest entry (tool, formats, calibration settings, what was
        kept FP32, the graph summary), without the calibration provenance the caller adds; with
        ``trt_path``, a ``tensorrt`` record of the second file too.
    """
    cfg.validate()
    out_path = Path(out_path)
    reader = PairReader(pathology, radiology, cfg.batch_size)
    with tempfile.TemporaryDirectory(prefix="crc-int8-") as tmp:
        prepared, regions = prepare(fp32_path, Path(tmp))
        write_qdq(prepared, out_path, reader, regions, cfg, symmetric_activations=False)
        if trt_path is not None:
            # Calibrated again on the same pairs: the same ranges (deterministic), encoded symmetric.
            write_qdq(prepared, Path(trt_path), reader, regions, cfg, symmetric_activations=True)
    record = _record(out_path, cfg, regions, "uint8, asymmetric (zero point), per tensor")
    if trt_path is not None:
        record["tensorrt"] = _record(
            Path(trt_path), cfg, regions, "int8, symmetric (zero point 0), per tensor"
        )
    log.info("%s: %s", out_path.name, record["graph"])
    return record


def prepare(fp32_path: str | Path, folder: Path) -> tuple[Path, dict[str, list[str]]]:
    """``quant_pre_process`` of ``fp32_path`` into ``folder``, and its :func:`fp32_regions`.

    Shape inference + onnxruntime's basic optimizations: batch norms folded into their convolutions (so
    the folded weights are what gets quantized), constants folded.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = Path(folder) / "prepared.onnx"
    quant_pre_process(
        str(fp32_path),
        str(prepared),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        external_data_location="prepared.onnx.data",
    )
    return prepared, fp32_regions(onnx.load(str(prepared), load_external_data=False))


def write_qdq(
    prepared: Path,
    out_path: Path,
    reader: PairReader,
    regions: dict[str, list[str]],
    cfg: Int8Config,
    *,
    symmetric_activations: bool,
    op_types: tuple[str, ...] = QUANTIZED_OP_TYPES,
) -> None:
    """Calibrate on ``reader`` and write the QDQ model of ``prepared`` (see :func:`prepare`).

    Args:
        symmetric_activations: signed int8 activations with zero point 0 (TensorRT's encoding) instead of
            uint8 with a zero point (onnxruntime's fast one on x86).
        op_types: the op types quantize_static may quantize (benchmarks/int8_variants.py tries others).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    chatter = io.StringIO()  # the calibrators print() their progress: logged, not printed over the CLI
    with contextlib.redirect_stdout(chatter):
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*regions["preprocessing"], *regions["head"]],
            calibrate_method=_calibration_method(cfg.method),
            extra_options={
                "ActivationSymmetric": symmetric_activations,
                "WeightSymmetric": True,
                "CalibPercentile": cfg.percentile,
                # One batch at a time: statistics merge across calls, memory stays one batch deep.
                "CalibStridedMinMax": 1,
            },
        )
    if chatter.getvalue().strip():
        log.debug("quantize_static: %s", chatter.getvalue().strip())


def _record(path: Path, cfg: Int8Config, regions: dict[str, list[str]], activations: str) -> dict:
    """The manifest's description of one QDQ file; raises if a convolution escaped quantization."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph  # once: the INT8 weights are inside
    summary = _graph_summary(graph)
    if summary["conv_int8"] != summary["conv_total"]:
        raise RuntimeError(f"{path}: not every convolution was quantized ({summary})")
    return {
        "file": path.name,
        "tool": f"onnxruntime.quantization {metadata.version('onnxruntime')} quantize_static",
        "format": "QDQ",
        "activations": activations,
        "weights": f"int8, symmetric, {'per output channel' if cfg.per_channel else 'per tensor'}",
        "reduce_range": cfg.reduce_range,
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "fp32_regions": {key: _op_type_counts(graph, names) for key, names in regions.items()},
        "calibration": {
            "method": cfg.method,
            **({"percentile": cfg.percentile} if cfg.method == "percentile" else {}),
            "batch_size": cfg.batch_size,
        },
        "graph": summary,
    }


def _op_type_counts(graph, names: list[str]) -> list[tuple[str, int]]:
    """(op type, count) of the graph's nodes named in ``names``, sorted."""
    wanted = set(names)
    return sorted(Counter(n.op_type for n in graph.node if n.name in wanted).items())


def int8_summary(path: str | Path) -> dict[str, int]:
    """Count what runs in INT8 in a QDQ file.

    Returns:
        conv_total / conv_int8 (Conv whose data and weight inputs both come from DequantizeLinear),
        softmax_total / softmax_fp32, matmul_total / matmul_fp32, gemm_total / gemm_fp32 (no input from
        a DequantizeLinear), quantize_nodes, dequantize_nodes, int8_weights (INT8 initializers of rank
        >= 2: weight tensors, not zero points).
    """
    import onnx

    return _graph_summary(onnx.load(str(path), load_external_data=False).graph)


def _graph_summary(graph) -> dict[str, int]:
    """:func:`int8_summary` of a loaded graph."""
    import onnx

    producers = _producers(graph)

    def from_dq(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    counts = Counter()
    for node in graph.node:
        op = node.op_type
        if op == "Conv":
            counts["conv_total"] += 1
            counts["conv_int8"] += from_dq(node.input[0]) and from_dq(node.input[1])
        elif op in ("Softmax", "MatMul", "Gemm"):
            key = op.lower()
            counts[f"{key}_total"] += 1
            counts[f"{key}_fp32"] += not any(from_dq(name) for name in node.input if name)
        elif op == "QuantizeLinear":
            counts["quantize_nodes"] += 1
        elif op == "DequantizeLinear":
            counts["dequantize_nodes"] += 1
    counts["int8_weights"] = sum(
        t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2 for t in graph.initializer
    )
    keys = (
        "conv_total", "conv_int8", "softmax_total", "softmax_fp32", "matmul_total", "matmul_fp32",
        "gemm_total", "gemm_fp32", "quantize_nodes", "dequantize_nodes", "int8_weights",
    )  # fmt: skip
    return {key: int(counts[key]) for key in keys}
