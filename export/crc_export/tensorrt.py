"""TensorRT engines from model.fp16.onnx and model.int8.onnx: strongly typed, dynamic batch, timing cache.

The precision of every layer comes from the ONNX graph itself (FP16 backbones, FP32 attention, pooling
and head; see :mod:`crc_export.fp16`): the network is created STRONGLY_TYPED, which is how TensorRT 10
builds mixed precision without builder flags and the only way in TensorRT 11 (no FP16 flag). The TF32
builder flag, on by default in TensorRT 10 and 11, is cleared: the layers the graph keeps in FP32 stay
full FP32 (the policy of DESIGN.md "Parity"), and the engine record says ``"tf32": false``. One
optimization profile, over the batch. Features are detected with ``hasattr``, never by parsing version
strings.

The INT8 engine is built the same way from the QDQ graph of :mod:`crc_export.int8` (explicit
quantization: the Q/DQ pairs say which tensors are INT8, with their scales; zero points are 0, the only
kind TensorRT takes). TensorRT's guide: "Use explicit quantization with Strong Typing. Precision-control
build flags are not required and should not be specified", so no INT8 (or FP16) builder flag is set and
the layers outside the Q/DQ pairs run in the FP32 of the graph, exactly as onnxruntime runs them.

The engine is named after what it is tied to: ``<gpu-name>_sm<XY>_trt<version>.plan``, e.g.
``nvidia-h100-80gb-hbm3_sm90_trt10.13.0.plan`` (the INT8 engine ends ``.int8.plan``); the manifest's
``engine`` record repeats the GPU name, compute capability, TensorRT version and profile so the runtime
can refuse a mismatch before loading.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from crc_runtime.backends.tensorrt import TrtBackend, make_trt_logger, tensorrt_release
from crc_runtime.errors import UserError
from crc_runtime.validate import run_reference
from crc_train.cli import missing_modules

log = logging.getLogger(__name__)

TRT_HINT = "pip install 'crc-fusion[trt]' (TensorRT and cuda-bindings, on a machine with an NVIDIA GPU)"


class EngineBuildError(UserError):
    """TensorRT could not parse or build the network; ``details`` holds one line per parser error."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = list(details or [])


@dataclass
class TrtConfig:
    """Every choice of the engine build, with its default."""

    min_batch: int = 1  # smallest batch the optimization profile accepts
    opt_batch: int = 64  # batch TensorRT tunes its kernels for
    max_batch: int = 256  # largest batch the engine accepts (and Triton's max_batch_size)
    workspace_mib: int = 4096  # scratch memory TensorRT may use while building and running
    device: int = 0  # CUDA device ordinal to build on
    timing_cache: Path | None = None  # a timing cache to start from (else the previous bundle's, if any)

    def validate(self) -> None:
        """Raise UserError when the profile is not min <= opt <= max or a limit is not positive."""
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got min {self.min_batch}, "
                f"opt {self.opt_batch}, max {self.max_batch}"
            )
        if self.workspace_mib < 1:
            raise UserError(f"--workspace must be at least 1 MiB, got {self.workspace_mib}")


def require_tensorrt() -> None:
    """Fail in one line, before any work, when TensorRT or cuda-bindings is not installed."""
    missing = missing_modules(("tensorrt", "cuda.bindings"))
    if missing:
        raise UserError(f"--trt needs {' and '.join(missing)}: {TRT_HINT}")


def _import_tensorrt():
    require_tensorrt()
    import tensorrt as trt

    if not hasattr(trt, "Builder"):  # PyPI's placeholder package has no builder
        raise UserError(f"the installed 'tensorrt' is a placeholder without the builder: {TRT_HINT}")
    return trt


def engine_file_name(
    gpu_name: str, compute_capability: str, trt_version: str, precision: str = "fp16"
) -> str:
    """``NVIDIA H100 80GB HBM3``, ``9.0``, ``10.13.0.35`` -> ``nvidia-h100-80gb-hbm3_sm90_trt10.13.0.plan``.

    The GPU name is lower-cased with every run of other characters made one dash; the TensorRT version
    is cut to major.minor.patch, the release an engine is tied to. An engine of another precision than
    FP16 (the first kind, whose names stay as they were) carries it: ``..._trt10.13.0.int8.plan``.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    sm = "sm" + compute_capability.replace(".", "")
    suffix = "" if precision == "fp16" else f".{precision}"
    return f"{slug}_{sm}_trt{tensorrt_release(trt_version)}{suffix}.plan"


def strongly_typed_flags(trt) -> int:
    """``create_network`` flags for a strongly typed network, told apart by feature, not by version.

    TensorRT 9.1-10 have the STRONGLY_TYPED flag; 11 keeps it (ignored: every network is strongly typed)
    and has no FP16 builder flag; a release that dropped the flag too is strongly typed if FP16 is gone.
    Older releases (no flag, an FP16 builder flag) would ignore the graph's casts: refused.
    """
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if not hasattr(trt.BuilderFlag, "FP16"):
        return 0
    raise UserError(
        f"TensorRT {trt.__version__} cannot build strongly typed networks (need >= 10); {TRT_HINT}"
    )


def parser_errors(parser, onnx_path: Path) -> list[str]:
    """One line per ONNX parser error, naming the node (index, name and operator where TensorRT says)."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()}"
        extra = [getattr(err, attr)() for attr in ("node_name", "node_operator") if hasattr(err, attr)]
        extra = [str(x) for x in extra if x]
        if extra:
            where += f" ({', '.join(extra)})"
        lines.append(f"{onnx_path.name}: {where}: {err.desc()} [{err.code()}]")
    return lines


