"""The inference pipeline: decode + resize pairs, batch them, run a backend, collect predictions."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from .atomic import atomic_write_text
from .backends.base import Backend
from .bundle import Bundle
from .errors import BundleError, ImageError
from .images import CHANNELS, load_image
from .pairs import Pair, PairSet, Skip

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One pair's result: class probabilities, predicted index and the label index (None if unlabelled)."""

    id: str
    probs: np.ndarray
    predicted: int
    label: int | None


@dataclass
class InferenceResult:
    """Everything a run produced, including the timings for the latency report."""

    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0  # decode + resize + infer, without the untimed warm-up call
    warmup_seconds: float = 0.0
    batch_size: int = 0
    resumed: int = 0  # pairs left out because a resumed run already wrote them

    @property
    def accuracy(self) -> tuple[float, int] | None:
        """(accuracy, labelled pairs), or None when no pair has a label."""
        labelled = [p for p in self.predictions if p.label is not None]
        if not labelled:
            return None
        return sum(p.predicted == p.label for p in labelled) / len(labelled), len(labelled)


def resolve_label(label: str | None, classes: list[str]) -> int | None:
    """A class name or a class index (as text) to an index; None stays None.

    Raises:
        ValueError: The label names no class of the bundle.
    """
    if label is None or label == "":
        return None
    if label in classes:
        return classes.index(label)
    if label.isdigit() and int(label) < len(classes):
        return int(label)
    raise ValueError(f"label {label!r} is neither a class name nor an index below {len(classes)}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row max for stability)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def input_plan(bundle: Bundle) -> list[tuple[str, str]]:
    """(input name, color mode) per model input, checked against what this runtime can decode."""
    plan = []
    for spec in bundle.inputs:
        name, mode = spec["name"], spec.get("color_mode")
        if name not in ("pathology", "radiology"):
            raise BundleError(
                f"{bundle.path}: input {name!r} is not pathology or radiology; upgrade crc-fusion"
            )
        if mode not in CHANNELS or spec["shape"][-1] != CHANNELS[mode]:
            raise BundleError(
                f"{bundle.path}: input {name} color_mode {mode!r} does not fit shape {spec['shape']}"
            )
        plan.append((name, mode))
    return plan


def check_backend(bundle: Bundle, backend: Backend) -> None:
    """The manifest's inputs must be the model's own: same names, dtypes and ranks.

    Raises:
        BundleError: One line naming the first disagreement.
    """
    model = {s.name: s for s in backend.input_specs}
    wanted = {spec["name"]: spec for spec in bundle.inputs}
    if set(model) != set(wanted):
        raise BundleError(
            f"{bundle.path}: manifest inputs {sorted(wanted)} but the model has {sorted(model)}; "
            "re-export the bundle"
        )
    for name, spec in wanted.items():
        if model[name].dtype != spec["dtype"] or len(model[name].shape) != len(spec["shape"]):
            raise BundleError(
                f"{bundle.path}: manifest says input {name} is {spec['dtype']} {spec['shape']}, "
                f"the model has {model[name].describe()}; re-export the bundle"
            )


def _decode(pair: Pair, plan: list[tuple[str, str]], size: int) -> dict[str, np.ndarray]:
    return {name: load_image(getattr(pair, name), mode, size) for name, mode in plan}


def run_inference(
    pairset: PairSet,
    bundle: Bundle,
    backend: Backend,
    batch_size: int = 32,
    warmup: bool = True,
    skip_ids: Collection[str] = frozenset(),
    on_batch: Callable[[list[Prediction]], None] | None = None,
) -> InferenceResult:
    """Decode, batch and run every pair; undecodable pairs and unknown labels are skipped with a reason.

    Args:
        pairset: Pairs from :func:`crc_runtime.pairs.discover_pairs`.
        bundle: The loaded bundle (classes, inputs, resize size).
        backend: Any :class:`~crc_runtime.backends.base.Backend`.
        batch_size: Pairs per model call.
        warmup: Run the first batch once untimed so lazy initialisation does not count as latency.
        skip_ids: Ids already done (``crc-infer --resume``): counted in ``resumed``, not decoded.
        on_batch: Called with each batch's predictions, in pair order, as soon as they exist
            (the :class:`~crc_runtime.predictions.PredictionWriter` appends them to disk).
    """
    plan = input_plan(bundle)
    check_backend(bundle, backend)
    result = InferenceResult(skipped=list(pairset.skipped), batch_size=batch_size)
    start = time.perf_counter()
    batch: list[tuple[Pair, int | None, dict[str, np.ndarray]]] = []

    def flush() -> None:
        inputs = {name: np.stack([b[2][name] for b in batch]) for name, _ in plan}
        if warmup and not result.batch_seconds:
            t_warm = time.perf_counter()
            backend.infer(inputs)
            result.warmup_seconds = time.perf_counter() - t_warm
        t0 = time.perf_counter()
        logits = backend.infer(inputs)["logits"]
        result.batch_seconds.append(time.perf_counter() - t0)
        if logits.ndim != 2 or logits.shape[1] != len(bundle.classes):
            raise BundleError(
                f"{bundle.path}: model gives logits {list(logits.shape)} but the manifest "
                f"lists {len(bundle.classes)} classes; re-export the bundle"
            )
        for (pair, label, _), probs in zip(batch, softmax(logits), strict=True):
            result.predictions.append(Prediction(pair.id, probs, int(probs.argmax()), label))
        if on_batch is not None:
            on_batch(result.predictions[-len(batch) :])
        batch.clear()

    for pair in pairset.pairs:
        if pair.id in skip_ids:
            result.resumed += 1
            continue
        try:
            label = resolve_label(pair.label, bundle.classes)
            arrays = _decode(pair, plan, bundle.image_size)
        except ImageError as exc:
            result.skipped.append(Skip(pair.id, str(exc)))
            continue
        except ValueError as exc:
            result.skipped.append(Skip(pair.id, str(exc)))
            continue
        batch.append((pair, label, arrays))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    result.total_seconds = time.perf_counter() - start - result.warmup_seconds
    return result


def column_names(classes: list[str]) -> list[str]:
    """``prob_<class>`` per class: lower case, runs of other characters as ``_``, made unique."""
    names: list[str] = []
    for i, cls in enumerate(classes):
        base = "prob_" + (re.sub(r"[^0-9a-z]+", "_", cls.lower()).strip("_") or str(i))
        name = base if base not in names else f"{base}_{i}"
        names.append(name)
    return names


def prediction_columns(classes: list[str]) -> list[str]:
    """The predictions.csv header: id, predicted, prob_<class>..., label, correct."""
    return ["id", "predicted", *column_names(classes), "label", "correct"]


def prediction_row(p: Prediction, classes: list[str]) -> list[str]:
    """One predictions.csv row (probabilities with 6 decimals; label and correct empty when unlabelled)."""
    label = "" if p.label is None else classes[p.label]
    correct = "" if p.label is None else str(int(p.predicted == p.label))
    return [p.id, classes[p.predicted], *(f"{x:.6f}" for x in p.probs), label, correct]


def write_predictions(path: str | os.PathLike, result: InferenceResult, classes: list[str]) -> None:
    """Write predictions.csv atomically in one go (the CLI streams rows with PredictionWriter instead)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(prediction_columns(classes))
    writer.writerows(prediction_row(p, classes) for p in result.predictions)
    atomic_write_text(path, buf.getvalue())
