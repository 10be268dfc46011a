"""The public Python API: run a bundle on image pairs from your own code (a service, a script).

    from crc_runtime import Predictor

    with Predictor("bundle") as predictor:                 # backend="auto": TensorRT, CUDA or CPU
        result = predictor.predict("tile.png", "ct_slice.png")
        print(result.predicted[0], result.probs[0].max())

``Predictor("bundle", explain=True)`` runs the bundle's explain graph instead: the same logits, and in
``Predictions.outputs`` each branch's class activation maps and the head's bias
(:func:`crc_runtime.explain.margin_split` splits each margin by modality; docs/runtime.md).

``predict`` takes paths, Pillow images or numpy uint8 arrays, one pair or a list of pairs (or a batch
array ``[N, H, W, C]``), and decodes and resizes them with the same rules as ``crc-infer`` (Pillow
BILINEAR to the bundle's size). ``crc-infer FOLDER`` is built on this class: its batches go through
:meth:`Predictor.infer`, the same step :meth:`Predictor.predict` takes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .backends import Selection, open_backend
from .backends.base import Backend
from .bundle import MANIFEST_NAME, Bundle, load_bundle, sha256_file
from .errors import UserError
from .explain import explain_artifact
from .images import CHANNELS, conform_image, load_image
from .pairs import PairSet
from .predict import InferenceResult, check_backend, input_plan, run_inference, softmax

log = logging.getLogger(__name__)

#: One image: a file path, a Pillow image, or a numpy uint8 array ``[H, W]`` / ``[H, W, C]``.
ImageLike = str | os.PathLike | Image.Image | np.ndarray


@dataclass(frozen=True)
class Predictions:
    """What :meth:`Predictor.predict` returns for N pairs.

    Attributes:
        classes: Class names, in the column order of ``logits`` and ``probs``.
        logits: float32 ``[N, C]``, the model's output.
        probs: float64 ``[N, C]``, softmax of the logits (each row sums to 1).
        outputs: The model's other outputs by name, batch first: with ``explain=True`` the maps
            ``<branch>_cam`` ``[N, C, h, w]`` and ``bias`` ``[N, C]`` (docs/bundle.md); else empty.
    """

    classes: list[str]
    logits: np.ndarray
    probs: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def indices(self) -> np.ndarray:
        """Predicted class index per pair, int64 ``[N]``."""
        return self.probs.argmax(axis=1)

    @property
    def predicted(self) -> list[str]:
        """Predicted class name per pair."""
        return [self.classes[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.probs)


class Predictor:
    """A bundle opened on a backend, ready to classify image pairs.

    Args:
        bundle: The bundle folder written by crc-export (or a :class:`~crc_runtime.bundle.Bundle`).
        backend: ``auto`` (fastest that runs here, see :mod:`crc_runtime.backends`), ``ort-cpu``,
            ``ort-cuda`` or ``trt``. A backend named here never falls back.
        batch_size: Pairs per model call.
        artifact: A manifest file name or precision to run instead of the backend's choice.
        device: ``auto``, ``cpu`` or ``cuda``: where the model runs.
        gpu: CUDA device ordinal.
        threads: onnxruntime intra-op threads (None: onnxruntime decides).
        cuda_graphs: Replay each batch size as a CUDA graph (``trt`` only).
        tf32: Let onnxruntime CUDA run FP32 math in TF32 (faster; reported as precision ``tf32``).
        explain: Run the bundle's explain artifact (``model.explain.onnx``, onnxruntime only) so every
            call also returns each branch's class activation maps (``Predictions.outputs``).

    Raises:
        UserError: The bundle is invalid or the backend cannot run here; one line saying why.
    """

    def __init__(
        self,
        bundle: str | os.PathLike | Bundle,
        backend: str = "auto",
        batch_size: int = 32,
        *,
        artifact: str | None = None,
        device: str = "auto",
        gpu: int = 0,
        threads: int | None = None,
        cuda_graphs: bool = False,
        tf32: bool = False,
        explain: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        #: The explain artifact's manifest entry (branches, outputs) when ``explain``, else None.
        self.explain: dict | None = None
        if explain:
            self.explain = explain_artifact(self.bundle)
            if backend == "trt":
                raise UserError(
                    f"--explain runs {self.explain['file']} on onnxruntime; use --backend auto, ort-cpu "
                    "or ort-cuda"
                )
            if artifact is not None and artifact != self.explain["file"]:
                raise UserError(f"--explain runs {self.explain['file']}; drop --artifact {artifact}")
            artifact = self.explain["file"]
        self.batch_size = int(batch_size)
        self.plan = input_plan(self.bundle)
        t0 = time.perf_counter()
        self.selection: Selection = open_backend(
            self.bundle, backend, artifact, device, gpu, threads, cuda_graphs, tf32
        )
        self.load_seconds = time.perf_counter() - t0  # opening the backend: session or engine load
        self.last_seconds = 0.0  # wall time of the last model call
        try:
            # with explain, against the artifact's own outputs, which explain_artifact checked hold every
            # output the explanations read
            check_backend(self.bundle, self.backend, self.explain)
        except BaseException:
            self.close()
            raise

    @property
    def backend(self) -> Backend:
        """The active backend: ``name``, ``device``, ``precision``, ``version``, ``device_info``, ..."""
        return self.selection.backend

    @property
    def artifact(self) -> dict:
        """The manifest entry of the artifact that runs."""
        return self.selection.artifact

    def model_key(self) -> dict:
        """What identifies the model that runs, for resuming an output: the manifest's sha256 (it lists every
        file's) and the artifact."""
        return {
            "manifest_sha256": sha256_file(self.bundle.path / MANIFEST_NAME),
            "artifact": self.artifact["file"],
        }

    @property
    def reason(self) -> str:
        """Why this backend was chosen, in one line."""
        return self.selection.reason

    @property
    def classes(self) -> list[str]:
        """The bundle's class names, in logit order."""
        return self.bundle.classes

    def predict(
        self, pathology: ImageLike | Sequence[ImageLike], radiology: ImageLike | Sequence[ImageLike]
    ) -> Predictions:
        """Classify pairs: ``pathology[i]`` with ``radiology[i]``.

        Args:
            pathology: One image or a sequence of images (paths, Pillow images, uint8 arrays), or a
                uint8 batch ``[N, H, W, C]``; converted to RGB.
            radiology: The same for the radiology slices; converted to grayscale.

        Returns:
            :class:`Predictions` for the N pairs, in input order.

        Raises:
            ImageError: An image that cannot be decoded or converted (one line naming it).
            ValueError: The two modalities hold different numbers of images.
            TypeError: Something that is not an image.
        """
        size = self.bundle.image_size
        arrays = {
            name: _batch(value, name, mode, size)
            for (name, mode), value in zip(self.plan, (pathology, radiology), strict=True)
        }
        counts = {name: len(a) for name, a in arrays.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"pairs need as many images of each modality, given {counts}")
        n = next(iter(counts.values()))
        if n == 0:
            empty = np.zeros((0, len(self.classes)))
            return Predictions(self.classes, empty.astype(np.float32), empty)
        parts = [
            self.infer({name: a[i : i + self.batch_size] for name, a in arrays.items()})
            for i in range(0, n, self.batch_size)
        ]
        return Predictions(
            self.classes,
            np.concatenate([p.logits for p in parts]),
            np.concatenate([p.probs for p in parts]),
            {key: np.concatenate([p.outputs[key] for p in parts]) for key in parts[0].outputs},
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> Predictions:
        """One model call on decoded arrays (``{input name: uint8 [N, S, S, C]}``); the step every batch
        of :meth:`predict` and of ``crc-infer FOLDER`` takes. Sets :attr:`last_seconds`.

        Raises:
            BundleError: The model's logits do not match the manifest's class list.
        """
        if not self.backend.active:
            raise UserError("this Predictor is closed; make a new one")
        t0 = time.perf_counter()
        outputs = self.backend.infer(inputs)
        self.last_seconds = time.perf_counter() - t0
        logits = outputs["logits"]
        self.bundle.check_logits(logits, self.bundle.path)
        others = {name: value for name, value in outputs.items() if name != "logits"}
        return Predictions(self.classes, logits, softmax(logits), others)

    def predict_folder(self, pairset: PairSet, **options: Any) -> InferenceResult:
        """Stream the pairs of a folder (:func:`crc_runtime.pairs.discover_pairs`) through the model.

        ``options`` are those of :func:`crc_runtime.predict.run_inference` (``on_batch``, ``workers``,
        ``skip_ids``, ``keep_predictions``, ...). Bad images are skipped with their reason, not raised.
        """
        return run_inference(pairset, self, **options)

    def close(self) -> None:
        """Free the model and its device memory (a GPU backend's buffers, session or engine)."""
        self.backend.deactivate()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batch(value: Any, name: str, mode: str, size: int) -> np.ndarray:
    """Images of one modality as uint8 ``[N, size, size, C]``, each through the bundle's rules."""
    channels = CHANNELS[mode]
    if isinstance(value, np.ndarray) and value.ndim == 4:
        if value.dtype == np.uint8 and value.shape[1:] == (size, size, channels):
            return value  # already what the model takes: the rules would change nothing
        items = list(value)
    elif isinstance(value, (str, os.PathLike, Image.Image, np.ndarray)):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise TypeError(
            f"{name}: expected an image (path, PIL image, uint8 array) or a sequence of them, "
            f"given {type(value).__name__}"
        )
    arrays = [
        load_image(item, mode, size)
        if isinstance(item, (str, os.PathLike))
        else conform_image(item, mode, size, f"{name}[{i}]")
        for i, item in enumerate(items)
    ]
    return np.stack(arrays) if arrays else np.zeros((0, size, size, channels), np.uint8)
