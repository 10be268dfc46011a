"""McNemar's test and the unpaired z-test, cross-checked against statsmodels and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from crc_train.metrics import EXACT_BELOW, mcnemar, mean_sd, two_proportion_z
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportions_ztest


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
