"""onnxruntime backend: one InferenceSession on the provider asked for.

A provider named by the caller never falls back; only ``device="auto"`` does, to the CPU, with a warning,
when onnxruntime lists the CUDA provider but cannot start it (onnxruntime-gpu without a usable GPU or CUDA).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BackendError
from .base import TensorSpec, check_inputs

log = logging.getLogger(__name__)


class ProviderStartError(BackendError):
    """The provider is in this onnxruntime build but the session could not use it (no GPU, no CUDA libs)."""


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
        io_binding: Preallocated device OrtValues per batch size (default: on for CUDA).
        inter_op_threads: Threads across operators (sequential execution uses one).
        spinning: Let idle intra-op threads spin (lowest latency on a dedicated machine).

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
        io_binding: bool | None = None,
        inter_op_threads: int = 1,
        spinning: bool = True,
    ) -> None:
        self.model_path = Path(model_path)
        self.device = resolve_device(device)
        self.precision = precision
        self.version = f"onnxruntime {ort.__version__}"
        self.last_timings: dict[str, float] = {}
        self.timing_method = (
            "host wall clock around each step (onnxruntime synchronizes its stream at the end of a run)"
        )
        provider = PROVIDERS[self.device]
        available = ort.get_available_providers()
        if provider not in available:
            raise BackendError(self._missing_provider(provider, available))
        self._session = self._make_session(
            provider, self._options(intra_op_threads, inter_op_threads, spinning)
        )
        actual = self._session.get_providers()
        if not actual or actual[0] != provider:
            if device != "auto":  # a provider that was asked for by name never falls back
                raise ProviderStartError(self._missing_provider(provider, available, actual))
            # "auto" means the CUDA provider if it starts: onnxruntime already made a CPU session.
            log.warning(
                "%s: onnxruntime's %s did not start here; running on the CPU", self.model_path, provider
            )
            self.device = "cpu"
        self.name = f"ort-{self.device}"
        # I/O binding keeps inputs and outputs in preallocated OrtValues on the device: the default on
        # CUDA (no per-call allocation, copies timed apart); on CPU it buys nothing but can be tested.
        self.io_binding = self.device == "cuda" if io_binding is None else bool(io_binding)
        self.input_specs = [_spec(i) for i in self._session.get_inputs()]
        self.output_specs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.output_specs]
        self._ort_device = "cuda" if self.device == "cuda" else "cpu"
        self._bound: dict[int, tuple] = {}  # batch size -> (binding, input OrtValues, output OrtValues)
        log.info(
            "%s: %s on %s, inputs %s",
            self.name,
            self.model_path,
            actual,
            [s.describe() for s in self.input_specs],
        )

    @staticmethod
    def _options(
        intra_op_threads: int | None, inter_op_threads: int = 1, spinning: bool = True
    ) -> ort.SessionOptions:
        """Tuned for a one-model, one-batch-at-a-time server: the speed settings benchmarks/ measured."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A ResNet is a chain: running independent nodes in parallel only adds scheduling overhead,
        # so one sequential stream of nodes, each using every intra-op thread.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = int(inter_op_threads)
        if not spinning:  # idle threads sleep instead of spinning: kinder to CPUs shared with other jobs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads:  # else onnxruntime's default: one thread per physical core
            options.intra_op_num_threads = int(intra_op_threads)
        return options

    def _provider_list(self, provider: str) -> list:
        """Providers passed to the session, with their options."""
        # CPU stays as the home for the few nodes a GPU provider does not implement; the first
        # provider is still checked to be the one requested.
        if provider == PROVIDERS["cpu"]:
            return [provider]
        cuda_options = {
            "device_id": 0,
            "cudnn_conv_algo_search": "EXHAUSTIVE",  # pays once at the first batch of each shape
            "cudnn_conv_use_max_workspace": "1",
            "do_copy_in_default_stream": "1",
        }
        return [(provider, cuda_options), PROVIDERS["cpu"]]

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
        if actual is not None:  # in this onnxruntime build, but the session could not use it
            return (
                f"onnxruntime's {provider} is installed but did not start here (the session got {actual}; "
                "onnxruntime's own log lines above say why, usually CUDA or cuDNN libraries it cannot "
                "find or no usable GPU); fix the CUDA install, or use --backend ort-cpu (--device cpu)"
            )
        hint = " (install onnxruntime-gpu: pip install 'crc-fusion[gpu]')" if self.device == "cuda" else ""
        return (
            f"device {self.device} needs onnxruntime's {provider}, which is not available; "
            f"available providers: {', '.join(available)}{hint}; or use --backend ort-cpu (--device cpu)"
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch after checking names, dtypes and shapes; returns every graph output by name.

        :attr:`last_timings` holds ``compute_ms`` and, with I/O binding, ``h2d_ms`` and ``d2h_ms``.
        """
        check_inputs(self.input_specs, inputs)
        if self.io_binding:
            return self._infer_bound(inputs)
        t0 = time.perf_counter()
        outputs = self._session.run(self._output_names, inputs)
        self.last_timings = {"compute_ms": (time.perf_counter() - t0) * 1e3}
        return dict(zip(self._output_names, outputs, strict=True))

    def _binding_for(self, n: int) -> tuple:
        """Binding and OrtValues for batch size ``n``, allocated on the device when ``n`` is first seen."""
        if n not in self._bound:
            binding = self._session.io_binding()
            ins = {}
            for spec in self.input_specs:
                shape = [n, *(int(d) for d in spec.shape[1:])]
                ins[spec.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, np.dtype(spec.dtype), self._ort_device, 0
                )
                binding.bind_ortvalue_input(spec.name, ins[spec.name])
            outs = {}
            for spec in self.output_specs:
                if all(isinstance(d, int) for d in spec.shape[1:]):
                    shape = [n, *spec.shape[1:]]
                    outs[spec.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                        shape, np.dtype(spec.dtype), self._ort_device, 0
                    )
                    binding.bind_ortvalue_output(spec.name, outs[spec.name])
                else:  # a free non-batch dimension: let onnxruntime allocate it on the device
                    binding.bind_output(spec.name, self._ort_device)
            # Few distinct sizes occur (the batch size and one remainder); keep the two most recent.
            if len(self._bound) >= 2:
                self._bound.pop(next(iter(self._bound)))
            self._bound[n] = (binding, ins, outs)
        return self._bound[n]

    def _infer_bound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(inputs.values())).shape[0]
        binding, ins, outs = self._binding_for(n)
        t0 = time.perf_counter()
        for name, value in ins.items():
            value.update_inplace(np.ascontiguousarray(inputs[name]))
        binding.synchronize_inputs()
        t1 = time.perf_counter()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        t2 = time.perf_counter()
        if len(outs) == len(self.output_specs):
            # On the CPU device numpy() aliases the bound buffer, which the next call overwrites.
            copy = self._ort_device == "cpu"
            result = {n: (outs[n].numpy().copy() if copy else outs[n].numpy()) for n in self._output_names}
        else:
            result = dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))
        t3 = time.perf_counter()
        self.last_timings = {
            "h2d_ms": (t1 - t0) * 1e3,
            "compute_ms": (t2 - t1) * 1e3,
            "d2h_ms": (t3 - t2) * 1e3,
        }
        return result

    def close(self) -> None:
        """Drop the session and bound buffers (onnxruntime frees them when the last reference goes)."""
        self._bound = {}
        self._session = None

    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
