"""Backend selection and fallback: the one place that decides what runs where.

Backends: ``ort-cpu`` (onnxruntime, CPU), ``ort-cuda`` (onnxruntime, CUDA provider) and ``trt`` (native
TensorRT); ``auto`` picks the fastest usable here and says which and why. ``--device`` has one meaning
in every command: where the model runs. ``cpu``: onnxruntime on the CPU. ``cuda``: a GPU backend, never
the CPU; what cannot start fails with the reason. ``auto``: a GPU backend when one starts, else the CPU.

``auto`` picks ``trt`` when tensorrt and cuda-bindings import, the GPU is visible and the bundle holds a
usable engine built for it and this TensorRT release; else ``ort-cuda`` when onnxruntime has the CUDA
provider; else ``ort-cpu``. The single fallback: under ``--backend auto --device auto``, an ``ort-cuda``
whose provider is listed but does not start (onnxruntime-gpu without a usable GPU) gives way to
``ort-cpu``, with a warning. A backend named with ``--backend`` never falls back, and backends themselves
never do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..bundle import Bundle
from ..errors import BackendError
from .base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")
DEVICES = ("auto", "cpu", "cuda")
ENGINE_KIND = "tensorrt"


@dataclass
class Selection:
    """An active backend, the manifest artifact it runs, and why it was chosen (one line)."""

    backend: Backend
    artifact: dict
    reason: str


def find_engine(bundle: Bundle, gpu: int = 0) -> tuple[dict | None, str]:
    """The bundle's usable TensorRT engine for GPU ``gpu`` and this TensorRT release, or None and why not."""
    from . import cuda
    from .tensorrt import engine_mismatches, import_tensorrt

    engines = [a for a in bundle.usable_artifacts() if a.get("kind") == ENGINE_KIND]
    if not engines:
        return None, "the bundle has no usable TensorRT engine"
    try:
        trt = import_tensorrt()
        device = cuda.device_info(gpu)
    except BackendError as exc:
        return None, str(exc)
    why = []
    for art in engines:
        reasons = engine_mismatches(art.get("engine"), device, trt.__version__)
        if not reasons:
            return art, f"{art['file']} matches {device['name']} and TensorRT {trt.__version__}"
        why.append(f"{art['file']}: {'; '.join(reasons)}")
    return None, "; ".join(why)


def cuda_provider() -> bool:
    """Whether this onnxruntime build lists the CUDA execution provider (listing is not starting)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose(
    bundle: Bundle, backend: str = "auto", device: str = "auto", gpu: int = 0, artifact: str | None = None
) -> tuple[str, str]:
    """Resolve ``backend`` and ``device`` to a concrete backend name and a one-line reason.

    Args:
        bundle: The loaded bundle (its engines are checked for ``trt``).
        backend: One of :data:`BACKENDS`.
        device: One of :data:`DEVICES` (module docstring).
        gpu: CUDA device ordinal the engine must match.
        artifact: The ``--artifact`` asked for, if any: an engine file needs ``trt``, an ONNX file
            onnxruntime.

    Raises:
        BackendError: An unknown name, or a backend and a device that contradict each other.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BackendError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if backend != "auto":
        runs_on = "cpu" if backend == "ort-cpu" else "cuda"
        if device not in ("auto", runs_on):
            raise BackendError(f"--backend {backend} runs on {runs_on}, but --device {device} was given")
        return backend, "asked for with --backend"
    # An artifact named by file fixes the kind; a precision (fp16) leaves the choice to the rules below.
    kind = next((a.get("kind") for a in bundle.artifacts if a.get("file") == artifact), None)
    if device == "cpu":
        if kind == ENGINE_KIND:
            raise BackendError(
                f"--artifact {artifact} is a TensorRT engine, which needs a GPU, not --device cpu"
            )
        return "ort-cpu", "--device cpu"
    if kind == ENGINE_KIND:
        return "trt", f"--artifact {artifact} is a TensorRT engine"
    if kind is None:
        engine, why_not_trt = find_engine(bundle, gpu)
        if engine is not None:
            return "trt", f"TensorRT engine {why_not_trt}"
    elif kind == "explain":  # what Predictor(explain=True) / --explain runs
        why_not_trt = "--explain runs on onnxruntime"
    else:
        why_not_trt = f"--artifact {artifact} is not an engine"
    if cuda_provider():
        return "ort-cuda", f"onnxruntime has CUDA; no TensorRT ({why_not_trt})"
    if device == "cuda":  # insisted on a GPU: ort-cuda fails loudly and lists the providers
        return "ort-cuda", f"--device cuda; no TensorRT ({why_not_trt})"
    return "ort-cpu", f"no GPU backend: no TensorRT ({why_not_trt}); onnxruntime has no CUDA provider"


