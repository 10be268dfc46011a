"""The torch baselines, behind the runtime's Backend interface so one timing loop measures everything.

Every backend is timed the same way: numpy uint8 in, numpy float32 logits out, so host<->device copies
count for the GPU rows of torch exactly as they do for onnxruntime and TensorRT.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from crc_runtime.backends.base import TensorSpec, check_inputs

log = logging.getLogger(__name__)

MODES = ("eager-fp32", "amp-fp16", "compile")


class TorchBackend:
    """A crc_train model run by torch: eager FP32, autocast FP16 (CUDA only) or ``torch.compile``.

    Args:
        model: The FusionNet in eval mode (uint8 NHWC inputs; preprocessing inside, like the ONNX).
        image_size: S of the square inputs.
        mode: One of :data:`MODES`.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, mode: str, device: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if mode == "amp-fp16" and device != "cuda":
            raise ValueError("AMP FP16 is a GPU baseline (CPU autocast uses bfloat16)")
        self.name = f"torch-{mode}"
        self.mode, self.device = mode, device
        self.precision = "fp16" if mode == "amp-fp16" else "fp32"
        self.version = f"torch {torch.__version__}"
        self.model = model.to(device).eval()
        # dynamic=False: one specialised graph per batch size, compiled during that size's warm-up.
        self.fn = torch.compile(self.model, dynamic=False) if mode == "compile" else self.model
        self.input_specs = [
            TensorSpec("pathology", "uint8", (None, image_size, image_size, 3)),
            TensorSpec("radiology", "uint8", (None, image_size, image_size, 1)),
        ]

    def _autocast(self):
        if self.mode == "amp-fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(self.input_specs, inputs)
        with torch.inference_mode(), self._autocast():
            p = torch.from_numpy(inputs["pathology"]).to(self.device)
            r = torch.from_numpy(inputs["radiology"]).to(self.device)
            logits = self.fn(p, r).float().cpu().numpy()  # .cpu() synchronizes a CUDA device
        return {"logits": logits}

    def close(self) -> None:
        self.model = self.fn = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


def torch_device_info() -> dict:
    """torch's view of the machine: CUDA device name and capability when present, threads otherwise."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(0)
        info.update(
            cuda_device=torch.cuda.get_device_name(0),
            compute_capability=f"{cap[0]}.{cap[1]}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info
