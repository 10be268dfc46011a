"""onnxruntime backend: one InferenceSession on the provider asked for, never a silent fallback."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BackendError
from .base import TensorSpec, check_inputs

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# onnxruntime's tensor type strings -> numpy dtype names.
_ORT_DTYPES = {
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(bool)": "bool",
}


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when onnxruntime has the CUDA provider, else ``cpu``; others pass through."""
    if device == "auto":
        return "cuda" if PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
    if device not in PROVIDERS:
        raise BackendError(f"device {device!r} is not one of auto, {', '.join(PROVIDERS)}")
    return device


def _spec(node) -> TensorSpec:
    dtype = _ORT_DTYPES.get(node.type, node.type)
    shape = tuple(d if isinstance(d, int) else (d or None) for d in node.shape)
    return TensorSpec(node.name, dtype, shape)


class OrtBackend:
    """Run an ONNX file with onnxruntime on exactly the requested execution provider.

    Args:
        model_path: The .onnx file.
        device: ``cpu`` or ``cuda`` (``auto`` is resolved with :func:`resolve_device`).
        intra_op_threads: Threads inside one operator; None lets onnxruntime decide.
        precision: Reported precision of the model (``fp32`` / ``fp16``).

    Raises:
        BackendError: The provider is not available (the message lists those that are), or the
            file is not a model onnxruntime can load.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "cpu",
        intra_op_threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.model_path = Path(model_path)
        self.device = resolve_device(device)
        self.precision = precision
        self.name = f"ort-{self.device}"
        self.version = f"onnxruntime {ort.__version__}"
        provider = PROVIDERS[self.device]
        available = ort.get_available_providers()
        if provider not in available:
            raise BackendError(self._missing_provider(provider, available))
        self._session = self._make_session(provider, self._options(intra_op_threads))
        actual = self._session.get_providers()
        if not actual or actual[0] != provider:
            raise BackendError(self._missing_provider(provider, available, actual))
        self.input_specs = [_spec(i) for i in self._session.get_inputs()]
        self.output_specs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.output_specs]
        log.info(
            "%s: %s on %s, inputs %s",
            self.name,
            self.model_path,
            actual,
            [s.describe() for s in self.input_specs],
        )

    @staticmethod
    def _options(intra_op_threads: int | None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        return options

    def _provider_list(self, provider: str) -> list:
        """Providers passed to the session; subclasses add options (TensorRT, FP16, ...) here."""
        # CPU stays as the home for the few nodes a GPU provider does not implement; the first
        # provider is still checked to be the one requested.
        return [provider] if provider == PROVIDERS["cpu"] else [provider, PROVIDERS["cpu"]]

    def _make_session(self, provider: str, options: ort.SessionOptions) -> ort.InferenceSession:
        if not self.model_path.is_file():
            raise BackendError(f"{self.model_path}: model file not found")
        try:
            return ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=self._provider_list(provider)
            )
        except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(
                f"{self.model_path}: onnxruntime cannot load it ({first}); re-export the bundle"
            ) from None

    def _missing_provider(self, provider: str, available: list[str], actual: list[str] | None = None) -> str:
        got = f"; the session got {actual}" if actual is not None else ""
        hint = " (install onnxruntime-gpu: pip install 'crc-fusion[gpu]')" if self.device == "cuda" else ""
        return (
            f"device {self.device} needs onnxruntime's {provider}, which is not available{got}; "
            f"available providers: {', '.join(available)}{hint}; or pass --device cpu"
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch after checking names, dtypes and shapes; returns every graph output by name."""
        check_inputs(self.input_specs, inputs)
        outputs = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        """Drop the session (onnxruntime frees it when the last reference goes)."""
        self._session = None

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