# The ONNX artifacts each onnxruntime device prefers, fastest first (benchmarks/RESULTS.md): on the CPU
# the INT8 QDQ model runs onnxruntime's integer kernels; on CUDA, FP16 (onnxruntime's CUDA provider has
# no fused INT8 convolutions for QDQ graphs: INT8 on a GPU is TensorRT's, --backend trt).
ARTIFACT_PREFERENCE = {"cpu": ("int8", "fp32"), "cuda": ("fp16", "fp32")}


def choose_artifact(bundle: Bundle, device: str, requested: str | None = None) -> tuple[dict, str]:
    """The ONNX artifact onnxruntime runs on ``device`` (``cpu`` / ``cuda``), and why (one line).

    Args:
        bundle: The loaded bundle.
        device: ``cpu`` or ``cuda``.
        requested: ``--artifact``: a manifest file name or a precision (``fp32``, ``fp16``, ``int8``);
            None picks the fastest usable artifact for ``device`` (:data:`ARTIFACT_PREFERENCE`).

    Raises:
        BundleError: The requested artifact is not in the bundle or is marked unusable, or no artifact
            for ``device`` is usable; one line listing the artifacts.
    """
    if requested is not None:
        art = bundle.artifact(requested)
        return art, "--explain" if art.get("kind") == "explain" else f"--artifact {requested}"
    prefer = ARTIFACT_PREFERENCE[device]
    for rank, precision in enumerate(prefer):
        usable = [
            a
            for a in bundle.usable_artifacts()
            if a.get("kind") == "onnx" and a.get("precision") == precision
        ]
        if usable:
            skipped = f" (no usable {' or '.join(prefer[:rank])})" if rank else ""
            return usable[0], f"{precision}, the fastest usable artifact on {device}{skipped}"
    return bundle.artifact(prefer[-1]), ""  # raises with the list of artifacts and why none is usable


def open_backend(
    bundle: Bundle,
    backend: str = "auto",
    artifact: str | None = None,
    device: str = "auto",
    gpu: int = 0,
    intra_op_threads: int | None = None,
    cuda_graphs: bool = False,
    tf32: bool = False,
) -> Selection:
    """Open and activate the backend ``backend`` and ``device`` resolve to, on the artifact it should run.

    Args:
        bundle: The loaded bundle.
        backend: ``auto``, ``ort-cpu``, ``ort-cuda`` or ``trt``.
        artifact: A manifest file name or precision; None lets the backend choose (ort-cpu: int8 when
            usable, else fp32; ort-cuda: fp16 when usable, else fp32; trt: the engine for this GPU).
        device: ``auto``, ``cpu`` or ``cuda`` (module docstring).
        gpu: CUDA device ordinal of the GPU backends.
        intra_op_threads: onnxruntime intra-op threads.
        cuda_graphs: Replay each batch size as a CUDA graph (``trt`` only).
        tf32: Let onnxruntime CUDA run FP32 math in TF32 (reported as precision ``tf32``); a speed
            setting, never used by parity checks.

    Raises:
        BackendError: The chosen backend cannot run here or the artifact does not fit it; one line.
    """
    name, reason = choose(bundle, backend, device, gpu, artifact)
    if cuda_graphs and name != "trt":
        raise BackendError(f"--cuda-graphs needs the trt backend, but {name} was selected ({reason})")
    if name == "trt":
        opened, art = _open_trt(bundle, artifact, gpu, cuda_graphs)
    else:
        from .onnxruntime import ProviderStartError

        try:
            opened, art, why = _open_ort(bundle, name, artifact, gpu, intra_op_threads, tf32)
        except ProviderStartError as exc:
            _fall_back_to_cpu(exc, allowed=backend == "auto" and device == "auto")
            reason = f"the CUDA provider did not start, so the CPU (auto had picked ort-cuda: {reason})"
            name = "ort-cpu"
            opened, art, why = _open_ort(bundle, name, artifact, gpu, intra_op_threads, tf32)
        reason = f"{reason}; {art['file']}: {why}"
    log.info("backend %s on %s: %s", name, art["file"], reason)
    return Selection(opened, art, reason)


