"""Parity: compare a backend's logits with the PyTorch FP32 reference and gate them on thresholds."""

from __future__ import annotations

import logging
import math

import numpy as np

from .backends import ENGINE_KIND, open_backend
from .bundle import Bundle
from .errors import BackendError, BundleError, UserError
from .explain import EXPLAIN_KIND, explain_artifact, explain_parity, reference_cams

log = logging.getLogger(__name__)

#: Every parity threshold the gate knows (``min_*``: a lower bound; ``max_*``: an upper bound).
THRESHOLD_KEYS = (
    "min_top1_agreement",
    "max_abs_diff",
    "max_mean_abs_diff",
    "max_accuracy_delta",
    "min_cosine",
)
#: The gate's defaults per precision (DESIGN.md "Parity"); crc-export records the ones it used per
#: artifact in the manifest, and ``crc-infer validate`` gates with those.
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"min_top1_agreement": 1.0, "max_abs_diff": 1e-3},
    "fp16": {"min_top1_agreement": 0.995, "max_accuracy_delta": 0.005},
    "int8": {"min_top1_agreement": 0.99, "max_accuracy_delta": 0.01},
}
REFERENCE_INPUTS = ("pathology", "radiology")


def parse_threshold(text: str) -> tuple[str, str, float]:
    """``fp16.max_abs_diff=0.05`` -> ``("fp16", "max_abs_diff", 0.05)`` (the ``--threshold`` syntax).

    Raises:
        ValueError: One line saying what the syntax is and which part is wrong.
    """
    key, sep, value = text.partition("=")
    precision, dot, name = key.partition(".")
    if not (sep and dot) or precision not in DEFAULT_THRESHOLDS or name not in THRESHOLD_KEYS:
        raise ValueError(
            f"{text!r}: expected PRECISION.KEY=VALUE with PRECISION {' or '.join(DEFAULT_THRESHOLDS)} and "
            f"KEY one of {', '.join(THRESHOLD_KEYS)}"
        )
    try:
        return precision, name, float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number") from None


def compare_logits(reference_logits: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict:
    """Parity metrics of ``logits`` against ``reference_logits`` (both ``[N, C]``).

    Returns:
        pairs, top1_agreement, reference_accuracy, accuracy, max_abs_diff, mean_abs_diff and cosine
        (mean per-row cosine similarity), as plain Python numbers.
    """
    ref = np.asarray(reference_logits, dtype=np.float64)
    out = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if ref.shape != out.shape or ref.ndim != 2 or len(labels) != len(ref):
        raise UserError(
            f"parity: reference logits {list(ref.shape)}, logits {list(out.shape)} and labels "
            f"{list(labels.shape)} do not line up; expected [N, C], [N, C] and [N]"
        )
    diff = np.abs(ref - out)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    dots = (ref * out).sum(axis=1)
    # Two all-zero rows are identical (cosine 1); one zero row against a non-zero one shares nothing (0).
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(out, axis=1) == 0)
    with np.errstate(invalid="ignore"):  # inf / inf in a non-finite row: NaN, which parity_row fails
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    n = len(ref)
    return {
        "pairs": int(n),
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()) if n else float("nan"),
        "reference_accuracy": float((ref.argmax(1) == labels).mean()) if n else float("nan"),
        "accuracy": float((out.argmax(1) == labels).mean()) if n else float("nan"),
        "max_abs_diff": float(diff.max()) if n else float("nan"),
        "mean_abs_diff": float(diff.mean()) if n else float("nan"),
        "cosine": float(cos.mean()) if n else float("nan"),
    }


def passing_thresholds(metrics: dict, thresholds: dict) -> dict[str, float]:
    """The tightest value of each threshold these metrics meet (Polygraphy's "would pass with")."""
    needed = {
        "min_top1_agreement": metrics["top1_agreement"],
        "max_abs_diff": metrics["max_abs_diff"],
        "max_mean_abs_diff": metrics["mean_abs_diff"],
        "max_accuracy_delta": abs(metrics["accuracy"] - metrics["reference_accuracy"]),
        "min_cosine": metrics["cosine"],
    }
    return {key: needed[key] for key in thresholds if key in needed}


