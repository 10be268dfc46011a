"""Training losses: cross-entropy, LDAM (Cao et al. 2019) and their combination.

How CE and LDAM are combined (the paper does not say), and why:

    loss = CE(z, y) + lambda * LDAM(c, y)        LDAM(c, y) = CE(s * (c - m_y * onehot(y)), y)

- ``z = W h + b`` are the raw logits of the model's linear head: what inference, the exported ONNX and
  every reported probability use. The CE term trains them (bias and weight norms included), so the
  probabilities used for ROC / PR curves stay those of a CE-trained classifier.
- ``c_j = <h / |h|, w_j / |w_j|>`` are the *cosine* logits of the same head (same W, no bias), computed
  on the same (dropped-out) embedding h. LDAM's two constants only mean something there: the largest
  margin 0.5 and the scale s = 30 of Cao et al. assume logits bounded in [-1, 1] (their classifier is a
  normalised linear layer). On raw, unbounded logits the network can outgrow any fixed margin by scaling
  its logits, and s = 30 would multiply them into overflow.
- Sharing W (instead of an extra normalised head) adds no parameter and leaves the model, its checkpoint
  and the exported graph unchanged, while the margin acts on the very class directions inference uses.
- The per-class margin is m_j = C / n_j^(1/4) from the training class counts n_j, with C chosen so the
  largest margin (the rarest class) is ``max_margin``. Classes absent from training get ``max_margin``
  (never used: a margin only applies to a sample's own class).

``loss="ldam"`` keeps only the LDAM term (an ablation: the head's bias then stays at its initial value).
Deferred re-weighting (DRW) from the same paper is not implemented.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LDAMLoss", "TrainLoss", "cosine_logits", "ldam_margins"]


def ldam_margins(class_counts: list[int] | np.ndarray, max_margin: float = 0.5) -> torch.Tensor:
    """Per-class LDAM margins m_j = C / n_j^(1/4), scaled so the largest is ``max_margin``.

    Args:
        class_counts: training samples per class.
        max_margin: the margin of the rarest present class.

    Returns:
        float32 tensor [num_classes].
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        raise ValueError(f"class counts must be a non-empty list of counts >= 0, got {class_counts!r}")
    present = counts > 0
    if not present.any():
        raise ValueError("class counts are all zero")
    inv = np.zeros_like(counts)
    inv[present] = counts[present] ** -0.25
    margins = np.full_like(counts, max_margin)
    margins[present] = inv[present] * (max_margin / inv[present].max())
    return torch.tensor(margins, dtype=torch.float32)


def cosine_logits(embedding: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each embedding row with each class weight row: [N, D] x [C, D] -> [N, C]."""
    return F.normalize(embedding.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()


class LDAMLoss(nn.Module):
    """LDAM on cosine logits: CE(s * (c - m_y onehot(y)), y), mean over the batch.

    Args:
        class_counts: training samples per class (the margins come from them).
        max_margin: largest margin.
        scale: logit scale s.
    """

    def __init__(self, class_counts: list[int] | np.ndarray, max_margin: float = 0.5, scale: float = 30.0):
        super().__init__()
        self.register_buffer("margins", ldam_margins(class_counts, max_margin))
        self.scale = scale

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean LDAM loss of cosine logits [N, C] against int64 labels [N]."""
        onehot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        adjusted = cosine - onehot * self.margins.to(cosine.dtype)[labels].unsqueeze(1)
        return F.cross_entropy(self.scale * adjusted, labels)


class TrainLoss(nn.Module):
    """The training objective chosen by ``TrainConfig.loss`` (see the module docstring).

    Args:
        kind: "ce", "ldam" or "ce+ldam".
        class_counts: training samples per class (unused for "ce").
        max_margin: LDAM's largest margin.
        scale: LDAM's scale s.
        weight: lambda, the weight of the LDAM term in "ce+ldam".
        label_smoothing: epsilon of the CE term (the target puts 1 - epsilon + epsilon / C on the true
            class and epsilon / C on each other); LDAM is never smoothed, its margin already softens it.
    """

    def __init__(
        self,
        kind: str,
        class_counts: list[int] | np.ndarray,
        max_margin: float = 0.5,
        scale: float = 30.0,
        weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("ce", "ldam", "ce+ldam"):
            raise ValueError(f"unknown loss {kind!r}")
        self.kind = kind
        self.weight = weight
        self.label_smoothing = label_smoothing
        self.ldam = LDAMLoss(class_counts, max_margin, scale) if kind != "ce" else None

    @property
    def needs_cosine(self) -> bool:
        """Whether forward needs the cosine logits."""
        return self.ldam is not None

    def forward(
        self, logits: torch.Tensor, cosine: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss from raw logits [N, C], cosine logits [N, C] (or None for "ce") and labels [N]."""
        logits = logits.float()  # the loss in float32 also under autocast
        if self.kind == "ce":
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if cosine is None:
            raise ValueError(f"loss {self.kind!r} needs the cosine logits")
        ldam = self.ldam(cosine.float(), labels)
        if self.kind == "ldam":
            return ldam
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return ce + self.weight * ldam
