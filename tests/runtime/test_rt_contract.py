"""The backend contract, and the GPU backends' own logic run on stand-ins for what this machine lacks.

TensorRT and a GPU are not here, so the TensorRT backend runs on a fake ``tensorrt`` module and a fake
``crc_runtime.backends.cuda`` whose "device memory" is numpy; onnxruntime's CUDA path runs on a real CPU
session that reports the CUDA provider. What is checked is the code of crc-infer: which shapes reach
TensorRT, how often a batch runs, what is inside the timed stages, which options onnxruntime gets, and
the metadata every backend sets. Where a CUDA device is (``gpu`` marker), the same TensorRT backend also runs
on real CUDA memory, streams, events and graphs, with the stand-in engine copying bytes on the GPU. The GPU
runs of the real libraries are in test_rt_backends_gpu.py (``gpu`` / ``trt``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from crc_runtime.backends import base, cuda, open_backend
from crc_runtime.backends import tensorrt as trt_backend
from crc_runtime.backends.base import METADATA, Backend
from crc_runtime.backends.onnxruntime import OrtBackend
from crc_runtime.backends.tensorrt import TrtBackend
from crc_runtime.bundle import load_bundle
from crc_runtime.cli import cli
from crc_runtime.errors import BackendError
from crc_runtime.validate import validate_bundle

SIZE, CLASSES = 8, 9
RECORD = {"gpu_name": "Fake GPU", "compute_capability": "9.0", "tensorrt_version": "10.13.0.35"}


# ----------------------------------------------------------------------------------------------------
# A fake CUDA device and a fake TensorRT engine of the tiny model's interface.


class Device:
    """Device memory (address -> bytes) and a log of what reaches the stream, in order."""

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self.log: list[tuple] = []
        self.capturing = self.replaying = False
        self._address = itertools.count(0x1000, 0x1000)

    def alloc(self, nbytes: int) -> int:
        ptr = next(self._address)
        self.mem[ptr] = np.zeros(max(nbytes, 1), np.uint8)
        return ptr


def fake_cuda(device: Device) -> SimpleNamespace:
    """What TrtBackend uses of crc_runtime.backends.cuda, over ``device``."""

    class Owned:
        def close(self) -> None:
            pass

    class Stream(Owned):
        handle = 7

        def synchronize(self) -> None:
            device.log.append(("sync",))

    class Event(Owned):
        def record(self, stream) -> None:
            self.at = len(device.log)
            device.log.append(("record", id(self)))

        def elapsed_ms(self, start) -> float:
            return float(self.at - start.at)  # "time" = entries logged in between

    class PinnedBuffer(Owned):
        def __init__(self, count, dtype) -> None:
            self.array = np.zeros(int(count), dtype)
            self.nbytes = self.array.nbytes

        def view(self, shape):
            return self.array[: int(np.prod(shape))].reshape(shape)

    class DeviceBuffer(Owned):
        def __init__(self, nbytes) -> None:
            self.nbytes, self.ptr = int(nbytes), device.alloc(int(nbytes))

    class Graph(Owned):
        def __init__(self, work) -> None:
            self.work = work

        @classmethod
        def capture(cls, stream, work):
            device.capturing = True
            try:
                work()
            finally:
                device.capturing = False
            device.log.append(("capture",))
            return cls(work)

        def launch(self, stream) -> None:
            device.replaying = True
            try:
                self.work()
            finally:
                device.replaying = False

    def htod(dst, src, nbytes, stream):
        device.mem[dst.ptr][:nbytes] = src.array.view(np.uint8)[:nbytes]
        device.log.append(("h2d", nbytes))

    def dtoh(dst, src, nbytes, stream):
        dst.array.view(np.uint8)[:nbytes] = device.mem[src.ptr][:nbytes]
        device.log.append(("d2h", nbytes))

    return SimpleNamespace(
        cudart=lambda: SimpleNamespace(cudaSetDevice=lambda n: (0,)),
        check=cuda.check,
        device_info=lambda n=0: {"index": n, "name": "Fake GPU", "compute_capability": "9.0"},
        Stream=Stream,
        Event=Event,
        PinnedBuffer=PinnedBuffer,
        DeviceBuffer=DeviceBuffer,
        Graph=Graph,
        copy_htod_async=htod,
        copy_dtoh_async=dtoh,
    )


def fake_logits(pathology: np.ndarray) -> np.ndarray:
    """What the fake engine computes: the mean of each pathology image plus the class index."""
    means = pathology.reshape(len(pathology), -1).astype(np.float32).mean(axis=1)
    return (means[:, None] + np.arange(CLASSES, dtype=np.float32)).astype(np.float32)


def fake_execute(device: Device):
    """The fake engine's compute on the numpy device: :func:`fake_logits`, logged."""

    def execute(context, stream_handle) -> bool:
        if device.capturing:  # captured work is recorded, not run
            device.log.append(("captured",))
            return True
        n = context.shapes["pathology"][0]
        raw = device.mem[context.addresses["pathology"]][: n * SIZE * SIZE * 3]
        logits = fake_logits(raw.reshape(n, SIZE, SIZE, 3))
        device.mem[context.addresses["logits"]][: logits.nbytes] = logits.view(np.uint8).reshape(-1)
        device.log.append(("replay" if device.replaying else "execute", n))
        return True

    return execute


