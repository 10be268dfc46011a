"""onnxruntime backend: one InferenceSession on exactly the provider asked for, CPU or CUDA.

It never falls back: a CUDA provider that is missing, or listed but unable to start, is an error
(:class:`ProviderStartError` for the second, so :func:`crc_runtime.backends.open_backend` can apply its
fallback policy). TF32: onnxruntime's CUDA provider runs FP32 convolutions and matmuls in TF32 by
default on Ampere and newer GPUs (10-bit mantissa inputs), enough to move resnet50 logits by more than
the FP32 parity gate's 1e-3; so TF32 is off (``use_tf32=0``) unless asked for, and a session that allows
it reports precision ``tf32``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BackendError
from .base import Backend, TensorSpec, cpu_info

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


def _spec(node) -> TensorSpec:
    dtype = _ORT_DTYPES.get(node.type, node.type)
    shape = tuple(d if isinstance(d, int) else (d or None) for d in node.shape)
    return TensorSpec(node.name, dtype, shape)


class OrtBackend(Backend):
    """Run an ONNX file with onnxruntime on exactly the requested execution provider.

    Args:
        model_path: The .onnx file.
        device: ``cpu`` or ``cuda``.
        gpu: CUDA device ordinal (``cuda`` only).
        intra_op_threads: Threads inside one operator; None lets onnxruntime decide.
        precision: Precision of the model file (``fp32`` / ``fp16`` / ``int8``).
        tf32: Let the CUDA provider run FP32 math in TF32 (faster, less exact; reported as precision
            ``tf32`` for an FP32 model). Off for parity runs.
        io_binding: Preallocated device OrtValues per batch size (default: on for CUDA).
        inter_op_threads: Threads across operators (sequential execution uses one).
        spinning: Let idle intra-op threads spin (lowest latency on a dedicated machine).

    Raises:
        BackendError: At :meth:`activate`: the provider is not available (the message lists those
            that are), it did not start (:class:`ProviderStartError`), or the file is not a model
            onnxruntime can load.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "cpu",
        *,
        gpu: int = 0,
        intra_op_threads: int | None = None,
        precision: str = "fp32",
        tf32: bool = False,
        io_binding: bool | None = None,
        inter_op_threads: int = 1,
        spinning: bool = True,
    ) -> None:
        super().__init__()
        if device not in PROVIDERS:
            raise BackendError(f"onnxruntime device {device!r} is not one of {', '.join(PROVIDERS)}")
        self.model_path = Path(model_path)
        self.gpu = int(gpu) if device == "cuda" else 0
        self.tf32 = bool(tf32) and device == "cuda"
        self.name = f"ort-{device}"
        self.device = "cpu" if device == "cpu" else f"cuda:{self.gpu}"
        self.precision = "tf32" if self.tf32 and precision == "fp32" else precision
        self.version = f"onnxruntime {ort.__version__}"
        self.max_batch = None  # a dynamic batch: any size in one call
        self.timing_method = (
            "host wall clock around each step (onnxruntime synchronizes its stream at the end of a run)"
        )
        self._provider = PROVIDERS[device]
        self._ort_device = device
        self._threads = (intra_op_threads, inter_op_threads, spinning)
        # I/O binding keeps inputs and outputs in preallocated OrtValues on the device: the default on
        # CUDA (no per-call allocation, copies timed apart); on CPU it buys nothing but can be tested.
        self.io_binding = device == "cuda" if io_binding is None else bool(io_binding)
        self._session: ort.InferenceSession | None = None
        self._bound: dict[int, tuple] = {}  # batch size -> (binding, input OrtValues, output OrtValues)

    def providers(self) -> list:
        """The providers (with their options) the session is made with."""
        # CPU stays as the home for the few nodes a GPU provider does not implement; the first
        # provider is still checked to be the one requested.
        if self._provider == PROVIDERS["cpu"]:
            return [self._provider]
        cuda_options = {
            "device_id": str(self.gpu),
            "use_tf32": "1" if self.tf32 else "0",  # on by default in onnxruntime: FP32 parity needs it off
            "cudnn_conv_algo_search": "EXHAUSTIVE",  # pays once at the first batch of each shape
            "cudnn_conv_use_max_workspace": "1",
            "do_copy_in_default_stream": "1",
        }
        return [(self._provider, cuda_options), PROVIDERS["cpu"]]

    def _activate(self) -> None:
        available = ort.get_available_providers()
        if self._provider not in available:
            raise BackendError(self._missing_provider(available))
        self._session = self._make_session(self._options(*self._threads))
        actual = self._session.get_providers()
        if not actual or actual[0] != self._provider:
            self._session = None
            raise ProviderStartError(self._missing_provider(available, actual))
        self.input_specs = [_spec(i) for i in self._session.get_inputs()]
        self.output_specs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.output_specs]
        self.device_info = cpu_info() if self._ort_device == "cpu" else _gpu_info(self.gpu)
        log.info(
            "%s: %s on %s (%s), inputs %s",
            self.name,
            self.model_path,
            actual,
            self.precision,
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

    def _make_session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        if not self.model_path.is_file():
            raise BackendError(f"{self.model_path}: model file not found")
        try:
            return ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=self.providers()
            )
        except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(
                f"{self.model_path}: onnxruntime cannot load it ({first}); re-export the bundle"
            ) from None

    def _missing_provider(self, available: list[str], actual: list[str] | None = None) -> str:
        provider = self._provider
        if actual is not None:  # in this onnxruntime build, but the session could not use it
            return (
                f"onnxruntime's {provider} is installed but did not start here (the session got {actual}; "
                "onnxruntime's own log lines above say why, usually CUDA or cuDNN libraries it cannot "
                "find or no usable GPU); fix the CUDA install, or use --device cpu"
            )
        hint = (
            " (install onnxruntime-gpu: pip install 'crc-fusion[gpu]')" if self._ort_device == "cuda" else ""
        )
        return (
            f"{self.name} needs onnxruntime's {provider}, which is not available; "
            f"available providers: {', '.join(available)}{hint}; or use --device cpu"
        )

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:attr:`last_timings` holds ``compute_ms`` and, with I/O binding, ``h2d_ms`` and ``d2h_ms``."""
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
                    shape, np.dtype(spec.dtype), self._ort_device, self.gpu
                )
                binding.bind_ortvalue_input(spec.name, ins[spec.name])
            outs = {}
            for spec in self.output_specs:
                if all(isinstance(d, int) for d in spec.shape[1:]):
                    shape = [n, *spec.shape[1:]]
                    outs[spec.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                        shape, np.dtype(spec.dtype), self._ort_device, self.gpu
                    )
                    binding.bind_ortvalue_output(spec.name, outs[spec.name])
                else:  # a free non-batch dimension: let onnxruntime allocate it on the device
                    binding.bind_output(spec.name, self._ort_device, self.gpu)
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

    def _deactivate(self) -> None:
        """Drop the session and bound buffers (onnxruntime frees them when the last reference goes)."""
        self._bound = {}
        self._session = None


def _gpu_info(gpu: int) -> dict:
    """The GPU's name and capability through cuda-bindings when installed (onnxruntime does not say)."""
    from . import cuda

    return cuda.describe(gpu)
