"""Native TensorRT backend: tensorrt + cuda-bindings, no torch, no pycuda.

The engine is deserialized once; pinned host and device buffers are allocated once at the optimization
profile's maximum batch; one stream; input shapes are set per batch and output shapes read back from
the execution context; ``execute_async_v3`` runs on tensor addresses. H2D, compute and D2H are timed
apart with CUDA events (:attr:`TrtBackend.last_timings`). Engines hold exactly one optimization profile
(crc-export builds one; an engine with more is refused). A batch above the profile's maximum is split;
a chunk below its minimum is padded up to it and the padded rows dropped. With ``cuda_graphs=True`` the
first batch of each shape runs as a plain enqueue (TensorRT must see a shape once before capture); the
graph is captured after that batch completes, outside the timed stages, and replayed from the next batch
of that shape on. TensorRT 10 and 11 are told apart with ``hasattr``, never by parsing version strings.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..errors import BackendError
from . import cuda
from .base import Backend, TensorSpec

log = logging.getLogger(__name__)

_INSTALL = "install TensorRT for your CUDA version: pip install 'crc-fusion[trt]'"
_REBUILD = "rebuild the engine on this machine (crc-export RUN --trt) or use --backend ort-cuda"

# TensorRT DataType names -> numpy dtype names (BF16/FP8/INT4 have no numpy twin: refused).
_TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def import_tensorrt():
    """The ``tensorrt`` module, or a one-line BackendError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(f"tensorrt is not installed; {_INSTALL}") from None
    if not hasattr(trt, "Runtime"):  # the PyPI placeholder package has no runtime
        raise BackendError(f"the installed 'tensorrt' package is a placeholder without a runtime; {_INSTALL}")
    return trt


def tensorrt_release(version: str) -> str:
    """``10.8.0.43`` -> ``10.8.0``: engines are tied to major.minor.patch (used in engine names too)."""
    return ".".join(str(version).split(".")[:3])


def engine_mismatches(record: dict | None, device: dict, trt_version: str) -> list[str]:
    """Why an engine built as ``record`` says cannot run on ``device`` with this TensorRT (empty: fine).

    Args:
        record: The artifact's ``engine`` entry (gpu_name, compute_capability, tensorrt_version).
        device: :func:`crc_runtime.backends.cuda.device_info` of the device to run on.
        trt_version: ``tensorrt.__version__`` here.
    """
    if not isinstance(record, dict):
        return ["the manifest has no 'engine' record (gpu_name, compute_capability, tensorrt_version)"]
    reasons = []
    want_cc, want_gpu = record.get("compute_capability"), record.get("gpu_name")
    want_trt = record.get("tensorrt_version")
    if str(want_cc) != device["compute_capability"]:
        reasons.append(f"built for compute capability {want_cc}, this GPU is {device['compute_capability']}")
    if want_gpu != device["name"]:
        reasons.append(f"built on {want_gpu!r}, this GPU is {device['name']!r}")
    if want_trt is None or tensorrt_release(want_trt) != tensorrt_release(trt_version):
        reasons.append(f"built with TensorRT {want_trt}, this is TensorRT {trt_version}")
    return reasons


def _free_batch(dims) -> tuple[int | None, ...]:
    """An engine shape with its dynamic (-1) dimensions as None."""
    return tuple(int(d) if int(d) >= 0 else None for d in dims)


def make_trt_logger(trt, logger: logging.Logger = log):
    """A ``trt.ILogger`` that routes TensorRT's messages into ``logger``.

    TensorRT's INFO is a build diary (tactics, layers), so it goes to DEBUG and ``-v`` stays readable.
    """

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            S = trt.ILogger.Severity
            level = {S.INTERNAL_ERROR: logging.ERROR, S.ERROR: logging.ERROR, S.WARNING: logging.WARNING}
            logger.log(level.get(severity, logging.DEBUG), "TensorRT: %s", msg)

    return _Logger()


