"""The runtime's cuda-bindings code on a real GPU, with no TensorRT: the first thing gpu_check.sh runs.

    python benchmarks/cuda_smoke.py [--out cuda_smoke.json] [--gpu 0]

1. ``crc_runtime.backends.cuda``: device_info, a stream, events, pinned and device buffers, H2D / D2H
   copies, and a CUDA graph of those copies captured and replayed: the bytes must come back unchanged.
2. ``TrtBackend``'s own code on real CUDA: buffers at the profile's maximum batch, shapes set per batch,
   a batch split above the profile's maximum and padded below its minimum, CUDA events around H2D /
   compute / D2H, CUDA graphs. TensorRT itself is played by a stand-in engine whose "compute" is a
   device-to-device copy on the backend's stream (logits row i = the first 36 bytes of pathology row i),
   so every output byte is known.

Prints one JSON document (and writes it to --out); exit 1 when a check fails, 2 when no GPU is usable.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

SIZE, CLASSES = 8, 9
ROW = CLASSES * 4  # bytes of one logits row


def check_cuda_layer(cuda, gpu: int) -> dict:
    """Round trips through pinned and device memory, directly and as a replayed CUDA graph."""
    rt = cuda.cudart()
    cuda.check(rt.cudaSetDevice(gpu), "cudaSetDevice")
    nbytes = 1 << 20
    src, dst = cuda.PinnedBuffer(nbytes, np.uint8), cuda.PinnedBuffer(nbytes, np.uint8)
    dev = cuda.DeviceBuffer(nbytes)
    stream, start, end = cuda.Stream(), cuda.Event(), cuda.Event()
    src.array[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    start.record(stream)
    cuda.copy_htod_async(dev, src, nbytes, stream)
    cuda.copy_dtoh_async(dst, dev, nbytes, stream)
    end.record(stream)
    stream.synchronize()
    direct_ok = bool(np.array_equal(src.array, dst.array))
    copy_ms = end.elapsed_ms(start)
    dst.array[:] = 0
    src.array[:] = src.array[::-1]

    def copies() -> None:
        cuda.copy_htod_async(dev, src, nbytes, stream)
        cuda.copy_dtoh_async(dst, dev, nbytes, stream)

    graph = cuda.Graph.capture(stream, copies)
    untouched = not dst.array.any()  # capture records, it does not run
    graph.launch(stream)
    stream.synchronize()
    graph_ok = bool(np.array_equal(src.array, dst.array))
    for obj in (graph, src, dst, dev, start, end, stream):
        obj.close()
    return {
        "round_trip_ok": direct_ok,
        "graph_capture_did_not_run": untouched,
        "graph_replay_ok": graph_ok,
        "h2d_plus_d2h_1MiB_ms": copy_ms,
    }


def standin_tensorrt(cuda, min_batch: int, max_batch: int):
    """A ``tensorrt`` stand-in whose engine copies bytes on the GPU instead of running a network."""
    rt = cuda.cudart()
    dims = {"pathology": (SIZE, SIZE, 3), "radiology": (SIZE, SIZE, 1), "logits": (CLASSES,)}
    dtypes = {"pathology": "UINT8", "radiology": "UINT8", "logits": "FLOAT"}

    class Context:
        def __init__(self) -> None:
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            if not min_batch <= shape[0] <= max_batch:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shapes["pathology"][0], *dims[name]) if name == "logits" else self.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            n = self.shapes["pathology"][0]
            kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            result = rt.cudaMemcpy2DAsync(
                self.addresses["logits"], ROW, self.addresses["pathology"], SIZE * SIZE * 3, ROW, n, kind,
                stream_handle,
            )  # fmt: skip
            return int(result[0]) == 0

    class Engine:
        num_io_tensors, num_optimization_profiles = 3, 1

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
        __version__="0.0.0-standin",
        Runtime=Runtime,
        ILogger=ILogger,
        TensorIOMode=SimpleNamespace(INPUT="in"),
    )


def check_trt_backend(cuda, gpu: int, cuda_graphs: bool) -> dict:
    """TrtBackend on real CUDA with the stand-in engine (profile 4..32): every output byte checked."""
    from crc_runtime.backends import tensorrt as trt_backend

    standin = standin_tensorrt(cuda, min_batch=4, max_batch=32)
    trt_backend.import_tensorrt = lambda: standin
    info = cuda.device_info(gpu)
    record = {"gpu_name": info["name"], "compute_capability": info["compute_capability"]}
    record["tensorrt_version"] = standin.__version__
    rng = np.random.default_rng(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "standin.plan"
        plan.write_bytes(b"stand-in")
        with trt_backend.TrtBackend(plan, record, cuda_graphs=cuda_graphs, device=gpu) as backend:
            for n in (1, 3, 7, 32, 70, 7, 7):
                inputs = {
                    "pathology": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
                    "radiology": rng.integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8),
                }
                t0 = time.perf_counter()
                logits = backend.infer(inputs)["logits"]
                seconds = time.perf_counter() - t0
                want = inputs["pathology"].reshape(n, -1)[:, :ROW]
                ok = logits.shape == (n, CLASSES) and np.array_equal(
                    logits.view(np.uint8).reshape(n, ROW), want
                )
                rows.append({"batch": n, "ok": bool(ok), "wall_ms": seconds * 1e3, **backend.last_timings})
            graphs = len(backend._graphs)
            capture_s = backend.capture_seconds
    return {
        "cuda_graphs": cuda_graphs,
        "graphs_captured": graphs,
        "capture_seconds": capture_s,
        "calls": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--gpu", type=int, default=0)
    args = ap.parse_args()
    from crc_runtime.backends import cuda
    from crc_runtime.errors import UserError

    ok, why = cuda.cuda_available()
    if not ok:
        print(f"skipped: {why}")
        return 2
    try:
        result = {
            "device": cuda.device_info(args.gpu),
            "cuda_layer": check_cuda_layer(cuda, args.gpu),
            "trt_backend": [check_trt_backend(cuda, args.gpu, graphs) for graphs in (False, True)],
        }
    except UserError as exc:
        print(f"FAILED: {exc}")
        return 1
    layer = result["cuda_layer"]
    passed = all(layer[k] for k in ("round_trip_ok", "graph_capture_did_not_run", "graph_replay_ok")) and all(
        call["ok"] for run in result["trt_backend"] for call in run["calls"]
    )
    # With graphs: one capture per distinct chunk shape (4 = 1 and 3 padded, 7, 32, 6 = the tail of 70).
    passed = passed and result["trt_backend"][1]["graphs_captured"] == 4
    result["passed"] = passed
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
