"""One benchmark harness: every backend x batch size on the same inputs, one table, JSON + Markdown + PNG.

    python benchmarks/run.py --out benchmarks/results [--batch-sizes 1,8,32,64,128,256] [--duration 3]

It trains nothing worth keeping: a resnet50 @ 64 px fusion model gets one epoch on a few synthetic pairs
(effectively untrained weights: speed does not depend on them) through crc-train, then crc-export makes
the bundle, with model.int8.onnx (and a TensorRT engine when TensorRT and a GPU are here). Each backend
is timed by the runtime's own engine-only loop (crc_runtime.bench) on identical synthetic uint8 inputs,
numpy in and numpy out; INT8 and FP32 onnxruntime CPU are also timed interleaved (--int8-rounds). What
the machine cannot run is skipped with the reason. Then the footprint: cold start and peak RSS of
crc-infer (FP32 and INT8) against the same job done with torch, and installed environment sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402
import footprint  # noqa: E402
import paired  # noqa: E402
import report  # noqa: E402
from crc_runtime.backends.base import Backend, cpu_info  # noqa: E402

log = logging.getLogger("benchmarks")

BACKENDS = (
    "torch-eager-fp32", "torch-amp-fp16", "torch-compile", "ort-cpu", "ort-cpu-int8",
    "ort-cuda-fp32", "ort-cuda-fp16", "trt-fp16",
)  # fmt: skip
# The CPU ratio on a GPU machine; onnxruntime with default options and with spinning threads off;
# onnxruntime CUDA on model.onnx with TF32 allowed (a speed setting: its precision is reported as tf32).
EXTRA = ("torch-eager-fp32-cpu", "ort-cpu-untuned", "ort-cpu-nospin", "ort-cuda-tf32")


def build_bundle(work: Path, backbone: str, size: int, trt: bool) -> tuple[Path, Path]:
    """crc-train (1 epoch, 16 synthetic pairs, no test evaluation), crc-export; returns (run, bundle)."""
    run_dir, bundle = work / "run", work / "bundle"
    # python -m, not the console scripts: the harness also runs from a checkout that is not installed
    # (PYTHONPATH=train:export:runtime, as benchmarks/gpu_check.sh does on a borrowed GPU machine).
    if not (run_dir / "checkpoint.pt").is_file():  # --overwrite: an interrupted earlier try is replaced
        subprocess.run(
            [sys.executable, "-m", "crc_train.cli", "--data-source", "synthetic", "--data-root",
             str(work / "data"), "--size", str(size), "--backbone", backbone, "--epochs", "1",
             "--max-train-pairs", "16", "--batch-size", "16", "--device", "cpu", "--no-evaluate", "--quiet",
             "--overwrite", "--out", str(run_dir)],
            check=True,
        )  # fmt: skip
    manifest = bundle / "manifest.json"
    # An older bundle of the same work folder without model.int8.onnx is exported again.
    if not manifest.is_file() or "model.int8.onnx" not in json.loads(manifest.read_text())["files"]:
        cmd = [
            sys.executable,
            "-m",
            "crc_export.cli",
            str(run_dir),
            "-o",
            str(bundle),
            "--parity-pairs",
            "32",
            "--int8",  # the model trained on 16 pairs: calibration takes what there is (16 training pairs)
            "--overwrite",
        ]
        subprocess.run(cmd + (["--trt"] if trt else []), check=True)
    return run_dir, bundle


def trt_ready() -> str | None:
    """Why TensorRT cannot run here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    import tensorrt

    if not hasattr(tensorrt, "Runtime"):
        return "the installed tensorrt is PyPI's placeholder"
    from crc_runtime.backends import cuda

    ok, why = cuda.cuda_available()
    return None if ok else why