def fake_tensorrt(execute, min_batch: int = 1, max_batch: int = 8, profiles: int = 1, log=None):
    """A ``tensorrt`` module whose engine has the tiny model's inputs and a [min, max] batch profile.

    Args:
        execute: ``execute(context, stream_handle) -> bool``, the engine's compute (the context has
            ``shapes`` and ``addresses`` by tensor name).
        log: A list that gets ``("shape", name, shape)`` for every shape the backend sets.
    """
    dims = {"pathology": (SIZE, SIZE, 3), "radiology": (SIZE, SIZE, 1), "logits": (CLASSES,)}
    dtypes = {"pathology": "UINT8", "radiology": "UINT8", "logits": "FLOAT"}

    class Context:
        def __init__(self) -> None:
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            if log is not None:
                log.append(("shape", name, tuple(shape)))
            if not min_batch <= shape[0] <= max_batch:
                return False  # what TensorRT answers for a shape outside the profile
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shapes["pathology"][0], *dims[name]) if name == "logits" else self.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            return execute(self, stream_handle)

    class Engine:
        num_io_tensors = 3
        num_optimization_profiles = profiles

        def get_tensor_name(self, i):
            return list(dims)[i]

        def get_tensor_mode(self, name):
            return "in" if name != "logits" else "out"

        def get_tensor_shape(self, name):
            return (-1, *dims[name])

        def get_tensor_profile_shape(self, name, profile):
            return [(b, *dims[name]) for b in (min_batch, min_batch, max_batch)]

        def get_tensor_dtype(self, name):
            return SimpleNamespace(name=dtypes[name])

        def create_execution_context(self):
            return Context()

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    return SimpleNamespace(
        __version__="10.13.0.35", Runtime=Runtime, ILogger=ILogger, TensorIOMode=SimpleNamespace(INPUT="in")
    )


@pytest.fixture
def device(monkeypatch) -> Device:
    dev = Device()
    monkeypatch.setattr(trt_backend, "cuda", fake_cuda(dev))
    return dev


def _trt(monkeypatch, device, tmp_path, cuda_graphs=False, gpu=0, **profile) -> TrtBackend:
    fake = fake_tensorrt(fake_execute(device), log=device.log, **profile)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    plan = tmp_path / "fake.plan"
    plan.write_bytes(b"engine")
    return TrtBackend(plan, RECORD, precision="fp16", cuda_graphs=cuda_graphs, device=gpu)


def _pairs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pathology": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "radiology": rng.integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8),
    }


# ----------------------------------------------------------------------------------------------------
# The contract.


class _FakeCudaSession:
    """An onnxruntime session that says it runs on CUDA while a real CPU session does the work."""

    made: list[list] = []

    def __init__(self, path, sess_options=None, providers=None) -> None:
        type(self).made.append(providers)
        self._providers = [p[0] if isinstance(p, tuple) else p for p in providers]
        self._real = _REAL_SESSION(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return self._providers

    def __getattr__(self, name):
        return getattr(self._real, name)


_REAL_SESSION = ort.InferenceSession
_REAL_ORTVALUE = ort.OrtValue.ortvalue_from_shape_and_type


@pytest.fixture
def fake_ort_cuda(monkeypatch):
    """onnxruntime-gpu on a working GPU, played by the CPU build; returns the OrtValue placements made."""
    placements: list[tuple[str, int]] = []

    def ortvalue(shape, dtype, device_type="cpu", device_id=0):
        placements.append((device_type, device_id))
        return _REAL_ORTVALUE(shape, dtype, "cpu", 0)

    _FakeCudaSession.made = []
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", _FakeCudaSession)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", staticmethod(ortvalue))
    return placements