def _fall_back_to_cpu(exc: BackendError, allowed: bool) -> None:
    """The one fallback (module docstring): warn and go on with the CPU when allowed, else raise ``exc``."""
    if not allowed:  # a GPU asked for, by --backend or --device cuda, never falls back
        raise exc
    log.warning("%s", exc)


def _open_trt(bundle: Bundle, artifact: str | None, gpu: int, cuda_graphs: bool) -> tuple[Backend, dict]:
    from .tensorrt import TrtBackend

    if artifact is None:
        art, why = find_engine(bundle, gpu)
        if art is None:
            raise BackendError(f"{bundle.path}: --backend trt cannot run: {why}")
    else:
        art = bundle.artifact(artifact, kind=ENGINE_KIND)
    if art.get("kind") != ENGINE_KIND:
        raise BackendError(f"{art['file']}: kind {art.get('kind')!r} is not a TensorRT engine")
    backend = TrtBackend(
        bundle.artifact_path(art),
        art.get("engine"),
        precision=art.get("precision", "fp16"),
        cuda_graphs=cuda_graphs,
        device=gpu,
    )
    return backend.activate(), art


def _open_ort(
    bundle: Bundle, name: str, artifact: str | None, gpu: int, intra_op_threads: int | None, tf32: bool
) -> tuple[Backend, dict, str]:
    """An active :class:`OrtBackend` for ``ort-cpu`` / ``ort-cuda`` on the artifact :func:`choose_artifact`
    picks; returns (backend, artifact entry, why that artifact).
    """
    from .onnxruntime import OrtBackend

    ort_device = name.removeprefix("ort-")
    art, why = choose_artifact(bundle, ort_device, artifact)
    if art.get("kind") not in ("onnx", "explain"):  # the explain artifact is an ONNX graph too
        raise BackendError(
            f"{bundle.path / art['file']}: kind {art.get('kind')!r} has no backend on {name}; "
            "pass an ONNX artifact (--artifact model.onnx) or --backend trt"
        )
    backend = OrtBackend(
        bundle.artifact_path(art),
        device=ort_device,
        gpu=gpu,
        intra_op_threads=intra_op_threads,
        precision=art.get("precision", "fp32"),
        tf32=tf32,
    )
    return backend.activate(), art, why


def open_onnx(
    model_path: str | os.PathLike,
    device: str = "cpu",
    precision: str = "fp32",
    gpu: int = 0,
    intra_op_threads: int | None = None,
) -> Backend:
    """An active onnxruntime backend for an ONNX file outside a bundle (crc-export's parity runs).

    ``device`` means what it means everywhere (module docstring): ``auto`` runs on CUDA when the provider
    starts, else on the CPU with a warning. TF32 stays off: these are parity runs.
    """
    from .onnxruntime import OrtBackend, ProviderStartError

    if device not in DEVICES:
        raise BackendError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    on = "cuda" if device == "cuda" or (device == "auto" and cuda_provider()) else "cpu"
    backend = OrtBackend(model_path, on, gpu=gpu, precision=precision, intra_op_threads=intra_op_threads)
    try:
        return backend.activate()
    except ProviderStartError as exc:
        _fall_back_to_cpu(exc, allowed=device == "auto")
        cpu = OrtBackend(model_path, "cpu", precision=precision, intra_op_threads=intra_op_threads)
        return cpu.activate()
