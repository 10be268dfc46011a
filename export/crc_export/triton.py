"""A Triton Inference Server model repository for a bundle's usable artifacts.

Layout (one model per artifact, Triton's repository convention)::

    REPO/
      <name>_onnx/       config.pbtxt  labels.txt  1/model.onnx/{model.onnx, model.onnx.data}
                                                     (platform onnxruntime_onnx; a folder, as Triton
                                                     wants an ONNX model with external weights)
      <name>_fp16_onnx/  config.pbtxt  labels.txt  1/model.onnx   (when model.fp16.onnx is usable)
      <name>_int8_onnx/  config.pbtxt  labels.txt  1/model.onnx   (when model.int8.onnx is usable)
      <name>_trt/        config.pbtxt  labels.txt  1/model.plan   (platform tensorrt_plan, when built)
      <name>_trt_int8/   config.pbtxt  labels.txt  1/model.plan   (the INT8 engine, when built)

The configs are written as protobuf text (Triton's ``ModelConfig``) from the manifest alone: the
batch axis is implicit (``max_batch_size`` > 0), so inputs are ``[S, S, 3]`` / ``[S, S, 1]`` uint8 and the
output ``[C]`` float32, and dynamic batching groups requests up to ``max_batch_size``.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from crc_runtime.atomic import atomic_folder
from crc_runtime.errors import UserError, printable

from .outputs import check_output_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "crc_fusion"
_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "int64": "TYPE_INT64"}
_LABELS = "labels.txt"
# (suffix, platform, file name inside the version folder) per artifact kind + precision.
_MODELS = {
    ("onnx", "fp32"): ("onnx", "onnxruntime_onnx", "model.onnx"),
    ("onnx", "fp16"): ("fp16_onnx", "onnxruntime_onnx", "model.onnx"),
    ("onnx", "int8"): ("int8_onnx", "onnxruntime_onnx", "model.onnx"),
    ("tensorrt", "fp16"): ("trt", "tensorrt_plan", "model.plan"),
    ("tensorrt", "int8"): ("trt_int8", "tensorrt_plan", "model.plan"),
}


def check_repository_target(repo: Path, overwrite: bool) -> None:
    """Refuse, before any work, a file, a non-empty folder without ``overwrite``, or (with it) a folder that
    is not a Triton repository crc-export wrote (``repository_problem``)."""
    check_output_folder(Path(repo), "--triton", None, overwrite, repository_problem)


def repository_problem(repo: Path) -> str | None:
    """Why ``repo`` is not a repository this module wrote (None when it is one).

    Ours holds only model folders ``<name>_{onnx,fp16_onnx,trt}``, each with a ``config.pbtxt`` naming that
    folder and one of our platforms, ``labels.txt`` and version ``1/`` holding ``model.onnx`` (a file, or
    the folder of a graph with external weights) or ``model.plan``: nothing a user keeps there.
    """
    suffixes = tuple(f"_{suffix}" for suffix, _, _ in _MODELS.values())
    platforms = {platform for _, platform, _ in _MODELS.values()}
    for model in sorted(repo.iterdir()):
        name = printable(model.name)
        if not model.is_dir() or not model.name.endswith(suffixes):
            return f"{name} is not one of its model folders"
        if sorted(p.name for p in model.iterdir()) != ["1", "config.pbtxt", _LABELS]:
            return f"{name} holds other files than config.pbtxt, {_LABELS} and 1/"
        try:
            config = (model / "config.pbtxt").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return f"{name}/config.pbtxt is not readable text"
        lines = config.splitlines()
        if (
            not lines
            or lines[0] != f'name: "{model.name}"'
            or not any(line == f'platform: "{platform}"' for line in lines[1:3] for platform in platforms)
        ):
            return f"{name}/config.pbtxt was not written by crc-export"
        version = model / "1"
        entries = list(version.iterdir()) if version.is_dir() else None
        if entries is None or len(entries) != 1 or entries[0].name not in ("model.onnx", "model.plan"):
            return f"{name}/1 holds other files than the model"
        if entries[0].is_dir() and not all(
            p.is_file() and p.name.startswith("model.onnx") for p in entries[0].iterdir()
        ):
            return f"{name}/1/model.onnx holds other files than the model and its weights"
    return None


def check_model_name(name: str) -> None:
    """Model names become folder names and Triton model names: letters, digits, '_' and '-' only."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise UserError(f"Triton model name {name!r}: use letters, digits, '_' and '-' only")


