"""Backend selection: ``auto | ort-cpu | ort-cuda | trt``, each with the artifact it runs and why.

``auto`` picks the fastest backend usable here: ``trt`` when tensorrt and cuda-bindings import, a CUDA
device is visible and the bundle holds a usable engine built for this GPU and TensorRT release; else
``ort-cuda`` when onnxruntime has the CUDA provider; else ``ort-cpu``. It always says which and why.
A GPU backend asked for by name never falls back: it fails with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..bundle import Bundle
from ..errors import BackendError
from .base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")
ENGINE_KIND = "tensorrt"


@dataclass
class Selection:
    """An open backend, the manifest artifact it runs, and why it was chosen (one line)."""

    backend: Backend
    artifact: dict
    reason: str


def find_engine(bundle: Bundle) -> tuple[dict | None, str]:
    """The bundle's usable TensorRT engine for this GPU and TensorRT release, or None and why not."""
    from . import cuda
    from .tensorrt import engine_mismatches, import_tensorrt

    engines = [a for a in bundle.usable_artifacts() if a.get("kind") == ENGINE_KIND]
    if not engines:
        return None, "the bundle has no usable TensorRT engine"
    try:
        trt = import_tensorrt()
        device = cuda.device_info()
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
    """Whether this onnxruntime build has the CUDA execution provider."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose(bundle: Bundle, backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """Resolve ``backend`` (and the older ``--device`` hint) to a concrete backend name and a reason.

    Args:
        bundle: The loaded bundle (its engines are checked for ``trt``).
        backend: One of :data:`BACKENDS`.
        device: ``auto``, ``cpu`` or ``cuda``; only narrows ``auto``.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, "asked for with --backend"
    if device == "cpu":
        return "ort-cpu", "--device cpu"
    engine, why_not_trt = find_engine(bundle)
    if engine is not None:
        return "trt", f"TensorRT engine {why_not_trt}"
    if cuda_provider():
        return "ort-cuda", f"onnxruntime has CUDA; no TensorRT ({why_not_trt})"
    if device == "cuda":  # insisted on a GPU: ort-cuda will fail loudly and list the providers
        return "ort-cuda", f"--device cuda; no TensorRT ({why_not_trt})"
    return "ort-cpu", f"no GPU backend: no TensorRT ({why_not_trt}); onnxruntime has no CUDA provider"


def _onnx_artifact(bundle: Bundle, name: str | None, prefer: tuple[str, ...]) -> dict:
    if name is not None:
        return bundle.artifact(name)
    for precision in prefer:
        usable = [
            a
            for a in bundle.usable_artifacts()
            if a.get("kind") == "onnx" and a.get("precision") == precision
        ]
        if usable:
            return usable[0]
    return bundle.artifact(prefer[-1])  # raises with the list of artifacts and why none is usable


def open_backend(
    bundle: Bundle,
    backend: str = "auto",
    artifact: str | None = None,
    device: str = "auto",
    intra_op_threads: int | None = None,
    cuda_graphs: bool = False,
) -> Selection:
    """Open the backend ``backend`` resolves to, on the artifact it should run.

    Args:
        bundle: The loaded bundle.
        backend: ``auto``, ``ort-cpu``, ``ort-cuda`` or ``trt``.
        artifact: A manifest file name or precision; None lets the backend choose (ort-cpu: fp32;
            ort-cuda: fp16 when usable, else fp32; trt: the engine for this GPU).
        device: Older ``--device`` hint (``auto``/``cpu``/``cuda``), used only by ``auto``.
        intra_op_threads: onnxruntime intra-op threads.
        cuda_graphs: Replay each batch size as a CUDA graph (``trt`` only).

    Raises:
        BackendError: The chosen backend cannot run here or the artifact does not fit it; one line.
    """
    name, reason = choose(bundle, backend, device)
    if cuda_graphs and name != "trt":
        raise BackendError(f"--cuda-graphs needs the trt backend, but {name} was selected ({reason})")
    if name == "trt":
        from .tensorrt import TrtBackend

        if artifact is None:
            art, why = find_engine(bundle)
            if art is None:
                raise BackendError(f"{bundle.path}: --backend trt cannot run: {why}")
        else:
            art = bundle.artifact(artifact, kind=ENGINE_KIND)
        if art.get("kind") != ENGINE_KIND:
            raise BackendError(f"{art['file']}: kind {art.get('kind')!r} is not a TensorRT engine")
        opened = TrtBackend(
            bundle.artifact_path(art),
            art.get("engine"),
            precision=art.get("precision", "fp16"),
            cuda_graphs=cuda_graphs,
        )
    else:
        from .onnxruntime import ProviderStartError

        try:
            opened, art = _open_ort(bundle, name, artifact, intra_op_threads)
        except ProviderStartError as exc:
            if backend != "auto" or device == "cuda":  # a GPU asked for by name never falls back
                raise
            # auto picks the fastest backend that works: onnxruntime-gpu is installed, CUDA is not usable.
            log.warning("%s", exc)
            reason = f"the CUDA provider did not start, so the CPU (auto had picked ort-cuda: {reason})"
            name = "ort-cpu"
            opened, art = _open_ort(bundle, name, artifact, intra_op_threads)
    log.info("backend %s on %s: %s", name, art["file"], reason)
    return Selection(opened, art, reason)


def _open_ort(bundle: Bundle, name: str, artifact: str | None, intra_op_threads: int | None):
    """An :class:`OrtBackend` for ``ort-cpu`` / ``ort-cuda`` on the artifact that backend prefers."""
    from .onnxruntime import OrtBackend

    ort_device = name.removeprefix("ort-")
    prefer = ("fp16", "fp32") if ort_device == "cuda" else ("fp32",)
    art = _onnx_artifact(bundle, artifact, prefer)
    if art.get("kind") != "onnx":
        raise BackendError(
            f"{bundle.path / art['file']}: kind {art.get('kind')!r} has no backend on {name}; "
            "pass an ONNX artifact (--artifact model.onnx) or --backend trt"
        )
    opened = OrtBackend(
        bundle.artifact_path(art),
        device=ort_device,
        intra_op_threads=intra_op_threads,
        precision=art.get("precision", "fp32"),
    )
    return opened, art
