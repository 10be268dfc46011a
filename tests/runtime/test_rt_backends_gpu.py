"""Backend selection, the CUDA helper, onnxruntime I/O binding, and the GPU backends where they can run.

What needs a GPU (onnxruntime CUDA, TensorRT) is marked ``gpu`` / ``trt`` and skips itself with the
reason; nothing is mocked. What runs everywhere: the selection logic, the engine/GPU/TensorRT mismatch
rules, the checked CUDA call on a machine without a driver, and the I/O-binding code path on the CPU
device (the same code the CUDA provider runs).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.backends import choose, open_backend
from crc_runtime.backends.onnxruntime import OrtBackend
from crc_runtime.backends.tensorrt import engine_mismatches
from crc_runtime.bundle import load_bundle, sha256_file
from crc_runtime.cli import cli
from crc_runtime.errors import BackendError, UserError

NO_CUDA_EP = {
    "absent": "onnxruntime has no CUDAExecutionProvider (pip install 'crc-fusion[gpu]' on a GPU machine)",
    "dead": "onnxruntime-gpu is installed, but its CUDA provider does not start here (no GPU / CUDA libs)",
}


def _cuda_device() -> str | None:
    """Why no CUDA device can be used through cuda-bindings, or None when one can."""
    if importlib.util.find_spec("cuda") is None:
        return "cuda-bindings is not installed"
    from crc_runtime.backends import cuda

    ok, why = cuda.cuda_available()
    return None if ok else f"no usable CUDA device: {why}"


def _trt_missing() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'crc-fusion[trt]' on a machine with an NVIDIA GPU)"
    import tensorrt

    if not hasattr(tensorrt, "Runtime"):
        return "the installed tensorrt is PyPI's placeholder without a runtime"
    return _cuda_device()


NO_DEVICE = _cuda_device()
NO_TRT = _trt_missing()

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
RECORD = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.13.0.35"}


def test_engine_record_matches_only_its_gpu_and_release():
    assert engine_mismatches(RECORD, H100, "10.13.0.35") == []
    assert engine_mismatches(RECORD, H100, "10.13.0.99") == []  # same major.minor.patch release
    reasons = engine_mismatches(
        RECORD, {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "10.13.0"
    )
    assert len(reasons) == 2 and "compute capability 9.0" in reasons[0] and "A100" in reasons[1]
    reasons = engine_mismatches(RECORD, H100, "11.0.0.1")
    assert reasons == ["built with TensorRT 10.13.0.35, this is TensorRT 11.0.0.1"]
    assert "no 'engine' record" in engine_mismatches(None, H100, "10.13.0")[0]


def test_auto_on_a_cpu_machine_says_why(tiny, cuda_ep):
    if cuda_ep == "works" or NO_TRT is None:
        pytest.skip("a GPU backend works here: auto picks it")
    bundle = load_bundle(tiny.bundle)
    name, reason = choose(bundle, "auto")
    if cuda_ep == "dead":  # onnxruntime-gpu without a usable GPU: picked, then open_backend falls back
        assert name == "ort-cuda" and "no TensorRT" in reason
        selection = open_backend(bundle)
        assert selection.backend.name == "ort-cpu" and "did not start" in selection.reason
        selection.backend.deactivate()
        return
    assert name == "ort-cpu" and "no TensorRT" in reason and "no CUDA provider" in reason
    assert choose(bundle, "auto", device="cpu") == ("ort-cpu", "--device cpu")
    assert choose(bundle, "ort-cpu")[0] == "ort-cpu"
    with pytest.raises(BackendError, match="not one of"):
        choose(bundle, "cuda")
    selection = open_backend(bundle)
    assert selection.backend.name == "ort-cpu" and selection.artifact["file"] == "model.onnx"
    selection.backend.deactivate()


@pytest.mark.parametrize("backend", ["trt", "ort-cuda"])
def test_gpu_backend_asked_by_name_never_falls_back(tiny, backend, cuda_ep):
    if backend == "trt" and NO_TRT is None:
        pytest.skip("TensorRT and a GPU are here")
    if backend == "ort-cuda" and cuda_ep == "works":
        pytest.skip("onnxruntime's CUDA provider works here")
    result = CliRunner().invoke(cli, [str(tiny.csv_dir), "--bundle", str(tiny.bundle), "--backend", backend])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    if backend == "trt":
        expected = "no usable TensorRT engine"
    else:
        expected = "available providers" if cuda_ep == "absent" else "installed but did not start"
    assert expected in result.output


def test_cuda_graphs_need_trt(tiny):
    result = CliRunner().invoke(
        cli, [str(tiny.csv_dir), "--bundle", str(tiny.bundle), "--backend", "ort-cpu", "--cuda-graphs"]
    )
    assert result.exit_code == 1 and "--cuda-graphs needs the trt backend" in result.output


def test_engine_for_another_gpu_is_refused_with_the_reason(bundle_copy, edit_manifest):
    if NO_TRT is not None:
        pytest.skip(f"needs TensorRT to reach the GPU check: {NO_TRT}")
    (bundle_copy / "other.plan").write_bytes(b"not loaded: refused before deserializing")
    record = {**RECORD, "gpu_name": "Some Other GPU", "compute_capability": "1.0"}

    def add(m):
        m["files"]["other.plan"] = sha256_file(bundle_copy / "other.plan")
        m["artifacts"].append(
            {"file": "other.plan", "kind": "tensorrt", "precision": "fp16", "usable": True, "engine": record}
        )

    edit_manifest(bundle_copy, add)
    with pytest.raises(BackendError, match="compute capability 1.0.*rebuild the engine"):
        open_backend(load_bundle(bundle_copy), "trt", artifact="other.plan")


def test_checked_cuda_call_raises_one_line():
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("cuda-bindings is not installed")
    from crc_runtime.backends import cuda

    rt = cuda.cudart()
    with pytest.raises(BackendError) as exc:
        cuda.check((rt.cudaError_t.cudaErrorInvalidValue, None), "cudaSomething")
    assert "cudaSomething failed: cudaErrorInvalidValue" in str(exc.value) and "\n" not in str(exc.value)
    assert cuda.check((rt.cudaError_t.cudaSuccess, 7), "x") == 7
    if NO_DEVICE is not None:  # without a driver the real call fails through the same check
        with pytest.raises(UserError):
            cuda.device_info()


def test_io_binding_path_matches_plain_run(tiny):
    """The I/O-binding code (preallocated OrtValues per batch size) on the CPU device."""
    ref = load_bundle(tiny.bundle).load_reference()
    with OrtBackend(tiny.bundle / "model.onnx", device="cpu", io_binding=True, intra_op_threads=1) as bound:
        for n in (3, 7, 3, 20):  # sizes repeat: buffers are reused, never stale
            inputs = {"pathology": ref["pathology"][:n], "radiology": ref["radiology"][:n]}
            out = bound.infer(inputs)["logits"]
            np.testing.assert_allclose(out, tiny.logits(**inputs), rtol=1e-5, atol=1e-5)
            assert set(bound.last_timings) == {"h2d_ms", "compute_ms", "d2h_ms"}
        assert len(bound._bound) <= 2  # at most two batch sizes keep buffers
        first = bound.infer({"pathology": ref["pathology"][:3], "radiology": ref["radiology"][:3]})["logits"]
        kept = first.copy()
        bound.infer({"pathology": ref["pathology"][5:8], "radiology": ref["radiology"][5:8]})
        np.testing.assert_array_equal(first, kept)  # a returned array is the caller's, never the buffer


@pytest.mark.gpu
def test_ort_cuda_io_binding_parity_and_timings(tiny, tmp_path, cuda_ep):
    if cuda_ep != "works":
        pytest.skip(NO_CUDA_EP[cuda_ep])
    ref = load_bundle(tiny.bundle).load_reference()
    with OrtBackend(tiny.bundle / "model.onnx", device="cuda") as backend:
        assert backend.io_binding and backend.name == "ort-cuda"
        out = backend.infer({"pathology": ref["pathology"], "radiology": ref["radiology"]})["logits"]
        np.testing.assert_allclose(out, ref["logits"], rtol=1e-4, atol=1e-4)
        assert all(backend.last_timings[k] >= 0 for k in ("h2d_ms", "compute_ms", "d2h_ms"))
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        ["bench", "--bundle", str(tiny.bundle), "--backend", "ort-cuda", "--batch-sizes", "1,8",
         "--iterations", "5", "--warmup-iters", "2", "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["backend"]["name"] == "ort-cuda" and "h2d" in data["results"][0]["latency"]


def _build_engine(onnx_path, plan_path, max_batch: int = 32) -> dict:
    """A real TensorRT engine of the tiny model (the test's own builder call; crc-export has the real one)."""
    import tensorrt as trt
    from crc_runtime.backends import cuda

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):  # FP32 parity needs FP32 math, as crc-export builds engines
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (8, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    plan_path.write_bytes(bytes(plan))
    info = cuda.device_info()
    return {
        "gpu_name": info["name"],
        "compute_capability": info["compute_capability"],
        "tensorrt_version": trt.__version__,
        "profile": {"min_batch": 1, "opt_batch": 8, "max_batch": max_batch},
        "tf32": False,
    }


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(NO_TRT is not None, reason=str(NO_TRT))
@pytest.mark.parametrize("graphs", [False, True])
def test_trt_backend_parity_timings_and_auto(bundle_copy, edit_manifest, tiny, graphs):
    from crc_runtime.backends.tensorrt import TrtBackend

    record = _build_engine(bundle_copy / "model.onnx", bundle_copy / "tiny.plan")

    def add(m):
        m["files"]["tiny.plan"] = sha256_file(bundle_copy / "tiny.plan")
        m["artifacts"].append(
            {"file": "tiny.plan", "kind": "tensorrt", "precision": "fp32", "usable": True, "engine": record}
        )

    edit_manifest(bundle_copy, add)
    bundle = load_bundle(bundle_copy)
    ref = bundle.load_reference()
    with TrtBackend(bundle_copy / "tiny.plan", record, cuda_graphs=graphs) as backend:
        assert backend.max_batch == 32
        for n in (1, 7, 20, 7):  # shapes change per call; graphs are replayed for the repeated size
            inputs = {"pathology": ref["pathology"][:n], "radiology": ref["radiology"][:n]}
            out = backend.infer(inputs)["logits"]
            np.testing.assert_allclose(out, ref["logits"][:n], rtol=1e-3, atol=1e-3)
            assert all(backend.last_timings[k] >= 0 for k in ("h2d_ms", "compute_ms", "d2h_ms"))
        big = {k: np.concatenate([ref[k]] * 3) for k in ("pathology", "radiology")}  # 60 > max batch 32
        np.testing.assert_allclose(
            backend.infer(big)["logits"], np.concatenate([ref["logits"]] * 3), atol=1e-3
        )
    name, reason = choose(bundle, "auto")
    assert name == "trt" and "tiny.plan" in reason
    result = CliRunner().invoke(cli, [str(tiny.csv_dir), "--bundle", str(bundle_copy), "--output",
                                      str(bundle_copy.parent / "p.csv")])  # fmt: skip
    assert result.exit_code == 0 and "backend: trt" in result.output and "h2d" in result.output


def test_cuda_objects_free_once_even_when_the_free_fails(monkeypatch):
    """close() and garbage collection free a CUDA object exactly once; a failed free is not retried."""
    from crc_runtime.backends import cuda

    calls = []

    class Runtime:  # stands in for cuda.bindings.runtime: only the free calls the objects make
        def cudaFree(self, ptr):
            calls.append(("cudaFree", ptr))
            return (0,)

        def cudaGraphExecDestroy(self, handle):
            calls.append(("cudaGraphExecDestroy", handle))
            return (1,)  # an error code: close() raises, __del__ must not try again

        def cudaGraphDestroy(self, handle):
            calls.append(("cudaGraphDestroy", handle))
            return (0,)

        def cudaGetErrorString(self, err):
            return (0, b"invalid value")

    monkeypatch.setattr(cuda, "cudart", lambda: Runtime())
    buffer = cuda.DeviceBuffer.__new__(cuda.DeviceBuffer)
    buffer.ptr = 1234
    buffer.close()
    buffer.close()
    del buffer
    graph = cuda.Graph("graph", "exec")
    with pytest.raises(cuda.BackendError, match="cudaGraphExecDestroy failed"):
        graph.close()
    graph.close()  # the graph itself is still freed; the failed exec is not retried
    del graph
    assert calls == [("cudaFree", 1234), ("cudaGraphExecDestroy", "exec"), ("cudaGraphDestroy", "graph")]


class _CaptureRuntime:
    """Stands in for cuda.bindings.runtime in the graph-capture tests: records calls, fails on request."""

    class cudaStreamCaptureMode:  # noqa: N801 - the cuda-bindings name
        cudaStreamCaptureModeThreadLocal = 1

    def __init__(self, end_error=0, instantiate_error=0):
        self.calls, self.end_error, self.instantiate_error = [], end_error, instantiate_error

    def cudaStreamBeginCapture(self, stream, mode):
        self.calls.append("begin")
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.calls.append("end")
        return (self.end_error, None if self.end_error else "graph")

    def cudaGraphInstantiate(self, graph, flags):
        self.calls.append("instantiate")
        return (self.instantiate_error, None if self.instantiate_error else "exec")

    def cudaGraphDestroy(self, graph):
        self.calls.append(f"destroy {graph}")
        return (0,)

    def cudaGetErrorString(self, err):
        return (0, b"operation not permitted when stream is capturing")


@pytest.mark.parametrize("end_error", [0, 901])  # 901: cudaErrorStreamCaptureInvalidated
def test_graph_capture_keeps_the_enqueue_error(monkeypatch, end_error):
    """A failed enqueue during capture is the error raised, not the EndCapture failure it causes."""
    from crc_runtime.backends import cuda

    rt = _CaptureRuntime(end_error=end_error)
    monkeypatch.setattr(cuda, "cudart", lambda: rt)

    def failing_enqueue():
        raise cuda.BackendError("tiny.plan: TensorRT failed to enqueue the batch (see the log)")

    stream = type("S", (), {"handle": 7})()
    with pytest.raises(cuda.BackendError, match="failed to enqueue"):
        cuda.Graph.capture(stream, failing_enqueue)
    assert rt.calls == (["begin", "end", "destroy graph"] if end_error == 0 else ["begin", "end"])


def test_graph_capture_frees_the_graph_when_instantiation_fails(monkeypatch):
    from crc_runtime.backends import cuda

    rt = _CaptureRuntime(instantiate_error=1)
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    with pytest.raises(cuda.BackendError, match="cudaGraphInstantiate failed"):
        cuda.Graph.capture(type("S", (), {"handle": 7})(), lambda: None)
    assert rt.calls == ["begin", "end", "instantiate", "destroy graph"]
    rt = _CaptureRuntime()
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    graph = cuda.Graph.capture(type("S", (), {"handle": 7})(), lambda: None)
    assert (graph._graph, graph._exec) == ("graph", "exec") and "destroy graph" not in rt.calls


def test_trt_refused_input_shape_is_one_line(tmp_path):
    """TensorRT's set_input_shape answers False for a shape outside the profile: say so, with the tensor."""
    from crc_runtime.backends.tensorrt import TrtBackend

    backend = TrtBackend.__new__(TrtBackend)  # no GPU here: only the shape check is exercised
    backend.engine_path, backend.min_batch, backend.max_batch = tmp_path / "tiny.plan", 1, 32
    backend.context = type("Context", (), {"set_input_shape": lambda self, name, shape: shape[0] <= 32})()
    backend._set_input_shape("pathology", (32, 8, 8, 3))
    with pytest.raises(BackendError) as exc:
        backend._set_input_shape("pathology", (33, 8, 8, 3))
    assert str(exc.value) == (
        f"{tmp_path / 'tiny.plan'}: TensorRT refused shape [33, 8, 8, 3] for input pathology "
        "(profile batch 1..32; see the log)"
    )
