"""Classification metrics of a run's test predictions, and the statistics that compare two runs.

Pure numpy + scikit-learn + scipy (no torch), so `compare` and the tests run on saved predictions alone.

Table 5: accuracy and macro precision / recall / F1. Table 6: per-class F1, the key colorectal-cancer
classes first (see ``KEY_CLASSES``). Also ROC AUC one-vs-rest and one-vs-one (macro), PR-AUC (macro
average precision) and the confusion matrix (counts and row-normalised).

A small test split may miss a class. ROC / PR AUC are undefined for a class with no positives, so they
are then averaged over the classes present (``auc_classes``) by the same definitions scikit-learn uses
when every class is present; the ``auc_note`` field says so.

Comparing two classifiers on the same test pairs: McNemar's test is the right one, because both models
classify the same pairs; it uses only the discordant pairs (b = A right and B wrong, c = A wrong and B
right). The paper's z = 4.70 is an unpaired two-proportion z-test, which treats the two accuracies as
coming from independent samples; on a shared test set they are positively correlated, so its variance is
wrong (usually too large: conservative, and blind to which pairs changed). ``two_proportion_z`` is here
only to show that contrast.

Confidence intervals (95 %, in every metrics.json, report.md and final log line): accuracy gets the Wilson
score interval (``wilson_interval``), which keeps its coverage near 95 % for small n and accuracies near 0
or 1 where the normal approximation fails; macro-F1, which is no proportion, gets a seeded percentile
bootstrap over the test pairs (``bootstrap_macro_f1``: ``BOOTSTRAP_RESAMPLES`` resamples of N pairs drawn
with replacement, seed ``BOOTSTRAP_SEED``, the 2.5th and 97.5th percentiles). Both describe the
uncertainty from the finite test set only; seed-to-seed variation of training is what several runs and
their sd show.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CI_LEVEL",
    "EXACT_BELOW",
    "KEY_CLASSES",
    "McNemarResult",
    "PAIRED_VS_UNPAIRED",
    "SHORT_NAMES",
    "bootstrap_macro_f1",
    "macro_f1",
    "ci_note",
    "classification_metrics",
    "key_class_order",
    "macro_roc_auc_ovo",
    "macro_roc_auc_ovr",
    "mcnemar",
    "mean_sd",
    "short_name",
    "two_proportion_z",
    "wilson_interval",
]


log = logging.getLogger(__name__)

#: The classes a colorectal-cancer reader looks at first, in this order: tumour epithelium (the
#: diagnosis itself), cancer-associated stroma (the tumour-stroma ratio is a prognostic marker in CRC)
#: and normal colon mucosa (the tissue tumour is told apart from). Matched by PathMNIST class name.
KEY_CLASSES = (
    "colorectal adenocarcinoma epithelium",
    "cancer-associated stroma",
    "normal colon mucosa",
)

#: NCT-CRC-HE-100K's own abbreviations (Kather et al. 2019), used on figure axes.
SHORT_NAMES = {
    "adipose": "ADI",
    "background": "BACK",
    "debris": "DEB",
    "lymphocytes": "LYM",
    "mucus": "MUC",
    "smooth muscle": "MUS",
    "normal colon mucosa": "NORM",
    "cancer-associated stroma": "STR",
    "colorectal adenocarcinoma epithelium": "TUM",
}


def short_name(name: str) -> str:
    """The NCT-CRC-HE abbreviation of a PathMNIST class name, or the name itself."""
    return SHORT_NAMES.get(name, name)


def key_class_order(classes: list[str]) -> list[int]:
    """Class indices with the ``KEY_CLASSES`` first (in that order), then the rest by index."""
    key = [classes.index(name) for name in KEY_CLASSES if name in classes]
    return key + [i for i in range(len(classes)) if i not in key]


def _normalised_probs(probs: np.ndarray) -> np.ndarray:
    # float32 softmax rows can miss 1 by more than scikit-learn's multiclass tolerance; renormalise.
    p = np.asarray(probs, dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


def macro_roc_auc_ovr(labels: np.ndarray, probs: np.ndarray, classes: list[int]) -> float:
    """Macro one-vs-rest ROC AUC over ``classes`` (each must have positives and negatives)."""
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in classes]))


def macro_roc_auc_ovo(labels: np.ndarray, probs: np.ndarray, classes: list[int]) -> float:
    """Macro one-vs-one ROC AUC (Hand & Till 2001) over the pairs of ``classes``.

    For each pair (j, k), on the samples of those two classes: the mean of AUC(j vs k, scored by p_j) and
    AUC(k vs j, scored by p_k); then the mean over pairs. This is scikit-learn's ``multi_class="ovo"``.
    """
    from sklearn.metrics import roc_auc_score

    scores = []
    for j, k in itertools.combinations(classes, 2):
        mask = (labels == j) | (labels == k)
        y, p = labels[mask], probs[mask]
        scores.append((roc_auc_score(y == j, p[:, j]) + roc_auc_score(y == k, p[:, k])) / 2)
    return float(np.mean(scores))


def _auc_metrics(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    present = [k for k in range(n_classes) if 0 < int((labels == k).sum()) < len(labels)]
    out: dict[str, Any] = {"auc_classes": len(present), "auc_note": ""}
    if len(present) < 2:
        out.update(roc_auc_ovr=None, roc_auc_ovo=None, pr_auc=None, per_class_roc_auc={}, per_class_ap={})
        out["auc_note"] = "fewer than two classes in the test labels: AUCs undefined"
        return out
    if len(present) == n_classes:
        kw = {"average": "macro", "labels": list(range(n_classes))}
        out["roc_auc_ovr"] = float(roc_auc_score(labels, probs, multi_class="ovr", **kw))
        out["roc_auc_ovo"] = float(roc_auc_score(labels, probs, multi_class="ovo", **kw))
    else:
        out["roc_auc_ovr"] = macro_roc_auc_ovr(labels, probs, present)
        out["roc_auc_ovo"] = macro_roc_auc_ovo(labels, probs, present)
        out["auc_note"] = (
            f"only {len(present)} of {n_classes} classes occur in the test labels: "
            "ROC/PR AUCs are macro averages over those classes"
        )
    out["per_class_roc_auc"] = {k: float(roc_auc_score(labels == k, probs[:, k])) for k in present}
    out["per_class_ap"] = {k: float(average_precision_score(labels == k, probs[:, k])) for k in present}
    out["pr_auc"] = float(np.mean(list(out["per_class_ap"].values())))
    return out


def classification_metrics(
    labels: np.ndarray, preds: np.ndarray, probs: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Every test metric of one run, JSON-ready.

    Args:
        labels: true class indices [N].
        preds: predicted class indices [N].
        probs: class probabilities [N, C] (rows sum to 1).
        classes: class names by index (C of them).

    Returns:
        A dict with ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1`` (Table 5),
        ``per_class`` (list in key-class order of {index, name, precision, recall, f1, support}; Table 6),
        ``key_classes``, ``roc_auc_ovr``, ``roc_auc_ovo``, ``pr_auc`` (None when undefined),
        ``auc_classes``, ``auc_note``, ``confusion_matrix`` (counts, rows = true class) and
        ``confusion_matrix_normalized`` (each row divided by its count; an empty row stays 0).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    n_classes = len(classes)
    if probs.shape != (len(labels), n_classes) or preds.shape != labels.shape:
        raise ValueError(
            f"expected labels [N], preds [N], probs [N, {n_classes}]; "
            f"got {labels.shape}, {preds.shape}, {probs.shape}"
        )
    probs = _normalised_probs(probs)
    index = list(range(n_classes))
    # Macro averages over all C classes (zero_division=0), as the existing macro_f1 key always was.
    p, r, f, _ = precision_recall_fscore_support(
        labels, preds, labels=index, average="macro", zero_division=0
    )  # f = macro_f1(labels, preds, n_classes); p and r come with it
    pc, rc, fc, sc = precision_recall_fscore_support(
        labels, preds, labels=index, average=None, zero_division=0
    )
    cm = confusion_matrix(labels, preds, labels=index)
    rows = cm.sum(axis=1, keepdims=True)
    cm_norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    auc = _auc_metrics(labels, probs, n_classes)
    per_class = [
        {
            "index": k,
            "name": classes[k],
            "precision": float(pc[k]),
            "recall": float(rc[k]),
            "f1": float(fc[k]),
            "support": int(sc[k]),
            "roc_auc": auc["per_class_roc_auc"].get(k),
            "average_precision": auc["per_class_ap"].get(k),
        }
        for k in key_class_order(classes)
    ]
    n_right = int((labels == preds).sum())
    return {
        "accuracy": n_right / len(labels) if len(labels) else 0.0,
        "accuracy_ci": list(wilson_interval(n_right, len(labels))),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
        "macro_f1_ci": list(bootstrap_macro_f1(labels, [preds], n_classes)),
        "ci_note": ci_note(),
        "per_class": per_class,
        "key_classes": [c for c in KEY_CLASSES if c in classes],
        "roc_auc_ovr": auc["roc_auc_ovr"],
        "roc_auc_ovo": auc["roc_auc_ovo"],
        "pr_auc": auc["pr_auc"],
        "auc_classes": auc["auc_classes"],
        "auc_note": auc["auc_note"],
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": cm_norm.tolist(),
    }


#: Below this discordant count b + c, McNemar uses the exact binomial test; at or above it the
#: chi-square approximation with continuity correction (the usual rule of thumb is b + c >= 25).
EXACT_BELOW = 25

PAIRED_VS_UNPAIRED = (
    "The paper's z = 4.70 comes from an unpaired two-proportion z-test, which assumes the two accuracies "
    "were measured on independent samples. Here both models classify the same test pairs, so the "
    "accuracies are correlated and only the pairs on which the models disagree carry information about "
    "which is better. McNemar's test is the paired test built on exactly those discordant pairs "
    "(exact binomial when there are few of them, chi-square with continuity correction otherwise)."
)


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on two models' correctness over the same test pairs."""

    #: [[both right, A right B wrong], [A wrong B right, both wrong]].
    table: tuple[tuple[int, int], tuple[int, int]]
    #: test statistic: min(b, c) for the exact test, (|b - c| - 1)^2 / (b + c) for chi-square.
    statistic: float
    #: two-sided p-value.
    pvalue: float
    #: "exact binomial" or "chi-square (continuity corrected)".
    method: str

    @property
    def b(self) -> int:
        """Pairs A got right and B got wrong."""
        return self.table[0][1]

    @property
    def c(self) -> int:
        """Pairs A got wrong and B got right."""
        return self.table[1][0]


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray, exact: bool | None = None) -> McNemarResult:
    """McNemar's test on per-pair correctness of model A and model B.

    Args:
        correct_a: bool [N], model A's prediction is right on pair i.
        correct_b: bool [N], model B's prediction is right on the same pair i.
        exact: force the exact (True) or chi-square (False) version; None chooses by ``EXACT_BELOW``.

    Returns:
        The 2x2 table, statistic, two-sided p-value and the method used. With no discordant pairs the
        exact test gives p = 1.
    """
    from scipy import stats

    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    bb = np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.shape != bb.shape:
        raise ValueError(f"correct_a and correct_b differ in length: {a.shape[0]} vs {bb.shape[0]}")
    n11 = int(np.sum(a & bb))
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    n22 = int(np.sum(~a & ~bb))
    table = ((n11, b), (c, n22))
    if exact is None:
        exact = b + c < EXACT_BELOW
    if exact or b + c == 0:
        # Two-sided exact binomial: twice the smaller tail of Binomial(b + c, 1/2), capped at 1.
        k = min(b, c)
        p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(stats.binom.cdf(k, b + c, 0.5)))
        return McNemarResult(table, float(k), p, "exact binomial")
    stat = (abs(b - c) - 1.0) ** 2 / (b + c)
    return McNemarResult(
        table, float(stat), float(stats.chi2.sf(stat, 1)), "chi-square (continuity corrected)"
    )