def open_one(name: str, bundle, run_dir: Path):
    """Open and activate backend ``name``; returns (backend, None) or (None, why it cannot run here)."""
    import onnxruntime as ort
    import torch
    from crc_runtime.backends import find_engine
    from crc_runtime.backends.onnxruntime import OrtBackend
    from crc_runtime.errors import UserError

    gpu = torch.cuda.is_available()
    if name.startswith("torch-"):
        from crc_train.rundir import load_checkpoint, model_from_checkpoint
        from torch_backends import TorchBackend

        mode = name.removeprefix("torch-").removesuffix("-cpu")
        device = "cpu" if name.endswith("-cpu") or not gpu else "cuda"
        if mode == "amp-fp16" and not gpu:
            return None, "torch AMP FP16 needs a CUDA device (torch sees none)"
        model = model_from_checkpoint(load_checkpoint(run_dir / "checkpoint.pt"))
        return TorchBackend(model, bundle.image_size, mode, device).activate(), None
    if name == "ort-cpu-int8":
        try:
            art = bundle.artifact("int8")
        except UserError as exc:
            return None, str(exc)
        backend = OrtBackend(bundle.artifact_path(art), "cpu", precision="int8").activate()
        backend.name = name
        return backend, None
    if name in ("ort-cpu", "ort-cpu-untuned", "ort-cpu-nospin"):
        if name != "ort-cpu-untuned":
            backend = OrtBackend(bundle.file("model.onnx"), "cpu", spinning=name == "ort-cpu").activate()
            backend.name = name
            return backend, None
        return UntunedOrt(bundle.file("model.onnx")).activate(), None
    if name.startswith("ort-cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return None, "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        precision = name.rsplit("-", 1)[1]
        tf32 = precision == "tf32"
        try:
            art = bundle.artifact("fp32" if tf32 else precision)
        except UserError as exc:
            return None, str(exc)
        backend = OrtBackend(bundle.file(art["file"]), "cuda", precision=art["precision"], tf32=tf32)
        return backend.activate(), None
    if name == "trt-fp16":
        why = trt_ready()
        if why is not None:
            return None, why
        art, why = find_engine(bundle)
        if art is None:
            return None, why
        from crc_runtime.backends.tensorrt import TrtBackend

        return TrtBackend(bundle.file(art["file"]), art.get("engine"), precision="fp16").activate(), None
    return None, f"unknown backend {name}"


class UntunedOrt(Backend):
    """onnxruntime CPU with default SessionOptions: the baseline the runtime's tuning is measured against."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        super().__init__()
        self.path = path
        self.name, self.precision, self.device = "ort-cpu-untuned", "fp32", "cpu"
        self.version = f"onnxruntime {ort.__version__}"
        self.max_batch = None
        self.timing_method = "host wall clock around session.run"
        self.device_info = cpu_info()

    def _activate(self) -> None:
        import onnxruntime as ort
        from crc_runtime.backends.onnxruntime import _spec

        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.input_specs = [_spec(i) for i in self.session.get_inputs()]
        self.output_specs = [_spec(o) for o in self.session.get_outputs()]

    def _infer(self, inputs):
        return {"logits": self.session.run(["logits"], inputs)[0]}

    def _deactivate(self) -> None:
        self.session = None


def run_backends(names, bundle, run_dir, sizes, args) -> list[dict]:
    from crc_runtime.bench import bench_batch

    out = []
    for name in names:
        t0 = time.perf_counter()
        try:
            backend, why = open_one(name, bundle, run_dir)
        except Exception as exc:  # one backend failing must not lose the others' numbers
            backend, why = None, f"failed to open: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        if backend is None:
            log.warning("%s: skipped (%s)", name, why)
            out.append({"backend": name, "skipped": why})
            continue
        entry = {
            "backend": name,
            "device": backend.device,
            "precision": backend.precision,
            "version": backend.version,
            "open_seconds": time.perf_counter() - t0,
            "results": [],
        }
        for n in sizes:
            if backend.max_batch is not None and n > backend.max_batch:
                entry["results"].append({"batch_size": n, "skipped": "above the engine's max batch"})
                continue
            log.info("%s batch %d", name, n)
            try:
                row = bench_batch(backend, n, args.warmup, args.iterations, args.duration,
                                  min_iterations=args.min_iterations)  # fmt: skip
            except Exception as exc:
                row = {"batch_size": n, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            entry["results"].append(row)
            if "throughput_pairs_per_s" in row:
                log.info("  %.1f pairs/s, p50 %.2f ms", row["throughput_pairs_per_s"],
                         row["latency"]["per_batch"]["median_ms"])  # fmt: skip
        backend.deactivate()
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "crc-fusion-bench",
        help="model + bundle folder, reused when it already holds them (kept out of the repository)",
    )
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"any of {BACKENDS + EXTRA}")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per batch size")
    ap.add_argument("--iterations", type=int, default=None, help="timed calls (default: --duration)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of timed calls per batch size")
    ap.add_argument("--min-iterations", type=int, default=5)
    ap.add_argument("--runtime-python", default=None, help="python of a torch-free env (pip install .)")
    ap.add_argument("--skip-footprint", action="store_true")
    ap.add_argument("--e2e-pairs", type=int, default=0, help="also stream a folder of N pairs (0: skip)")
    ap.add_argument("--e2e-batch", type=int, default=64)
    ap.add_argument(
        "--paired-rounds", type=int, default=0,
        help="also time ort-cpu against torch eager CPU interleaved, N rounds per batch size (0: skip)",
    )  # fmt: skip
    ap.add_argument("--paired-threads", type=int, default=None, help="threads for both in the paired run")
    ap.add_argument(
        "--int8-rounds", type=int, default=10,
        help="time ort-cpu INT8 against ort-cpu FP32 interleaved, N rounds per --int8-batch-sizes (0: skip)",
    )  # fmt: skip
    ap.add_argument("--int8-batch-sizes", default="8,32", help="batch sizes of the paired INT8 / FP32 run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from crc_runtime.bench import parse_batch_sizes
    from crc_runtime.bundle import load_bundle
    from crc_runtime.timing import environment
    from torch_backends import torch_device_info

    sizes = parse_batch_sizes(args.batch_sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    run_dir, bundle_dir = build_bundle(work, args.backbone, args.size, trt=trt_ready() is None)
    bundle = load_bundle(bundle_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = {
        "created": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {
            "backbone": (bundle.manifest.get("model") or {}).get("backbone", args.backbone),
            "image_size": bundle.image_size,
            "weights": "effectively untrained (1 epoch on 16 synthetic pairs; speed does not depend on them)",
        },
        "environment": {**environment(), "torch": torch_device_info()},
        "settings": {
            "batch_sizes": sizes,
            "warmup": args.warmup,
            "iterations": args.iterations,
            "duration_s": args.duration,
            "min_iterations": args.min_iterations,
        },  # fmt: skip
        "backends": run_backends(names, bundle, run_dir, sizes, args),
    }
    if args.paired_rounds:
        ort_cpu, _ = open_one("ort-cpu", bundle, run_dir)
        torch_cpu, _ = open_one("torch-eager-fp32-cpu", bundle, run_dir)
        if args.paired_threads:  # per-core comparison: one thread each is robust to a busy machine
            import torch
            from crc_runtime.backends.onnxruntime import OrtBackend

            torch.set_num_threads(args.paired_threads)
            ort_cpu.deactivate()
            ort_cpu = OrtBackend(bundle.file("model.onnx"), intra_op_threads=args.paired_threads).activate()
        results["paired_cpu"] = paired.paired_ratio(ort_cpu, torch_cpu, sizes, args.paired_rounds)
        results["settings"]["paired_threads"] = args.paired_threads or "default"
        ort_cpu.deactivate()
        torch_cpu.deactivate()
    if args.int8_rounds:
        results["paired_int8"] = paired_int8(
            bundle, parse_batch_sizes(args.int8_batch_sizes), args.int8_rounds
        )
    if args.e2e_pairs:
        folder = e2e.make_folder(work / f"pairs-{args.e2e_pairs}", args.e2e_pairs, bundle.image_size)
        results["end_to_end"] = e2e.end_to_end(bundle, folder, args.e2e_batch)
    if not args.skip_footprint:
        results["footprint"] = measure_footprint(args, bundle_dir, run_dir, work)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    report.plot(results, args.out / "throughput.png")
    print(report.markdown(results))


def paired_int8(bundle, sizes: list[int], rounds: int) -> list[dict] | dict:
    """ort-cpu on model.int8.onnx against ort-cpu on model.onnx, calls interleaved (benchmarks/paired.py)."""
    int8, why = open_one("ort-cpu-int8", bundle, None)
    if int8 is None:
        return {"skipped": why}
    fp32, _ = open_one("ort-cpu", bundle, None)
    try:
        return paired.paired_ratio(int8, fp32, sizes, rounds)
    finally:
        int8.deactivate()
        fp32.deactivate()


def measure_footprint(args, bundle_dir: Path, run_dir: Path, work: Path) -> dict:
    python = footprint.runtime_python_or_none(args.runtime_python)
    if python is None:
        return {"skipped": "no torch-free runtime environment: create one (python -m venv V && V/bin/pip "
                "install .) and pass --runtime-python V/bin/python"}  # fmt: skip
    folder = HERE.parent / "examples" / "pairs"
    one = footprint.one_pair_folder(folder, work / "first-pair")
    cold = footprint.cold_start(python, bundle_dir, run_dir, one, work, artifact="fp32")
    return {
        # The targets: process start -> first prediction (one pair), and that job's peak RSS.
        "cold_start": cold,
        # The same job on model.int8.onnx, against the same torch measurement.
        "cold_start_int8": footprint.cold_start(
            python, bundle_dir, run_dir, one, work, artifact="int8", torch_job=cold["torch"]
        ),
        # The same comparison for the whole 18-pair example folder in one batch.
        "folder_job": footprint.cold_start(python, bundle_dir, run_dir, folder, work, artifact="fp32"),
        "imports_only": footprint.imports_only(python),
        "env_size": footprint.env_sizes(python, Path(sys.executable)),
    }


if __name__ == "__main__":
    main()
