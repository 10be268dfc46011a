"""McNemar's test, the unpaired z-test and the confidence intervals, against statsmodels and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from crc_train.metrics import (
    EXACT_BELOW,
    bootstrap_macro_f1,
    mcnemar,
    mean_sd,
    two_proportion_z,
    wilson_interval,
)
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportion_confint, proportions_ztest


def correctness(n11: int, b: int, c: int, n22: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair correctness of A and B realising the 2x2 table [[n11, b], [c, n22]], shuffled."""
    a = np.array([1] * n11 + [1] * b + [0] * c + [0] * n22, dtype=bool)
    bb = np.array([1] * n11 + [0] * b + [1] * c + [0] * n22, dtype=bool)
    perm = np.random.default_rng(n11 + 7 * b + 13 * c).permutation(a.size)
    return a[perm], bb[perm]


TABLES = [(50, 1, 5, 10), (40, 3, 9, 8), (60, 12, 4, 2), (100, 10, 30, 20), (80, 25, 24, 5), (30, 7, 7, 3)]


@pytest.mark.parametrize("table", TABLES)
def test_exact_matches_statsmodels(table: tuple[int, int, int, int]) -> None:
    n11, b, c, n22 = table
    res = mcnemar(*correctness(*table), exact=True)
    ref = sm_mcnemar(np.array([[n11, b], [c, n22]]), exact=True)
    assert res.table == ((n11, b), (c, n22))
    assert res.statistic == pytest.approx(ref.statistic)
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    assert res.method == "exact binomial"


@pytest.mark.parametrize("table", TABLES)
def test_chi_square_matches_statsmodels(table: tuple[int, int, int, int]) -> None:
    n11, b, c, n22 = table
    res = mcnemar(*correctness(*table), exact=False)
    ref = sm_mcnemar(np.array([[n11, b], [c, n22]]), exact=False, correction=True)
    assert res.statistic == pytest.approx(ref.statistic)
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-12)
    assert res.method.startswith("chi-square")


def test_hand_computed_values() -> None:
    # b = 1, c = 5: p = 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * (1 + 6) / 64
    res = mcnemar(*correctness(10, 1, 5, 3))
    assert res.method == "exact binomial" and res.statistic == 1
    assert res.pvalue == pytest.approx(14 / 64)
    # b = 10, c = 30: (|10 - 30| - 1)^2 / 40 = 9.025
    res = mcnemar(*correctness(50, 10, 30, 5))
    assert res.method.startswith("chi-square") and res.statistic == pytest.approx(9.025)


def test_method_switches_at_the_discordant_threshold() -> None:
    assert EXACT_BELOW == 25
    assert mcnemar(*correctness(10, 12, 12, 1)).method == "exact binomial"  # b + c = 24
    assert mcnemar(*correctness(10, 12, 13, 1)).method.startswith("chi-square")  # b + c = 25


def test_no_discordant_pairs_gives_p_one() -> None:
    res = mcnemar(*correctness(20, 0, 0, 4), exact=False)
    assert res.pvalue == 1.0 and res.b == 0 and res.c == 0


def test_length_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_two_proportion_z_matches_statsmodels() -> None:
    a, b = correctness(100, 10, 30, 20)
    z, p = two_proportion_z(a, b)
    ref_z, ref_p = proportions_ztest([a.sum(), b.sum()], [a.size, b.size])
    assert z == pytest.approx(ref_z) and p == pytest.approx(ref_p)
    # paired vs unpaired on the same predictions: McNemar sees the 10 vs 30 split much more sharply
    assert mcnemar(a, b).pvalue < p


def test_mean_sd() -> None:
    assert mean_sd([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    assert mean_sd([0.7]) == (0.7, 0.0)


def test_wilson_interval_by_hand() -> None:
    # 120 of 150 right, z = 1.959964: p = 0.8, z^2 = 3.841459
    # centre = (0.8 + 3.841459 / 300) / (1 + 3.841459 / 150) = 0.812805 / 1.025610 = 0.792509
    # half = 1.959964 * sqrt(0.8 * 0.2 / 150 + 3.841459 / 90000) / 1.025610
    #      = 1.959964 * sqrt(0.00110935) / 1.025610 = 0.065280 / 1.025610 = 0.063650
    low, high = wilson_interval(120, 150)
    assert low == pytest.approx(0.792509 - 0.063650, abs=2e-6)
    assert high == pytest.approx(0.792509 + 0.063650, abs=2e-6)
    ref = proportion_confint(120, 150, alpha=0.05, method="wilson")
    assert (low, high) == pytest.approx(ref, rel=1e-12)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_macro_f1_matches_a_plain_loop() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 80)
    preds = np.where(rng.random(80) < 0.7, labels, rng.integers(0, 4, 80))
    low, high = bootstrap_macro_f1(labels, [preds], 4, resamples=300, seed=9)
    idx = np.random.default_rng(9).integers(0, 80, size=(300, 80))
    stats = [f1_score(labels[i], preds[i], labels=range(4), average="macro", zero_division=0) for i in idx]
    assert (low, high) == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])), rel=1e-12)
    point = f1_score(labels, preds, labels=range(4), average="macro", zero_division=0)
    assert low < point < high
    # several runs on the same pairs: the interval of their mean macro-F1, the same resamples for each
    other = np.where(rng.random(80) < 0.5, labels, rng.integers(0, 4, 80))
    both = bootstrap_macro_f1(labels, [preds, other], 4, resamples=300, seed=9)
    mean = [
        (f1_score(labels[i], preds[i], labels=range(4), average="macro", zero_division=0)
         + f1_score(labels[i], other[i], labels=range(4), average="macro", zero_division=0)) / 2
        for i in idx
    ]  # fmt: skip
    assert both == pytest.approx(tuple(np.quantile(mean, [0.025, 0.975])), rel=1e-12)


def test_classification_metrics_carry_both_intervals() -> None:
    from crc_train.metrics import classification_metrics

    labels = np.arange(150) % 3
    preds = labels.copy()
    preds[:30] = (preds[:30] + 1) % 3  # 120 of 150 right
    m = classification_metrics(labels, preds, np.eye(3, dtype=np.float32)[preds], ["a", "b", "c"])
    assert m["accuracy_ci"] == pytest.approx(list(wilson_interval(120, 150)))
    assert m["macro_f1_ci"] == pytest.approx(list(bootstrap_macro_f1(labels, [preds], 3)))
    assert m["macro_f1_ci"][0] < m["macro_f1"] < m["macro_f1_ci"][1]
    assert "Wilson" in m["ci_note"] and "2000 resamples" in m["ci_note"]
