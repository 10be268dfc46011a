"""Paired and unpaired tests for comparing two classifiers on the same test pairs.

McNemar's test is the right one when both models classify the same test pairs: it uses only the
discordant pairs (b = A right and B wrong, c = A wrong and B right). The paper's z = 4.70 is an unpaired
two-proportion z-test, which treats the two accuracies as coming from independent samples; on a shared
test set they are positively correlated, so its variance is wrong (usually too large: conservative, and
blind to which pairs changed). ``two_proportion_z`` is here only to show that contrast.

Numpy + scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EXACT_BELOW",
    "McNemarResult",
    "PAIRED_VS_UNPAIRED",
    "mcnemar",
    "mean_sd",
    "two_proportion_z",
]

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