def two_proportion_z(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, float]:
    """The unpaired two-proportion z-test (pooled variance) the paper used: (z, two-sided p).

    Shown next to McNemar for contrast only; it ignores that both accuracies come from the same pairs.
    """
    from scipy import stats

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    n1, n2 = a.size, b.size
    p1, p2 = a.mean(), b.mean()
    pooled = (a.sum() + b.sum()) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = float((p1 - p2) / se)
    return z, float(2 * stats.norm.sf(abs(z)))


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd


# ---- confidence intervals

#: Confidence level of every interval crc-train reports.
CI_LEVEL = 0.95
#: Bootstrap resamples of the test pairs for the macro-F1 interval.
BOOTSTRAP_RESAMPLES = 2000
#: Seed of the bootstrap resampling (the same resamples for every run, so intervals are reproducible).
BOOTSTRAP_SEED = 0


def ci_note() -> str:
    """One line saying how the intervals were computed (metrics.json's ``ci_note``)."""
    return (
        f"{CI_LEVEL:.0%} confidence intervals: Wilson score interval for accuracy; percentile bootstrap over "
        f"the test pairs for macro-F1 ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})"
    )


def wilson_interval(successes: float, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``.

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half-width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n),
    z the two-sided normal quantile of ``level`` (1.96 for 95 %). ``successes`` may be fractional (a mean
    over seeds of right answers on the same n pairs).

    Returns:
        (low, high), within [0, 1]; (0, 1) when n is 0.
    """
    from scipy import stats

    if n <= 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _macro_f1_of_counts(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 over all classes (zero_division 0) of each row of labels / preds [B, N]; returns [B]."""
    b = labels.shape[0]
    offset = (np.arange(b) * n_classes * n_classes)[:, None]
    cm = np.bincount((offset + labels * n_classes + preds).ravel(), minlength=b * n_classes * n_classes)
    cm = cm.reshape(b, n_classes, n_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    denom = cm.sum(axis=2) + cm.sum(axis=1)  # 2 tp + fn + fp
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=1)


