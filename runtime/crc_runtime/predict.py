"""The folder pipeline: decode + resize pairs in a bounded thread pool, batch them, run a Predictor."""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends.base import Backend
from .bundle import Bundle
from .confine import Confined
from .errors import BundleError, ImageError
from .images import CHANNELS, load_image
from .pairs import Pair, PairSet, Skip, label_index

if TYPE_CHECKING:
    from .explain import ExplainWriter
    from .predictor import Predictor

log = logging.getLogger(__name__)

NON_FINITE = "the model gave NaN or infinite logits for this pair, so no prediction (run crc-infer validate)"


@dataclass
class Prediction:
    """One pair's result: class probabilities, predicted index and the label index (None if unlabelled)."""

    id: str
    probs: np.ndarray
    predicted: int
    label: int | None
    extra: list[str] = field(default_factory=list)  # cells of extra columns (the --explain margin split)


@dataclass
class InferenceResult:
    """Everything a run produced, including the timings for the latency report."""

    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)  # timed model calls (after the warm-up)
    total_seconds: float = 0.0  # wall time of the whole run: decode + resize + infer, every batch
    warmup_seconds: float = 0.0  # the first model call, when it served as the warm-up
    warmup_pairs: int = 0  # pairs of that call (0: no warm-up); their predictions are kept
    batch_size: int = 0
    resumed: int = 0  # pairs left out because a resumed run already wrote them
    processed: int = 0  # pairs predicted (also counted when predictions are not kept)
    labelled: int = 0
    correct: int = 0
    batch_pairs: list[int] = field(default_factory=list)  # pairs in each timed batch
    stage_ms: dict[str, list[float]] = field(default_factory=dict)  # backend stages per batch (h2d, ...)
    decode_wait_seconds: float = 0.0  # time inference waited for decoding (0 when decode keeps up)
    workers: int = 0


def resolve_label(label: str | None, classes: list[str]) -> int | None:
    """A class name or a class index (as text) to an index; None stays None.

    Raises:
        ValueError: The label names no class of the bundle.
    """
    if label is None or label == "":
        return None
    index = label_index(label, classes)
    if index is not None:
        return index
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


def check_backend(bundle: Bundle, backend: Backend, artifact: dict | None = None) -> None:
    """The manifest's inputs and outputs must be the model's own (:meth:`Bundle.check_model`); an
    ``artifact`` that declares its own ``outputs`` (the explain graph) is checked against those.

    Raises:
        BundleError: One line naming the first disagreement.
    """
    declared = (artifact or {}).get("outputs")
    bundle.check_model(backend.input_specs, backend.output_specs, bundle.path, declared)


def _decode(
    pair: Pair, plan: list[tuple[str, str]], size: int, confined: Confined | None
) -> dict[str, np.ndarray]:
    return {name: load_image(getattr(pair, name), mode, size, confined=confined) for name, mode in plan}


