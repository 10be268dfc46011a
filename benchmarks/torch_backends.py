"""The torch baselines, behind the runtime's Backend interface so one timing loop measures everything.

Every backend is timed the same way: numpy uint8 in, numpy float32 logits out, so host<->device copies
count for the GPU rows of torch exactly as they do for onnxruntime and TensorRT.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from crc_runtime.backends.base import Backend, TensorSpec, cpu_info

log = logging.getLogger(__name__)

MODES = ("eager-fp32", "amp-fp16", "compile")


class TorchBackend(Backend):
    """A crc_train model run by torch: eager FP32, autocast FP16 (CUDA only) or ``torch.compile``.

    FP32 on a GPU runs with TF32 off (torch's cuDNN convolutions allow it by default), like the
    runtime's FP32 backends, so the FP32 rows compare the same arithmetic.

    Args:
        model: The FusionNet in eval mode (uint8 NHWC inputs; preprocessing inside, like the ONNX).
        image_size: S of the square inputs.
        mode: One of :data:`MODES`.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, mode: str, device: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if mode == "amp-fp16" and device != "cuda":
            raise ValueError("AMP FP16 is a GPU baseline (CPU autocast uses bfloat16)")
        self.name = f"torch-{mode}"
        self.mode, self._torch_device = mode, device
        self.device = "cuda:0" if device == "cuda" else "cpu"
        self.precision = "fp16" if mode == "amp-fp16" else "fp32"
        self.version = f"torch {torch.__version__}"
        self.max_batch = None
        self.timing_method = "host wall clock around the whole call (.cpu() synchronizes the GPU)"
        self._model = model
        self.input_specs = [
            TensorSpec("pathology", "uint8", (None, image_size, image_size, 3)),
            TensorSpec("radiology", "uint8", (None, image_size, image_size, 1)),
        ]
        self.output_specs = [TensorSpec("logits", "float32", (None, None))]

    def _activate(self) -> None:
        if self._torch_device == "cuda":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            self.device_info = {"index": 0, "name": torch.cuda.get_device_name(0)}
        else:
            self.device_info = cpu_info()
        self.model = self._model.to(self._torch_device).eval()
        # dynamic=False: one specialised graph per batch size, compiled during that size's warm-up.
        self.fn = torch.compile(self.model, dynamic=False) if self.mode == "compile" else self.model

    def _autocast(self):
        if self.mode == "amp-fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), self._autocast():
            p = torch.from_numpy(inputs["pathology"]).to(self._torch_device)
            r = torch.from_numpy(inputs["radiology"]).to(self._torch_device)
            logits = self.fn(p, r).float().cpu().numpy()  # .cpu() synchronizes a CUDA device
        return {"logits": logits}

    def _deactivate(self) -> None:
        self.model = self.fn = None
        if self._torch_device == "cuda":
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