def _backend_classes() -> set[type]:
    found, todo = set(), [Backend]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("crc_runtime.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_backend_class_sets_the_contract_metadata(tiny, monkeypatch, device, tmp_path, fake_ort_cuda):
    """Walk every Backend subclass of the runtime; each is activated and must carry all METADATA."""
    makers = {
        OrtBackend: [
            lambda: OrtBackend(tiny.bundle / "model.onnx", "cpu", intra_op_threads=1),
            lambda: OrtBackend(tiny.bundle / "model.onnx", "cuda", gpu=1),
        ],
        TrtBackend: [lambda: _trt(monkeypatch, device, tmp_path)],
    }
    assert _backend_classes() == set(makers), "a new Backend class needs a maker here"
    for cls, variants in makers.items():
        for make in variants:
            backend = make()
            with pytest.raises(BackendError, match="before activate"):
                backend.infer(_pairs(1))
            with backend:
                assert isinstance(backend, cls) and backend.active
                for key in METADATA:
                    assert hasattr(backend, key), (cls.__name__, key)
                assert backend.name in ("ort-cpu", "ort-cuda", "trt")
                assert re.fullmatch(r"cpu|cuda:\d+", backend.device)
                assert backend.precision in base.PRECISIONS
                assert backend.version and backend.timing_method and backend.device_info["name"]
                assert backend.max_batch is None or backend.max_batch >= 1
                out = backend.infer(_pairs(3))
                assert out["logits"].shape == (3, CLASSES) and backend.last_timings
            assert not backend.active


def test_a_backend_missing_metadata_breaks_the_contract():
    class Incomplete(Backend):
        name, device, precision = "x", "cpu", "fp32"

        def _activate(self):
            self.input_specs = self.output_specs = []

        def _infer(self, inputs):
            return {}

        def _deactivate(self):
            pass

    with pytest.raises(TypeError, match="version, max_batch, timing_method, device_info"):
        Incomplete().activate()


def test_no_backend_probing_outside_the_backends():
    """Callers read the contract's metadata; only crc_runtime.backends knows which backend is which."""
    root = Path(__file__).resolve().parents[2]
    files = [*(root / "runtime" / "crc_runtime").glob("*.py"), *(root / "benchmarks").glob("*.py")]
    pattern = re.compile(r"getattr\(\s*(backend|selection|b)\b|\.name\s*==\s*[\"']trt[\"']")
    offenders = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
                 if pattern.search(line)]  # fmt: skip
    assert not offenders


# ----------------------------------------------------------------------------------------------------
# TensorRT backend.


def test_trt_refuses_an_engine_with_several_profiles(monkeypatch, device, tmp_path):
    backend = _trt(monkeypatch, device, tmp_path, profiles=2)
    with pytest.raises(BackendError) as exc:
        backend.activate()
    assert "2 optimization profiles" in str(exc.value) and "\n" not in str(exc.value)
    assert not backend.active


@pytest.mark.parametrize("n", [1, 3, 4, 8, 10, 17])
def test_trt_never_sends_a_chunk_below_the_profile_minimum(monkeypatch, device, tmp_path, n):
    """Profile 4..8: a short batch or tail chunk is padded to 4 and its padding rows are dropped."""
    inputs = _pairs(n, seed=n)
    with _trt(monkeypatch, device, tmp_path, min_batch=4, max_batch=8) as backend:
        device.log.clear()
        out = backend.infer(inputs)["logits"]
    np.testing.assert_allclose(out, fake_logits(inputs["pathology"]), rtol=1e-6)
    sent = [entry[2][0] for entry in device.log if entry[0] == "shape"]
    assert sent and all(4 <= b <= 8 for b in sent), sent
    assert sum(e[1] for e in device.log if e[0] == "execute") == sum(
        max(4, min(8, n - i)) for i in range(0, n, 8)
    )