def macro_f1(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over all ``n_classes`` classes (zero_division=0), as ``classification_metrics`` reports it."""
    from sklearn.metrics import precision_recall_fscore_support

    index = list(range(n_classes))
    return float(
        precision_recall_fscore_support(labels, preds, labels=index, average="macro", zero_division=0)[2]
    )


def bootstrap_macro_f1(
    labels: np.ndarray,
    preds: list[np.ndarray],
    n_classes: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of macro-F1 over the test pairs.

    Each resample draws N pair indices with replacement (``np.random.default_rng(seed)``); the statistic
    is the macro-F1 (all ``n_classes`` classes, zero_division 0, as ``classification_metrics``) of the
    resampled pairs, averaged over the runs in ``preds`` when there are several (runs of one group on the
    same test pairs: the same resamples apply to all, so the interval is that of the group mean).

    Args:
        labels: true class indices [N].
        preds: one or more prediction arrays [N] on the same pairs.
        n_classes: number of classes.
        resamples: bootstrap resamples.
        seed: seed of the resampling.
        level: confidence level.

    Returns:
        (low, high): the (1 - level) / 2 and (1 + level) / 2 percentiles.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = labels.size
    if n == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    runs = [np.asarray(p, dtype=np.int64).reshape(-1) for p in preds]
    stat = np.zeros(resamples)
    chunk = max(1, 2_000_000 // n)  # resamples at once: bounds memory on a large test set
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        for p in runs:
            stat[start : start + len(idx)] += _macro_f1_of_counts(labels[idx], p[idx], n_classes)
    stat /= len(runs)
    tail = (1.0 - level) / 2
    low, high = np.quantile(stat, [tail, 1.0 - tail])
    return float(low), float(high)