def gate(metrics: dict, precision: str, thresholds: dict | None = None) -> tuple[bool, list[str]]:
    """Gate parity metrics on thresholds (``DEFAULT_THRESHOLDS[precision]`` when None).

    Known keys: min_top1_agreement, max_abs_diff, max_mean_abs_diff, max_accuracy_delta, min_cosine.

    Returns:
        (passed, reasons): one reason per failed threshold, each stating the measured value, the
        threshold, and the smallest tolerance that would have passed.
    """
    if thresholds is None:
        if precision not in DEFAULT_THRESHOLDS:
            raise UserError(
                f"no parity thresholds for precision {precision!r}; known: {sorted(DEFAULT_THRESHOLDS)}"
            )
        thresholds = DEFAULT_THRESHOLDS[precision]
    unknown = set(thresholds) - set(THRESHOLD_KEYS)
    if unknown:
        raise UserError(f"unknown parity threshold(s) {sorted(unknown)}")
    needed = passing_thresholds(metrics, thresholds)
    reasons = []
    for key, limit in thresholds.items():
        value = needed[key]
        lower_bound = key.startswith("min_")
        ok = (value >= limit) if lower_bound else (value <= limit)
        if not ok or math.isnan(value):
            cmp = "<" if lower_bound else ">"
            label = key.removeprefix("min_").removeprefix("max_")
            reasons.append(
                f"{precision} {label} {value:.6g} {cmp} {key} {limit:.6g} "
                f"(would pass with {key} {'<=' if lower_bound else '>='} {value:.6g})"
            )
    return not reasons, reasons