def test_trt_cuda_graphs_run_each_batch_once_and_keep_capture_out_of_compute(monkeypatch, device, tmp_path):
    inputs = _pairs(5)
    with _trt(monkeypatch, device, tmp_path, cuda_graphs=True) as backend:
        device.log.clear()
        first = backend.infer(inputs)["logits"]
        calls = list(device.log)
        runs = [e for e in calls if e[0] in ("execute", "replay")]
        assert runs == [("execute", 5)]  # the first batch of a shape runs once, as a plain enqueue
        records = [i for i, e in enumerate(calls) if e[0] == "record"]
        capture = calls.index(("capture",))
        assert capture > records[-1] and ("sync",) in calls[:capture]  # captured after the batch is done
        compute = calls[records[1] + 1 : records[2]]  # between the events around compute
        assert compute == [("execute", 5)] and backend.last_timings["compute_ms"] == 2.0
        device.log.clear()
        again = backend.infer(inputs)["logits"]
        assert [e for e in device.log if e[0] in ("execute", "replay", "capture")] == [("replay", 5)]
        assert backend.capture_seconds >= 0
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, fake_logits(inputs["pathology"]), rtol=1e-6)


def test_trt_reports_its_gpu(monkeypatch, device, tmp_path):
    with _trt(monkeypatch, device, tmp_path, gpu=3) as backend:
        assert backend.device == "cuda:3" and backend.device_info["index"] == 3
        assert backend.precision == "fp16" and backend.max_batch == 8


# ----------------------------------------------------------------------------------------------------
# onnxruntime CUDA: TF32 and the GPU ordinal.


def test_ort_cuda_options_tf32_off_for_parity_and_the_gpu_ordinal(tiny):
    model = tiny.bundle / "model.onnx"
    parity = OrtBackend(model, "cuda", gpu=2)
    (provider, options), cpu = parity.providers()
    assert provider == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert options["use_tf32"] == "0" and options["device_id"] == "2"
    assert (parity.precision, parity.device) == ("fp32", "cuda:2")
    speed = OrtBackend(model, "cuda", tf32=True)
    assert speed.providers()[0][1]["use_tf32"] == "1" and speed.precision == "tf32"
    assert OrtBackend(model, "cuda", tf32=True, precision="fp16").precision == "fp16"
    assert OrtBackend(model, "cpu", tf32=True).providers() == ["CPUExecutionProvider"]
    assert OrtBackend(model, "cpu", tf32=True).precision == "fp32"  # TF32 is a GPU mode only