def default_workers() -> int:
    """Decode threads: one per usable core, at most 8 (Pillow releases the GIL while it decodes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def run_inference(
    pairset: PairSet,
    predictor: Predictor,
    warmup: bool = True,
    skip_ids: Collection[str] = frozenset(),
    on_batch: Callable[[list[Prediction]], None] | None = None,
    workers: int | None = None,
    prefetch_batches: int = 2,
    keep_predictions: bool = True,
    on_progress: Callable[[int], None] | None = None,
    decode: Callable[[Any], dict[str, np.ndarray]] | None = None,
    explainer: ExplainWriter | None = None,
) -> InferenceResult:
    """Decode, batch and run every pair; undecodable pairs and unknown labels are skipped with a reason.

    Decoding streams: a pool of ``workers`` threads decodes and resizes pairs in input order while the
    backend runs the current batch. At most ``prefetch_batches x batch_size`` pairs are queued for or
    held after decoding, plus the batch being filled, so at most ``(prefetch_batches + 1) x batch_size``
    decoded pairs exist at once whatever the folder size. Predictions come out in input order.

    Args:
        pairset: Pairs from :func:`crc_runtime.pairs.discover_pairs`.
        predictor: The open :class:`~crc_runtime.predictor.Predictor` (bundle, backend, batch size);
            each batch is one :meth:`~crc_runtime.predictor.Predictor.infer` call, the step
            :meth:`~crc_runtime.predictor.Predictor.predict` makes too.
        warmup: Treat the first batch as the warm-up: its predictions are kept, but its time (lazy
            initialisation, first-call allocations) goes to ``warmup_seconds``, not to the latency
            statistics. Nothing is computed twice, so a one-batch job costs one model call.
        skip_ids: Ids already done (``crc-infer --resume``): counted in ``resumed``, not decoded.
        on_batch: Called with each batch's predictions, in pair order, as soon as they exist
            (the :class:`~crc_runtime.predictions.PredictionWriter` appends them to disk).
        workers: Decode threads (None: :func:`default_workers`; 0: decode on the calling thread).
        prefetch_batches: Batches decoded ahead of the one running.
        keep_predictions: Keep every Prediction in ``result.predictions``; False keeps memory flat
            (counts and accuracy are still kept; use ``on_batch`` to see the rows).
        on_progress: Called with the number of pairs just finished (predicted or skipped), for a
            progress bar.
        decode: Makes one item of ``pairset.pairs`` into the model's input arrays, ``{input name: uint8
            [S, S, C]}``, in the worker threads (default: decode and resize the pair's two image files).
            Items need an ``id`` and a ``label``; whole-slide runs pass tiles and their tile reader
            (:mod:`crc_runtime.slide`). An :class:`ImageError` or ValueError skips the item; any other
            error ends the run.
        explainer: With a predictor on the explain artifact (``Predictor(..., explain=True)``): writes
            each batch's overlays right after the batch has run and puts its margin split in
            ``Prediction.extra``, before ``on_batch`` sees the batch (folder runs: the items are pairs).
    """
    bundle, plan, batch_size = predictor.bundle, predictor.plan, predictor.batch_size
    if decode is None:

        def decode(pair: Pair) -> dict[str, np.ndarray]:
            return _decode(pair, plan, bundle.image_size, pairset.confined)

    progress = on_progress or (lambda done: None)
    workers = default_workers() if workers is None else max(0, int(workers))
    result = InferenceResult(skipped=list(pairset.skipped), batch_size=batch_size, workers=workers)
    start = time.perf_counter()
    batch: list[tuple[Pair, int | None, dict[str, np.ndarray]]] = []

    def flush() -> None:
        out = predictor.infer({name: np.stack([b[2][name] for b in batch]) for name, _ in plan})
        if warmup and not result.warmup_pairs:
            result.warmup_seconds, result.warmup_pairs = predictor.last_seconds, len(batch)
        else:
            result.batch_seconds.append(predictor.last_seconds)
            result.batch_pairs.append(len(batch))
            for stage, ms in predictor.backend.last_timings.items():
                result.stage_ms.setdefault(stage, []).append(ms)
        finite = np.isfinite(out.logits).all(axis=1)  # a NaN row would be "predicted" as class 0
        for (pair, _, _), ok in zip(batch, finite, strict=True):
            if not ok:
                result.skipped.append(Skip(pair.id, NON_FINITE, "non-finite logits"))
        preds = [
            Prediction(pair.id, probs, int(probs.argmax()), label)
            for (pair, label, _), probs, ok in zip(batch, out.probs, finite, strict=True)
            if ok
        ]
        if explainer is not None and preds:
            outputs = {name: value[finite] for name, value in {"logits": out.logits, **out.outputs}.items()}
            explained = explainer.write_batch(
                [b[0] for b, ok in zip(batch, finite, strict=True) if ok], outputs
            )
            for p, cells in zip(preds, explained, strict=True):
                p.extra = cells
        result.processed += len(preds)
        for p in preds:
            if p.label is not None:
                result.labelled += 1
                result.correct += int(p.predicted == p.label)
        if keep_predictions:
            result.predictions.extend(preds)
        if on_batch is not None:
            on_batch(preds)
        progress(len(batch))
        batch.clear()

    todo = iter(pairset.pairs)
    pending: deque[tuple[Pair, int | None, Future | None]] = deque()
    limit = max(1, prefetch_batches) * batch_size
    pool = ThreadPoolExecutor(workers, thread_name_prefix="crc-decode") if workers else None

    def fill() -> None:
        while len(pending) < limit:
            pair = next(todo, None)
            if pair is None:
                return
            if pair.id in skip_ids:
                result.resumed += 1
                continue
            try:
                label = resolve_label(pair.label, bundle.classes)
            except ValueError as exc:
                result.skipped.append(Skip(pair.id, str(exc), "unknown label"))
                progress(1)
                continue
            job = pool.submit(decode, pair) if pool else None
            pending.append((pair, label, job))

    try:
        fill()
        while pending:
            pair, label, job = pending.popleft()
            t_wait = time.perf_counter()
            try:
                arrays = job.result() if job is not None else decode(pair)
            except (ImageError, ValueError) as exc:
                result.skipped.append(Skip(pair.id, str(exc), getattr(exc, "kind", "bad image")))
                progress(1)
                continue
            finally:
                result.decode_wait_seconds += time.perf_counter() - t_wait
                fill()
            batch.append((pair, label, arrays))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        if pool is not None:
            for _, _, job in pending:
                job.cancel()
            pool.shutdown(wait=True)
    result.total_seconds = time.perf_counter() - start
    return result


def column_names(classes: list[str]) -> list[str]:
    """``prob_<class>`` per class: lower case, runs of other characters as ``_``, made unique."""
    names: list[str] = []
    for i, cls in enumerate(classes):
        base = "prob_" + (re.sub(r"[^0-9a-z]+", "_", cls.lower()).strip("_") or str(i))
        name = base if base not in names else f"{base}_{i}"
        names.append(name)
    return names


def prediction_columns(classes: list[str], extra: Sequence[str] = ()) -> list[str]:
    """The predictions.csv header: id, predicted, prob_<class>..., the ``extra`` columns, label, correct."""
    return ["id", "predicted", *column_names(classes), *extra, "label", "correct"]


def prediction_row(p: Prediction, classes: list[str]) -> list[str]:
    """One predictions.csv row (probabilities with 6 decimals; label and correct empty when unlabelled)."""
    label = "" if p.label is None else classes[p.label]
    correct = "" if p.label is None else str(int(p.predicted == p.label))
    return [p.id, classes[p.predicted], *(f"{x:.6f}" for x in p.probs), *p.extra, label, correct]
