"""``model.fp16.onnx``: FP16 backbones, FP32 preprocessing, attention, pooling and head.

Route: the FP16 graph is exported straight from torch. A deep copy of the model gets its ResNet
convolutions, batch norms and residual stages in half precision, each FP16 region opened by an explicit
cast of its input; the cross-modal attention blocks, the global average pooling and the linear head are
wrapped so their inputs are cast back to float32 and they compute in FP32, and the preprocessing
(uint8 -> z-score) is left untouched. The exporter then writes every cast as an ONNX ``Cast`` node, so
the precision of each op is explicit in the graph: exactly what a strongly typed TensorRT build and
onnxruntime execute. Converting the FP32 ONNX afterwards (onnxconverter-common's ``float16``) was
tried first and broke on the uint8 -> float ``Cast`` of the preprocessing, and looped forever when
``Cast`` was put in its block list; exporting from torch needs no graph surgery and no extra dependency.

Why those parts stay FP32: softmax over attention scores and the sums of a global pooling are where
FP16 overflows or loses the small differences that decide the argmax; the z-score works on raw pixel
values; the head is tiny, so FP32 costs nothing there.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .onnx import DEFAULT_OPSET, export_onnx

log = logging.getLogger(__name__)

FP16_FILE = "model.fp16.onnx"
_BACKBONE_STAGES = ("layer1", "layer2", "layer3", "layer4")


class CastInputs(nn.Module):
    """Run ``module`` on its floating-point inputs cast to ``dtype``; outputs are returned as they come.

    When an input already has ``dtype`` the cast is a no-op and the exporter writes no node, so chaining
    FP16 regions costs no Cast pairs.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        cast = [a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        return self.module(*cast)


def _half_backbone(net: nn.Module) -> None:
    """Make one torchvision ResNet branch FP16 in place: stem and stages half, pooling FP32."""
    # The stem conv opens the FP16 region; bn1 / relu / maxpool then receive FP16 tensors.
    net.conv1 = CastInputs(net.conv1.half(), torch.float16)
    net.bn1.half()
    for stage in _BACKBONE_STAGES:
        # Each stage re-casts its input: after an FP32 attention block it is needed, otherwise a no-op.
        setattr(net, stage, CastInputs(getattr(net, stage).half(), torch.float16))
    # Global average pooling sums H*W activations: in FP32, on FP32 inputs.
    net.avgpool = CastInputs(net.avgpool, torch.float32)


def make_fp16_model(model: nn.Module) -> nn.Module:
    """A deep copy of a ``crc_train`` FusionNet with FP16 backbones and FP32 everything else.

    Args:
        model: the trained FP32 model (left untouched).

    Returns:
        The mixed-precision copy in eval mode; its forward takes the same uint8 inputs and returns FP32
        logits.
    """
    mixed = copy.deepcopy(model).float().eval()
    for branch in ("pathology", "radiology"):
        net = getattr(mixed, branch, None)
        if net is not None:
            _half_backbone(net)
    for block in ("fusion3", "fusion4"):
        attention = getattr(mixed, block, None)
        if attention is not None:  # q/k/v projections, softmax and the gated residual in FP32
            setattr(mixed, block, CastInputs(attention, torch.float32))
    mixed.head = CastInputs(mixed.head, torch.float32)  # no-op today (pooling returns FP32); kept explicit
    return mixed


def export_fp16_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    *,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export the mixed-precision copy of ``model`` to ``path`` (same I/O contract as ``model.onnx``)."""
    path = export_onnx(make_fp16_model(model), path, image_size, exporter=exporter, opset=opset)
    summary = precision_summary(path)
    log.info("%s: %s", path.name, summary)
    if summary["conv_fp16"] == 0:
        raise RuntimeError(f"{path}: FP16 export produced no FP16 convolution ({summary})")
    return path


def _elem_types(model) -> dict[str, int]:
    """ONNX element type of every named tensor in the graph (after shape inference)."""
    types: dict[str, int] = {}
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def precision_summary(path: str | Path) -> dict[str, int | str]:
    """Count what runs in which precision in an ONNX file.

    Returns:
        fp16_initializers, fp32_initializers, casts_to_fp16, casts_to_fp32, conv_total, conv_fp16
        (Conv nodes whose weight is FP16), softmax_total, softmax_fp32 (Softmax nodes on FP32 input),
        and the input/output element types (``input_pathology``: ``"UINT8"``, ``output_logits``:
        ``"FLOAT"`` ...).
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = _elem_types(model)
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    init_types = Counter(init.data_type for init in model.graph.initializer)
    casts = Counter()
    convs = softmaxes = conv_fp16 = softmax_fp32 = 0
    for node in model.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            casts[to] += 1
        elif node.op_type == "Conv":
            convs += 1
            conv_fp16 += types.get(node.input[1]) == fp16
        elif node.op_type == "Softmax":
            softmaxes += 1
            softmax_fp32 += types.get(node.input[0]) == fp32
    summary = {
        "fp16_initializers": init_types[fp16],
        "fp32_initializers": init_types[fp32],
        "casts_to_fp16": casts[fp16],
        "casts_to_fp32": casts[fp32],
        "conv_total": convs,
        "conv_fp16": conv_fp16,
        "softmax_total": softmaxes,
        "softmax_fp32": softmax_fp32,
    }
    for prefix, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            summary[f"{prefix}_{value.name}"] = onnx.TensorProto.DataType.Name(
                value.type.tensor_type.elem_type
            )
    return summary