class TrtBackend(Backend):
    """Run a serialized TensorRT engine.

    Args:
        engine_path: The ``.plan`` file.
        record: The manifest's ``engine`` record; checked against this GPU and TensorRT first.
        precision: Precision of the engine's artifact (``fp16`` for engines built from model.fp16.onnx).
        cuda_graphs: Capture each batch size's compute once as a CUDA graph and replay it.
        device: CUDA device ordinal.

    Raises:
        BackendError: At :meth:`activate`: tensorrt / cuda-bindings / a GPU missing, an engine for
            another GPU or TensorRT release, an engine TensorRT cannot deserialize, or one with more
            than one optimization profile; one line with what to do.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike,
        record: dict | None,
        precision: str = "fp16",
        cuda_graphs: bool = False,
        device: int = 0,
    ) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.record = record
        self.gpu = int(device)
        self.cuda_graphs = bool(cuda_graphs)
        self.name = "trt"
        self.device = f"cuda:{self.gpu}"
        # An engine built with the TF32 flag may run its FP32 layers in TF32 (crc-export clears it).
        tf32 = isinstance(record, dict) and record.get("tf32") is True
        self.precision = "tf32" if tf32 and precision == "fp32" else precision
        self.timing_method = "CUDA events on the backend's stream around H2D, compute and D2H"
        self.capture_seconds = 0.0  # CUDA graph captures, kept out of every timed stage

    def _activate(self) -> None:
        trt = self._trt = import_tensorrt()
        rt = cuda.cudart()
        self.device_info = cuda.device_info(self.gpu)
        self.version = f"TensorRT {trt.__version__}"
        reasons = engine_mismatches(self.record, self.device_info, trt.__version__)
        if reasons:
            raise BackendError(f"{self.engine_path}: cannot run here: {'; '.join(reasons)}; {_REBUILD}")
        cuda.check(rt.cudaSetDevice(self.gpu), "cudaSetDevice")
        self._logger = make_trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{self.engine_path}: TensorRT cannot deserialize this engine; {_REBUILD}")
        profiles = int(self.engine.num_optimization_profiles)
        if profiles != 1:
            self.engine = None
            raise BackendError(
                f"{self.engine_path}: the engine has {profiles} optimization profiles; crc-infer runs "
                f"engines with exactly one (as crc-export builds them); {_REBUILD}"
            )
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(4)]
        self._graphs: dict[tuple, cuda.Graph] = {}
        self._host: dict[str, cuda.PinnedBuffer] = {}
        self._dev: dict[str, cuda.DeviceBuffer] = {}
        try:
            self._setup_io()
        except BaseException:
            self._deactivate()
            raise

    def _dtype(self, name: str) -> str:
        dtype = self.engine.get_tensor_dtype(name)
        np_name = _TRT_DTYPES.get(getattr(dtype, "name", str(dtype)).upper())
        if np_name is None:
            raise BackendError(f"{self.engine_path}: tensor {name} has type {dtype}, which numpy cannot hold")
        return np_name

    def _setup_io(self) -> None:
        trt, engine = self._trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_specs, self.output_specs = [], []
        max_shapes = {}
        for n in (n for n in names if is_input[n]):
            shape = _free_batch(engine.get_tensor_shape(n))
            min_shape, _, max_shape = engine.get_tensor_profile_shape(n, 0)
            self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
            self.input_specs.append(TensorSpec(n, self._dtype(n), shape))
            max_shapes[n] = tuple(int(d) for d in max_shape)
            self._set_input_shape(n, max_shapes[n])
        # Output sizes at the profile's maximum come from the context once every input shape is set.
        for n in (n for n in names if not is_input[n]):
            self.output_specs.append(TensorSpec(n, self._dtype(n), _free_batch(engine.get_tensor_shape(n))))
            max_shapes[n] = tuple(int(d) for d in self.context.get_tensor_shape(n))
        for spec in self.input_specs + self.output_specs:
            count = int(np.prod(max_shapes[spec.name]))
            self._host[spec.name] = cuda.PinnedBuffer(count, spec.dtype)
            self._dev[spec.name] = cuda.DeviceBuffer(self._host[spec.name].nbytes)
            # Addresses never change (buffers live as long as the backend), so CUDA graphs stay valid.
            if not self.context.set_tensor_address(spec.name, int(self._dev[spec.name].ptr)):
                raise BackendError(f"{self.engine_path}: TensorRT refused the device address of {spec.name}")
        log.info(
            "trt: %s on %s, batch %d..%d, inputs %s",
            self.engine_path.name,
            self.device_info["name"],
            self.min_batch,
            self.max_batch,
            [s.describe() for s in self.input_specs],
        )

    def _set_input_shape(self, name: str, shape: tuple) -> None:
        """Set one input's shape on the context; TensorRT answers False (and logs why) for a bad one."""
        if not self.context.set_input_shape(name, shape):
            raise BackendError(
                f"{self.engine_path}: TensorRT refused shape {list(shape)} for input {name} "
                f"(profile batch {self.min_batch}..{self.max_batch}; see the log)"
            )

    def _enqueue(self) -> None:
        if hasattr(self.context, "execute_async_v3"):  # TensorRT 10 and 11
            ok = self.context.execute_async_v3(int(self.stream.handle))  # TensorRT takes the raw handle
        else:  # pragma: no cover - TensorRT < 10 is not supported by the exporter either
            raise BackendError(f"TensorRT {self._trt.__version__} has no execute_async_v3; {_INSTALL}")
        if not ok:
            raise BackendError(f"{self.engine_path}: TensorRT failed to enqueue the batch (see the log)")

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One chunk within the profile: copies in, compute, copies out, timed with CUDA events."""
        e0, e1, e2, e3 = self._events
        for spec in self.input_specs:
            array = inputs[spec.name]
            self._host[spec.name].view(array.shape)[...] = array
            self._set_input_shape(spec.name, array.shape)
        key = tuple(inputs[s.name].shape for s in self.input_specs)
        graph = self._graphs.get(key) if self.cuda_graphs else None
        e0.record(self.stream)
        for spec in self.input_specs:
            nbytes = inputs[spec.name].nbytes
            cuda.copy_htod_async(self._dev[spec.name], self._host[spec.name], nbytes, self.stream)
        e1.record(self.stream)
        if graph is not None:
            graph.launch(self.stream)
        else:
            self._enqueue()  # also the first run of a new shape, which TensorRT needs before a capture
        e2.record(self.stream)
        shapes = {s.name: tuple(self.context.get_tensor_shape(s.name)) for s in self.output_specs}
        for spec in self.output_specs:
            nbytes = int(np.prod(shapes[spec.name])) * np.dtype(spec.dtype).itemsize
            cuda.copy_dtoh_async(self._host[spec.name], self._dev[spec.name], nbytes, self.stream)
        e3.record(self.stream)
        self.stream.synchronize()  # the one sync point per batch: outputs are complete after it
        self.last_timings = {
            "h2d_ms": e1.elapsed_ms(e0),
            "compute_ms": e2.elapsed_ms(e1),
            "d2h_ms": e3.elapsed_ms(e2),
        }
        outputs = {s.name: self._host[s.name].view(shapes[s.name]).copy() for s in self.output_specs}
        if self.cuda_graphs and graph is None:
            # Captured after the batch is done: capture enqueues nothing that runs, so no batch runs
            # twice, and its cost is in capture_seconds, not in compute. Shapes and addresses are
            # those just used, which is what the graph replays.
            t0 = time.perf_counter()
            self._graphs[key] = cuda.Graph.capture(self.stream, self._enqueue)
            self.capture_seconds += time.perf_counter() - t0
        return outputs

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """(start, stop) of each engine call for a batch of ``n``: at most ``max_batch`` pairs each."""
        return [(i, min(i + self.max_batch, n)) for i in range(0, n, self.max_batch)]

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: split at the profile's maximum, a short chunk padded up to its minimum."""
        n = next(iter(inputs.values())).shape[0]
        results, timings = [], []
        for start, stop in self._chunks(n):
            chunk = {k: v[start:stop] for k, v in inputs.items()}
            short = self.min_batch - (stop - start)
            if short > 0:  # TensorRT refuses a shape below the profile; zeros fill it, their rows are dropped
                chunk = {
                    k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()
                }
            out = self._run(chunk)
            results.append({k: v[: stop - start] for k, v in out.items()} if short > 0 else out)
            timings.append(self.last_timings)
        if len(results) == 1:
            return results[0]
        self.last_timings = {k: sum(t[k] for t in timings) for k in timings[0]}
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

    def _deactivate(self) -> None:
        """Free graphs, buffers, events, the stream, then the context and the engine."""
        for graph in self._graphs.values():
            graph.close()
        self._graphs = {}
        for buf in [*self._host.values(), *self._dev.values()]:
            buf.close()
        self._host, self._dev = {}, {}
        for event in self._events:
            event.close()
        self._events = []
        self.stream.close()
        self.context = self.engine = None