def _tensor(spec: dict, label_file: str | None = None) -> str:
    dtype = _TRITON_TYPES.get(spec["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {spec['name']}: dtype {spec['dtype']} has no Triton type here")
    dims = [int(d) for d in spec["shape"][1:]]  # the batch axis is Triton's, via max_batch_size
    lines = [
        f'    name: "{spec["name"]}"',
        f"    data_type: {dtype}",
        f"    dims: [ {', '.join(map(str, dims))} ]",
    ]
    if label_file:
        lines.append(f'    label_filename: "{label_file}"')
    return "  {\n" + "\n".join(lines) + "\n  }"


def model_config(
    name: str,
    platform: str,
    inputs: list[dict],
    outputs: list[dict],
    max_batch_size: int,
    *,
    gpu: bool = False,
    queue_delay_us: int = 100,
) -> str:
    """``config.pbtxt`` text for one model.

    Args:
        name: the model name (must equal its folder name).
        platform: ``onnxruntime_onnx`` or ``tensorrt_plan``.
        inputs: the manifest's input specs (name, dtype, shape with the batch axis first).
        outputs: the manifest's output specs; the first gets ``labels.txt`` (Triton's classification).
        max_batch_size: largest batch Triton forms (a TensorRT engine's profile maximum).
        gpu: pin one instance to the GPU (TensorRT plans run nowhere else); otherwise Triton chooses.
        queue_delay_us: how long dynamic batching may hold a request to fill a batch.
    """
    if max_batch_size < 1:
        raise UserError(f"Triton max_batch_size must be >= 1, got {max_batch_size}")
    parts = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor(s) for s in inputs) + "\n]",
        "output [\n"
        + ",\n".join(_tensor(s, _LABELS if i == 0 else None) for i, s in enumerate(outputs))
        + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}",
    ]
    if gpu:
        parts.append("instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]")
    return "\n".join(parts) + "\n"


def write_triton_repository(
    bundle: Path,
    repo: Path,
    manifest: dict,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    max_batch_size: int = 256,
    overwrite: bool = False,
) -> list[str]:
    """Write a Triton model repository for every usable artifact of ``bundle``.

    The repository is built in a temporary folder beside ``repo`` and renamed into place when complete.

    Returns:
        The model names written.
    """
    bundle, repo = Path(bundle), Path(repo)
    check_model_name(model_name)
    check_repository_target(repo, overwrite)
    written = []
    with atomic_folder(repo) as work:
        labels = "".join(f"{c}\n" for c in manifest["classes"])
        for art in manifest.get("artifacts", []):
            model = _MODELS.get((art.get("kind"), art.get("precision")))
            if model is None or art.get("usable") is not True:
                log.info("triton: skipping %s (usable: %s)", art.get("file"), art.get("usable"))
                continue
            suffix, platform, filename = model
            name = f"{model_name}_{suffix}"
            version_dir = work / name / "1"
            version_dir.mkdir(parents=True)
            weights = art.get("external_data", [])
            if weights:  # Triton's form of a multi-file ONNX model: a folder named like the model file
                target = version_dir / filename
                target.mkdir()
                shutil.copyfile(bundle / art["file"], target / art["file"])
                for weight_file in weights:
                    shutil.copyfile(bundle / weight_file, target / weight_file)
            else:
                shutil.copyfile(bundle / art["file"], version_dir / filename)
            (work / name / _LABELS).write_text(labels)
            config = model_config(
                name,
                platform,
                manifest["inputs"],
                manifest["outputs"],
                max_batch_size,
                gpu=platform == "tensorrt_plan",
            )
            (work / name / "config.pbtxt").write_text(config)
            written.append(name)
        if not written:
            raise UserError(f"{bundle}: no usable artifact to put in a Triton repository")
    log.info("triton repository %s: %s", repo, ", ".join(written))
    return written