def _profile_shapes(input_shapes: dict[str, tuple[int, ...]], cfg: TrtConfig) -> dict[str, dict[str, list]]:
    return {
        name: {
            key: [batch, *dims]
            for key, batch in (("min", cfg.min_batch), ("opt", cfg.opt_batch), ("max", cfg.max_batch))
        }
        for name, dims in input_shapes.items()
    }


def builder_config(trt, builder, shapes: dict[str, dict[str, list]], workspace_mib: int):
    """The ``IBuilderConfig`` of every crc-export engine: workspace limit, TF32 off, one batch profile.

    Args:
        trt: The ``tensorrt`` module.
        builder: A ``trt.Builder``.
        shapes: Per input, its ``min`` / ``opt`` / ``max`` shapes (:func:`_profile_shapes`).
        workspace_mib: Workspace memory limit.
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default: FP32 layers would round inputs to 10 bits
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for input_name, s in shapes.items():
        profile.set_shape(input_name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)  # exactly one: the runtime refuses engines with more
    return config


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    input_shapes: dict[str, tuple[int, ...]],
    cfg: TrtConfig,
    previous_dir: Path | None = None,
    precision: str = "fp16",
) -> dict:
    """Build a strongly typed engine from ``onnx_path`` into ``out_dir``, with a timing cache beside it.

    Args:
        onnx_path: the FP16 ONNX file (its casts fix every layer's precision) or the INT8 QDQ file (its
            Q/DQ pairs do).
        out_dir: folder the engine and the timing cache are written to (the bundle being built).
        input_shapes: per input, its dimensions without the batch, e.g. ``{"pathology": (28, 28, 3)}``.
        cfg: batch profile, workspace, device, timing cache to start from.
        previous_dir: a previous bundle whose timing cache for this GPU is reused when
            ``cfg.timing_cache`` is None.
        precision: ``fp16`` or ``int8``, for the engine's name (see :func:`engine_file_name`).

    Returns:
        ``{"file", "timing_cache", "engine": {...}}``: the engine record holds gpu_name,
        compute_capability, tensorrt_version, profile (min/opt/max batch and per-input shapes),
        workspace_bytes, build_seconds and source (docs/bundle.md, "TensorRT engine artifacts").

    Raises:
        UserError: no TensorRT / GPU, an invalid profile, parser errors (``EngineBuildError.details``
            lists them one per line) or a failed build.
    """
    cfg.validate()
    trt = _import_tensorrt()
    from crc_runtime.backends import cuda  # every CUDA call goes through its checked helpers

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    gpu = cuda.device_info(cfg.device)
    cuda.check(cuda.cudart().cudaSetDevice(cfg.device), "cudaSetDevice")
    name = engine_file_name(gpu["name"], gpu["compute_capability"], trt.__version__, precision)
    cache_name = name.removesuffix(".plan") + ".timing.cache"
    logger = make_trt_logger(trt, log)

    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        details = parser_errors(parser, onnx_path)
        raise EngineBuildError(
            f"{onnx_path}: TensorRT's ONNX parser failed with {len(details)} error(s)", details
        )

    shapes = _profile_shapes(input_shapes, cfg)
    config = builder_config(trt, builder, shapes, cfg.workspace_mib)

    seed = cfg.timing_cache or (previous_dir / cache_name if previous_dir is not None else None)
    seed_bytes = seed.read_bytes() if seed is not None and seed.is_file() else b""
    cache = config.create_timing_cache(seed_bytes)
    # ignore_mismatch=False: a cache from another GPU or TensorRT is refused rather than half-used.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU / TensorRT; starting an empty one", seed)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    log.info("building %s on %s (sm %s), profile %s", name, gpu["name"], gpu["compute_capability"], shapes)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT failed to build the engine (run with -v for its log)")
    (out_dir / name).write_bytes(memoryview(serialized))
    (out_dir / cache_name).write_bytes(memoryview(config.get_timing_cache().serialize()))
    log.info("wrote %s in %.1f s (timing cache %s, seeded: %s)", name, seconds, cache_name, bool(seed_bytes))
    return {
        "file": name,
        "timing_cache": cache_name,
        "engine": {
            "gpu_name": gpu["name"],
            "compute_capability": gpu["compute_capability"],
            "tensorrt_version": trt.__version__,
            "cuda_runtime": gpu.get("cuda_runtime"),
            "source": onnx_path.name,
            "strongly_typed": True,
            "tf32": False,
            "profile": {
                "min_batch": cfg.min_batch,
                "opt_batch": cfg.opt_batch,
                "max_batch": cfg.max_batch,
                "shapes": shapes,
            },
            "workspace_bytes": cfg.workspace_mib << 20,
            "build_seconds": round(seconds, 1),
            "timing_cache_seeded": bool(seed_bytes),
        },
    }


def engine_logits(
    engine_path: Path, record: dict, ref: dict, batch_size: int, device: int = 0, precision: str = "fp16"
):
    """Logits of an engine on the reference set through the runtime's TensorRT backend.

    Raises:
        UserError: the backend refused or failed to run the engine (the caller records it as a failure).
    """
    with TrtBackend(engine_path, record, precision=precision, device=device) as backend:
        return run_reference(backend, ref, min(batch_size, backend.max_batch))