def test_gpu_flag_reaches_onnxruntime_and_the_report(tiny, tmp_path, fake_ort_cuda):
    report = tmp_path / "run.json"
    result = CliRunner().invoke(
        cli,
        [str(tiny.csv_dir), "--bundle", str(tiny.bundle), "--backend", "ort-cuda", "--gpu", "1",
         "--output", str(tmp_path / "p.csv"), "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (providers,) = _FakeCudaSession.made
    assert providers[0][1]["device_id"] == "1" and providers[0][1]["use_tf32"] == "0"
    assert fake_ort_cuda and set(fake_ort_cuda) == {("cuda", 1)}  # I/O binding buffers on GPU 1
    data = json.loads(report.read_text())
    assert data["backend"]["device"] == "cuda:1" and data["backend"]["precision"] == "fp32"
    assert data["environment"]["gpu"]["index"] == 1
    assert "device cuda:1" in result.output


def test_bench_tf32_is_reported(tiny, tmp_path, fake_ort_cuda):
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        ["bench", "--bundle", str(tiny.bundle), "--backend", "ort-cuda", "--tf32", "--batch-sizes", "2",
         "--iterations", "2", "--warmup-iters", "1", "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _FakeCudaSession.made[0][0][1]["use_tf32"] == "1"
    assert json.loads(report.read_text())["backend"]["precision"] == "tf32"


def test_validate_runs_fp32_on_cuda_with_tf32_off(tiny, fake_ort_cuda):
    (row,) = validate_bundle(load_bundle(tiny.bundle), "auto")
    assert row["passed"] is True and row["backend"] == "ort-cuda"
    assert all(p[0][1]["use_tf32"] == "0" for p in _FakeCudaSession.made)


def test_device_means_the_same_everywhere(tiny):
    bundle = load_bundle(tiny.bundle)
    with pytest.raises(BackendError, match="runs on cpu, but --device cuda"):
        open_backend(bundle, "ort-cpu", device="cuda")
    with pytest.raises(BackendError, match="runs on cuda, but --device cpu"):
        open_backend(bundle, "trt", device="cpu")
    with open_backend(bundle, "auto", device="cpu", intra_op_threads=1).backend as backend:
        assert backend.name == "ort-cpu"


# ----------------------------------------------------------------------------------------------------
# The same TensorRT backend on a real GPU: cuda-bindings memory, streams, events and graphs; the stand-in
# engine copies the first ROW bytes of each pathology row into its logits row on the backend's stream.


def _no_cuda_device() -> str | None:
    if importlib.util.find_spec("cuda") is None:
        return "cuda-bindings is not installed"
    ok, why = cuda.cuda_available()
    return None if ok else f"no usable CUDA device: {why}"


NO_CUDA = _no_cuda_device()
ROW = CLASSES * 4  # bytes of one logits row


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=str(NO_CUDA))
def test_cuda_layer_round_trips_and_replays_a_graph():
    nbytes = 1 << 20
    src, dst = cuda.PinnedBuffer(nbytes, np.uint8), cuda.PinnedBuffer(nbytes, np.uint8)
    dev, stream, start, end = cuda.DeviceBuffer(nbytes), cuda.Stream(), cuda.Event(), cuda.Event()
    src.array[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    start.record(stream)
    cuda.copy_htod_async(dev, src, nbytes, stream)
    cuda.copy_dtoh_async(dst, dev, nbytes, stream)
    end.record(stream)
    stream.synchronize()
    np.testing.assert_array_equal(dst.array, src.array)
    assert end.elapsed_ms(start) >= 0
    dst.array[:] = 0
    src.array[:] = src.array[::-1]

    def copies() -> None:
        cuda.copy_htod_async(dev, src, nbytes, stream)
        cuda.copy_dtoh_async(dst, dev, nbytes, stream)

    graph = cuda.Graph.capture(stream, copies)
    assert not dst.array.any()  # capture records the copies, it does not run them
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(dst.array, src.array)
    for obj in (graph, src, dst, dev, start, end, stream):
        obj.close()


def _copy_on_gpu(context, stream_handle) -> bool:
    rt = cuda.cudart()
    n = context.shapes["pathology"][0]
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    result = rt.cudaMemcpy2DAsync(
        context.addresses["logits"], ROW, context.addresses["pathology"], SIZE * SIZE * 3, ROW, n, kind,
        stream_handle,
    )  # fmt: skip
    return int(result[0]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=str(NO_CUDA))
@pytest.mark.parametrize("graphs", [False, True])
def test_trt_backend_on_real_cuda_with_a_standin_engine(monkeypatch, tmp_path, graphs):
    """Profile 4..32: batches padded up, split, timed and (with graphs) replayed, every byte checked."""
    fake = fake_tensorrt(_copy_on_gpu, min_batch=4, max_batch=32)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    info = cuda.device_info(0)
    record = {"gpu_name": info["name"], "compute_capability": info["compute_capability"]}
    plan = tmp_path / "standin.plan"
    plan.write_bytes(b"stand-in")
    with TrtBackend(plan, {**record, "tensorrt_version": fake.__version__}, cuda_graphs=graphs) as backend:
        for n in (1, 3, 7, 32, 70, 7, 7):
            inputs = _pairs(n, seed=n)
            logits = backend.infer(inputs)["logits"]
            assert logits.shape == (n, CLASSES)
            want = inputs["pathology"].reshape(n, -1)[:, :ROW]
            np.testing.assert_array_equal(logits.view(np.uint8).reshape(n, ROW), want)
            assert all(backend.last_timings[k] >= 0 for k in ("h2d_ms", "compute_ms", "d2h_ms"))
        # One graph per chunk shape: 4 (1 and 3, padded), 7, 32 and 6 (the tail of 70).
        assert len(backend._graphs) == (4 if graphs else 0)
