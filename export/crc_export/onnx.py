"""Export a trained fusion model to ONNX (FP32, dynamic batch, uint8 NHWC inputs)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INPUT_NAMES = ("pathology", "radiology")
OUTPUT_NAMES = ("logits",)
DEFAULT_OPSET = 18


def example_inputs(image_size: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic uint8 example inputs for tracing.

    The batch must be at least 2: with a batch of 1 the exporter may specialise the batch dimension
    to a constant and the ONNX file would silently accept only one pair at a time.
    """
    if batch < 2:
        raise ValueError("export needs an example batch of at least 2 to keep the batch dimension dynamic")
    gen = torch.Generator().manual_seed(0)
    pathology = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, generator=gen)
    radiology = torch.randint(0, 256, (batch, image_size, image_size, 1), dtype=torch.uint8, generator=gen)
    return pathology, radiology


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    image_size: int,
    *,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    external_data: bool = False,
    output_names: tuple[str, ...] = OUTPUT_NAMES,
) -> Path:
    """Write ``model`` as an ONNX graph with a dynamic batch axis.

    Args:
        model: the fusion model; its forward takes uint8 NHWC ``pathology`` [N,S,S,3] and
            ``radiology`` [N,S,S,1] and returns logits, preprocessing included.
        path: destination ``.onnx`` file.
        image_size: S.
        exporter: ``"dynamo"`` (torch.export based, the default in current torch) or ``"torchscript"``
            (the legacy tracer, for older torch releases).
        opset: ONNX opset; at least 17.
        external_data: keep the weights in ``<file>.data`` beside the graph (see ``move_weights_out``)
            instead of inside the one file.
        output_names: names of the forward's outputs, in order (every one has the batch axis first).
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    model = model.eval()
    args = example_inputs(image_size)
    common = dict(input_names=list(INPUT_NAMES), output_names=list(output_names), opset_version=opset)
    with torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            with warnings.catch_warnings():
                # Both inputs share the one batch axis, so torch says it merges the two names: expected.
                warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
                program = torch.onnx.export(
                    model,
                    args,
                    dynamo=True,
                    dynamic_shapes={"pathology": {0: batch}, "radiology": {0: batch}},
                    verbose=False,
                    **common,
                )
            # Written as one file first; move_weights_out below splits it the same way for both exporters.
            program.save(str(path), external_data=False)
        elif exporter == "torchscript":
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, *output_names)},
                do_constant_folding=True,
                **common,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}: expected 'dynamo' or 'torchscript'")
    if external_data:
        move_weights_out(path)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def external_data_name(path: str | Path) -> str:
    """File name of the weights that ``move_weights_out`` writes beside ``path``: ``model.onnx.data``."""
    return Path(path).name + ".data"


def move_weights_out(path: str | Path) -> Path:
    """Rewrite the ONNX file ``path`` with every initializer over 1 KiB in ``<name>.data`` beside it.

    This is ONNX's standard external-data layout (the graph keeps a relative ``location``). onnxruntime
    maps such a file into memory on CPU instead of parsing the weights into the protobuf and copying them
    again, which cuts session creation time and peak memory (numbers in benchmarks/RESULTS.md).

    Returns:
        The path of the data file.
    """
    import onnx

    path = Path(path)
    data = path.with_name(external_data_name(path))
    model = onnx.load(str(path))
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it private (0600); give it the graph's mode
    return data


def check_onnx(path: str | Path, output_names: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Run ``onnx.checker`` (with shape inference) and confirm the I/O signature of the bundle contract.

    Args:
        path: the ONNX file.
        output_names: the outputs the graph must start with (``logits`` for the predict graphs).
    """
    import onnx

    # By path, so the checker reads external weights from beside the graph and has no 2 GB limit.
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    missing = [name for name in INPUT_NAMES if name not in inputs]
    if missing or outputs[: len(output_names)] != list(output_names):
        raise RuntimeError(
            f"{path}: expected inputs {INPUT_NAMES} and outputs {output_names}, "
            f"found {list(inputs)} and {outputs}"
        )
    for name in INPUT_NAMES:
        tensor_type = inputs[name].type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.UINT8:
            raise RuntimeError(f"{path}: input {name} must be uint8")
        batch_dim = tensor_type.shape.dim[0]
        if not batch_dim.dim_param:
            raise RuntimeError(f"{path}: input {name} has a fixed batch dimension ({batch_dim.dim_value})")