def run_reference(backend, ref: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Logits of ``backend`` on the reference set's inputs, ``batch_size`` pairs per call."""
    return run_reference_outputs(backend, ref, batch_size)["logits"]


def run_reference_outputs(backend, ref: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Every output of ``backend`` on the reference set's inputs, ``batch_size`` pairs per call."""
    chunks = [
        backend.infer({k: ref[k][i : i + batch_size] for k in REFERENCE_INPUTS})
        for i in range(0, len(ref["labels"]), batch_size)
    ]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def parity_row(ref: dict[str, np.ndarray], logits: np.ndarray, precision: str, limits: dict) -> dict:
    """Metrics of ``logits`` against the reference's PyTorch logits, gated on ``limits``.

    Returns:
        The metrics of :func:`compare_logits` plus passed, reasons, thresholds and would_pass_with: the
        parity entry crc-export records in the manifest and ``crc-infer validate`` prints.
    """
    metrics = compare_logits(ref["logits"], ref["labels"], logits)
    passed, reasons = gate(metrics, precision, limits)
    bad = int((~np.isfinite(np.asarray(logits))).any(axis=1).sum())
    if bad:  # NaN rows can still agree on the argmax and pass an agreement-only gate
        passed = False
        reasons.insert(0, f"{precision} {bad} of {metrics['pairs']} rows of logits are NaN or infinite")
    return {
        **metrics,
        "passed": passed,
        "reasons": reasons,
        "thresholds": limits,
        "would_pass_with": passing_thresholds(metrics, limits),
    }


def artifact_thresholds(
    art: dict, overrides: dict[str, dict[str, float]] | None = None
) -> tuple[dict[str, float], str]:
    """The thresholds an artifact is gated with, and where they come from.

    The manifest is the contract: each artifact is gated with the thresholds crc-export recorded for it
    (``parity.thresholds``), each key replaced where ``overrides`` (``--threshold`` on the command line)
    gives one for its precision. A manifest that records none (written before crc-export recorded
    them) gets :data:`DEFAULT_THRESHOLDS`.

    Raises:
        BundleError: The recorded thresholds are not a mapping of known keys to numbers, or there are
            no thresholds at all for the artifact's precision.
    """
    where = art.get("file")
    precision = art.get("precision", "fp32")
    recorded = (art.get("parity") or {}).get("thresholds")
    if recorded is None:
        base, source = DEFAULT_THRESHOLDS.get(precision), "defaults (none recorded in the manifest)"
    else:
        valid = isinstance(recorded, dict) and all(
            key in THRESHOLD_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
            for key, v in recorded.items()
        )
        if not valid:
            raise BundleError(
                f"{where}: manifest parity thresholds {recorded!r} are not a mapping of "
                f"{', '.join(THRESHOLD_KEYS)} to numbers; re-export the bundle"
            )
        base, source = {k: float(v) for k, v in recorded.items()}, "manifest"
    given = (overrides or {}).get(precision) or {}
    if base is None and not given:
        raise BundleError(f"{where}: no parity thresholds for precision {precision!r}")
    if given:
        source += f" + command line ({', '.join(sorted(given))})"
    return {**(base or {}), **given}, source


def validate_bundle(
    bundle: Bundle,
    device: str = "cpu",
    batch_size: int = 64,
    overrides: dict[str, dict[str, float]] | None = None,
    intra_op_threads: int | None = None,
    gpu: int = 0,
) -> list[dict]:
    """Run every usable artifact on reference.npz and gate it; the others get a skipped row.

    ONNX artifacts run on onnxruntime where ``device`` says (``cpu``, ``cuda``, or ``auto``: CUDA when
    it starts), always with TF32 off, the explain graph too (its class activation maps are also checked:
    :func:`crc_runtime.explain.explain_parity`); TensorRT engines on the TensorRT backend when this
    machine can run them (TensorRT, cuda-bindings, the GPU and release the engine was built for, and a
    device other than ``cpu``), else they get a skipped row saying why (crc-export gated them on the
    machine that built them). Each artifact is gated with the thresholds of :func:`artifact_thresholds`.

    Args:
        bundle: The loaded bundle.
        device: ``auto``, ``cpu`` or ``cuda``: where the ONNX artifacts run.
        batch_size: Pairs per model call.
        overrides: ``{precision: {key: value}}`` from ``--threshold``, over the manifest's thresholds.
        intra_op_threads: onnxruntime intra-op threads.
        gpu: CUDA device ordinal.

    Returns:
        One row per artifact: artifact, backend, precision, the metrics of :func:`compare_logits`,
        passed (True/False, or None when skipped), reasons, thresholds, thresholds_source,
        would_pass_with.
    """
    ref = bundle.load_reference()
    rows = []
    for art in bundle.artifacts:
        name, precision = art.get("file"), art.get("precision", "fp32")
        row = {"artifact": name, "precision": precision, "backend": "-", "passed": None, "reasons": []}
        if art.get("kind") not in ("onnx", EXPLAIN_KIND, ENGINE_KIND):
            row["reasons"] = [f"kind {art.get('kind')!r}: no backend for it in this runtime"]
        elif art.get("usable") is not True:
            recorded = "; ".join((art.get("parity") or {}).get("reasons") or []) or "no reason recorded"
            row["reasons"] = [f"marked unusable by crc-export: {recorded}"]
        elif art.get("kind") == ENGINE_KIND and device == "cpu":
            row["reasons"] = ["--device cpu: TensorRT engines run only on a GPU"]
        else:
            limits, source = artifact_thresholds(art, overrides)
            engine = art.get("kind") == ENGINE_KIND
            try:
                selection = open_backend(
                    bundle, "trt" if engine else "auto", name, device, gpu, intra_op_threads
                )
            except BackendError as exc:
                if not engine:  # the ONNX artifacts must run: an onnxruntime that cannot is an error
                    raise
                row["reasons"] = [f"cannot run here: {exc}"]
            else:
                with selection.backend as backend:
                    # The check crc-infer runs make too: a bundle one refuses, the other refuses.
                    bundle.check_model(
                        backend.input_specs, backend.output_specs, bundle.path / name, art.get("outputs")
                    )
                    outputs = run_reference_outputs(backend, ref, batch_size)
                if art.get("kind") == EXPLAIN_KIND:  # its logits, its maps against PyTorch's, the identity
                    parity = explain_parity(
                        ref,
                        reference_cams(bundle, art),
                        outputs,
                        explain_artifact(bundle)["branches"],
                        limits,
                    )
                else:
                    parity = parity_row(ref, outputs["logits"], precision, limits)
                row.update(
                    parity,
                    backend=backend.name,
                    device=backend.device,
                    thresholds_source=source,
                )
        log.info("%s: %s", name, row)
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_parity_table(rows: list[dict]) -> str:
    """A fixed-width text table of parity rows (missing values print as ``-``)."""
    header = [
        "artifact",
        "backend",
        "precision",
        "pairs",
        "top-1 agreement",
        "ref acc",
        "acc",
        "max |diff|",
        "mean |diff|",
        "cosine",
        "result",
    ]
    lines = [header]
    for r in rows:
        passed = r.get("passed")
        result = "PASS" if passed is True else "FAIL" if passed is False else "skipped"
        lines.append(
            [
                str(r.get("artifact", "-")),
                str(r.get("backend", "-")),
                str(r.get("precision", "-")),
                _fmt(r.get("pairs"), "d"),
                _fmt(r.get("top1_agreement"), ".2%"),
                _fmt(r.get("reference_accuracy"), ".2%"),
                _fmt(r.get("accuracy"), ".2%"),
                _fmt(r.get("max_abs_diff"), ".3g"),
                _fmt(r.get("mean_abs_diff"), ".3g"),
                _fmt(r.get("cosine"), ".6f"),
                result,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        for reason in r.get("reasons") or []:
            out.append(f"  {r.get('artifact', '-')}: {reason}")
    return "\n".join(out)
