"""Classification metrics of one run's test predictions: the paper's Tables 5 and 6 and more.

Pure numpy + scikit-learn (no torch), so `compare` and the tests run on saved predictions alone.

Table 5: accuracy and macro precision / recall / F1. Table 6: per-class F1, the key colorectal-cancer
classes first (see ``KEY_CLASSES``). Also ROC AUC one-vs-rest and one-vs-one (macro), PR-AUC (macro
average precision) and the confusion matrix (counts and row-normalised).

A small test split may miss a class. ROC / PR AUC are undefined for a class with no positives, so they
are then averaged over the classes present (``auc_classes``) by the same definitions scikit-learn uses
when every class is present; the ``auc_note`` field says so.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np

__all__ = [
    "KEY_CLASSES",
    "SHORT_NAMES",
    "classification_metrics",
    "key_class_order",
    "macro_roc_auc_ovo",
    "macro_roc_auc_ovr",
    "short_name",
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
    )
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
    return {
        "accuracy": float((labels == preds).mean()) if len(labels) else 0.0,
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
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
