"""Test metrics on hand-made arrays: Table 5/6, ROC AUC (ovr/ovo), PR-AUC and the confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from crc_train.data import class_names
from crc_train.metrics import (
    KEY_CLASSES,
    classification_metrics,
    key_class_order,
    macro_roc_auc_ovo,
    macro_roc_auc_ovr,
)
from sklearn.metrics import roc_auc_score

# Six pairs, three classes; every number below is worked out by hand in the comments.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.1, 0.8],
        [0.5, 0.1, 0.4],
    ]
)
PREDS = PROBS.argmax(1)  # [0, 1, 1, 1, 2, 0]
CLASSES = ["a", "b", "c"]


def test_hand_computed_case() -> None:
    m = classification_metrics(LABELS, PREDS, PROBS, CLASSES)
    assert PREDS.tolist() == [0, 1, 1, 1, 2, 0]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2
    # class 1: tp 2, fp 1, fn 0 -> P 2/3, R 1,   F1 4/5
    # class 2: tp 1, fp 0, fn 1 -> P 1,   R 1/2, F1 2/3
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    f1 = {r["name"]: r["f1"] for r in m["per_class"]}
    assert f1 == pytest.approx({"a": 0.5, "b": 0.8, "c": 2 / 3})
    # OvR: class 0 positives {.7, .3} vs negatives {.2, .1, .1, .5}: 7 of 8 pairs ordered -> 0.875;
    # classes 1 and 2 are perfectly separated -> 1.
    assert m["roc_auc_ovr"] == pytest.approx((0.875 + 1 + 1) / 3)
    # OvO: pair (0, 2) scored by p0: {.7, .3} vs {.1, .5} -> 3/4, by p2: 1 -> 0.875; other pairs 1.
    assert m["roc_auc_ovo"] == pytest.approx((1 + 0.875 + 1) / 3)
    # AP class 0: ranking .7(+) .5(-) .3(+) -> (1 + 2/3) / 2; classes 1, 2: 1.
    assert m["pr_auc"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    np.testing.assert_allclose(m["confusion_matrix_normalized"], [[0.5, 0.5, 0], [0, 1, 0], [0.5, 0, 0.5]])
    assert m["auc_classes"] == 3 and m["auc_note"] == ""
    assert [r["support"] for r in m["per_class"]] == [2, 2, 2]


def test_own_ovr_ovo_equal_sklearn_when_every_class_is_present() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 12)
    logits = rng.normal(size=(60, 5)) + 1.5 * np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    every = list(range(5))
    assert macro_roc_auc_ovr(labels, probs, every) == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert macro_roc_auc_ovo(labels, probs, every) == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovo", average="macro")
    )
    m = classification_metrics(labels, probs.argmax(1), probs, list("abcde"))
    assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))


def test_missing_class_averages_aucs_over_present_classes() -> None:
    labels = np.array([0, 0, 1, 1])  # class 2 never occurs
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    m = classification_metrics(labels, probs.argmax(1), probs, CLASSES)
    assert m["auc_classes"] == 2 and "only 2 of 3" in m["auc_note"]
    assert m["roc_auc_ovr"] == pytest.approx(1.0) and m["roc_auc_ovo"] == pytest.approx(1.0)
    # the absent class counts 0 in the macro F1 over all three classes
    assert m["macro_f1"] == pytest.approx(2 / 3)
    row = next(r for r in m["per_class"] if r["name"] == "c")
    assert row["roc_auc"] is None and row["support"] == 0


def test_single_class_gives_undefined_aucs() -> None:
    labels = np.array([1, 1, 1])
    probs = np.full((3, 3), 1 / 3)
    m = classification_metrics(labels, np.array([1, 1, 0]), probs, CLASSES)
    assert m["roc_auc_ovr"] is None and m["pr_auc"] is None and "undefined" in m["auc_note"]


def test_key_classes_come_first_for_pathmnist() -> None:
    names = class_names()
    order = key_class_order(names)
    assert [names[i] for i in order[:3]] == list(KEY_CLASSES)
    assert sorted(order) == list(range(9))
    assert order[3:] == [i for i in range(9) if names[i] not in KEY_CLASSES]
    m = classification_metrics(LABELS, PREDS, PROBS, CLASSES)
    assert [r["name"] for r in m["per_class"]] == CLASSES  # no key class names: label order


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="probs"):
        classification_metrics(LABELS, PREDS, PROBS[:, :2], CLASSES)
