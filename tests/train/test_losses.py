"""CE + LDAM (losses.py) against hand computations with explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch
from crc_train.losses import LDAMLoss, TrainLoss, cosine_logits, ldam_margins


def test_margins_follow_inverse_fourth_root_of_counts() -> None:
    # counts 81, 16, 1 -> n^(1/4) = 3, 2, 1 -> 1/n^(1/4) = 1/3, 1/2, 1; the largest is scaled to 0.5
    m = ldam_margins([81, 16, 1], max_margin=0.5)
    torch.testing.assert_close(m, torch.tensor([0.5 / 3, 0.25, 0.5]))
    # the margin scale C depends only on the present classes; an absent class gets max_margin (unused)
    torch.testing.assert_close(ldam_margins([16, 0, 1], 0.4), torch.tensor([0.2, 0.4, 0.4]))
    with pytest.raises(ValueError):
        ldam_margins([0, 0])


def test_ldam_matches_hand_computation() -> None:
    # margins 1/6, 1/4, 1/2 (counts 81, 16, 1); sample of class 1 with cosines 0.2, -0.1, 0.4; s = 10
    cos = torch.tensor([[0.2, -0.1, 0.4], [0.9, 0.0, -0.3]])
    labels = torch.tensor([1, 0])
    # row 0: true class 1 loses 0.25 -> s*z = 2, -3.5, 4 -> CE = 3.5 + log(e^2 + e^-3.5 + e^4)
    row0 = 3.5 + math.log(math.exp(2.0) + math.exp(-3.5) + math.exp(4.0))
    # row 1: true class 0 loses 1/6 -> s*z = 9 - 10/6, 0, -3
    z0 = 10 * (0.9 - 1 / 6)
    row1 = -z0 + math.log(math.exp(z0) + math.exp(0.0) + math.exp(-3.0))
    loss = LDAMLoss([81, 16, 1], max_margin=0.5, scale=10.0)(cos, labels)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_cosine_logits_by_hand() -> None:
    h = torch.tensor([[3.0, 4.0]])  # |h| = 5
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    expected = torch.tensor([[3 / 5, 4 / 5, -7 / (5 * math.sqrt(2))]])
    torch.testing.assert_close(cosine_logits(h, w), expected)


def test_combined_loss_is_ce_plus_weighted_ldam() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    cos = torch.tensor([[0.1, 0.3, -0.2]])
    y = torch.tensor([2])
    ce = -0.5 + math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5))
    # LDAM, s = 30, class 2 (count 1) has the largest margin 0.5: s*z = 3, 9, -21
    ldam = 21 + math.log(math.exp(3.0) + math.exp(9.0) + math.exp(-21.0))
    counts = [81, 16, 1]
    both = TrainLoss("ce+ldam", counts, max_margin=0.5, scale=30.0, weight=0.25)(logits, cos, y)
    assert both.item() == pytest.approx(ce + 0.25 * ldam, rel=1e-6)
    assert TrainLoss("ce", counts)(logits, None, y).item() == pytest.approx(ce, rel=1e-6)
    assert TrainLoss("ldam", counts, scale=30.0)(logits, cos, y).item() == pytest.approx(ldam, rel=1e-6)
    assert not TrainLoss("ce", counts).needs_cosine and TrainLoss("ldam", counts).needs_cosine


def test_margin_raises_the_loss_of_the_true_class_only() -> None:
    cos = torch.tensor([[0.5, 0.5, 0.5]])
    no_margin = torch.nn.functional.cross_entropy(30 * cos, torch.tensor([0]))
    with_margin = LDAMLoss([1, 1, 1], max_margin=0.5, scale=30.0)(cos, torch.tensor([0]))
    # equal cosines: CE = log 3; the 0.5 margin on the true class adds exactly s*m inside its exp
    assert no_margin.item() == pytest.approx(math.log(3))
    assert with_margin.item() == pytest.approx(15 + math.log(math.exp(-15) + 2), rel=1e-6)
