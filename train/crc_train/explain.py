"""Explanations of a trained model: Grad-CAM per branch, and how much each modality decided.

Two questions, two tools:

- **Where did each branch look?** :func:`grad_cam` (Selvaraju et al., 2017) at the output of each branch's
  own last stage (``layer4``): the map ``ReLU(sum_k alpha_k F_k)`` with ``alpha_k`` the spatial mean of
  d logit / d F_k. For late fusion and the pathology-only model this is exactly the class activation map
  of ``FusionNet.forward_cams`` clipped at 0 and divided by h*w (the head is linear on the pooled maps);
  with attention fusion the gradient also flows through the second cross-modal block, so the map also
  shows what each branch's features did through the other branch.
- **How much did each modality decide?** The head is linear on the concatenated pooled maps, so each
  logit is exactly a sum of one term per branch plus the bias. :func:`margin_split` splits the predicted
  class's margin over the runner-up into those terms; :func:`modality_summary` summarises the radiology
  share over a test set (docs/training.md, "Explanations").

The runtime (``crc_runtime.explain``) computes the same margin split torch-free from the explain graph.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["branch_terms", "centre_branch", "grad_cam", "margin_split", "modality_summary"]

#: Quantiles of the radiology share reported by ``modality_summary``.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def grad_cam(
    model: torch.nn.Module,
    pathology: torch.Tensor,
    radiology: torch.Tensor,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Grad-CAM of ``target`` (default: the predicted class) at each branch's layer4 output.

    Args:
        model: a FusionNet (put in eval mode here; its parameters are not changed and need no grad).
        pathology: uint8 NHWC [N, S, S, 3].
        radiology: uint8 NHWC [N, S, S, 1].
        target: class index per pair, int64 [N].

    Returns:
        (logits [N, C], {branch: map [N, h, w], >= 0}); branch names as ``model.branch_names``
        (``fused`` for early fusion: one map for both images).
    """
    model.eval()
    nets = model.branch_nets()
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            # A fresh leaf: the gradient is taken here, whatever requires_grad the weights have.
            captured[name] = output.detach().requires_grad_(True)
            return captured[name]

        return keep

    handles = [net.layer4.register_forward_hook(hook(name)) for name, net in nets.items()]
    try:
        with torch.enable_grad():
            logits = model(pathology, radiology)
            chosen = logits.argmax(1) if target is None else target.to(logits.device)
            score = logits.gather(1, chosen[:, None]).sum()  # pairs are independent in eval mode
            grads = torch.autograd.grad(score, [captured[name] for name in nets])
    finally:
        for handle in handles:
            handle.remove()
    maps = {}
    for (name, activation), grad in zip(captured.items(), grads, strict=True):
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        maps[name] = torch.relu((alpha * activation).sum(dim=1)).detach()
    return logits.detach(), maps


def branch_terms(model: torch.nn.Module, features: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each branch's additive share of every logit, from the fused embedding.

    The mean of a branch's class activation map is its block of the head's weight times its pooled
    features, so this needs no maps: ``terms[b][n, c] = W_b[c] . features_b[n]``.

    Args:
        model: the FusionNet that produced ``features``.
        features: ``forward_features`` output [N, embed_dim].

    Returns:
        ({branch: [N, C] float64}, bias [C] float64); their sum is the logits.
    """
    weights, bias = model.head_weights()
    width = model.branch_dim
    feats = np.asarray(features, dtype=np.float64)
    terms = {}
    for i, (name, w) in enumerate(weights.items()):
        block = feats[:, i * width : (i + 1) * width]
        terms[name] = block @ w.detach().cpu().double().numpy().T
    return terms, bias.detach().cpu().double().numpy()


def centre_branch(
    terms: dict[str, np.ndarray], bias: np.ndarray, branch: str = "radiology"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Move ``branch``'s mean term over the pairs into the bias: what is left is slice-specific.

    A branch's term for class c has a part every input gives alike (its mean over the set, a constant:
    it acts as a second bias, and shuffling the inputs cannot change it) and a part that depends on the
    input. The sum is unchanged, so the logits still add up exactly.

    Returns:
        (terms with ``branch`` centred per class, bias plus its per-class mean); unchanged without it.
    """
    if branch not in terms or not len(terms[branch]):
        return terms, bias
    mean = terms[branch].mean(axis=0)
    return {**terms, branch: terms[branch] - mean}, bias + mean


def margin_split(logits: np.ndarray, terms: dict[str, np.ndarray], bias: np.ndarray) -> dict[str, np.ndarray]:
    """The predicted class a's margin over the runner-up b, split by branch.

    Returns:
        ``predicted``, ``runner_up`` (int [N]), ``margin`` (logit[a] - logit[b]), ``bias``
        (bias[a] - bias[b]) and ``<branch>`` (term[a] - term[b]) for every branch, float64 [N].
    """
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(z))
    order = np.argsort(-z, axis=1, kind="stable")
    a, b = order[:, 0], order[:, 1]
    out = {"predicted": a, "runner_up": b, "margin": z[rows, a] - z[rows, b], "bias": bias[a] - bias[b]}
    for name, t in terms.items():
        out[name] = t[rows, a] - t[rows, b]
    return out


def modality_summary(split: dict[str, np.ndarray]) -> dict:
    """How much the radiology branch decided, over a set of pairs (``margin_split`` of each).

    The radiology share of a pair is ``|r| / (|p| + |r|)`` with p and r the pathology and radiology
    terms of its margin (0 when both are 0): the fraction of the modality-attributable margin that
    came from radiology, whatever its sign. A pair is **decided by radiology** when the pathology and
    bias terms alone favour the runner-up (p + bias < 0): without the radiology term the margin would
    change sign. The radiology term **opposes** the prediction when r < 0.

    Returns:
        ``{"available": False, "reason": ...}`` for models without a pathology and a radiology branch;
        else n, mean_margin, mean_abs_pathology, mean_abs_radiology, mean_radiology_share,
        radiology_share_quantiles {"q10": ...}, radiology_share_histogram (10 bins over [0, 1]),
        decided_by_radiology, radiology_opposes (fractions of the pairs).
    """
    if "fused" in split:
        return {
            "available": False,
            "reason": "fusion early: one 4-channel ResNet sees both images, its map belongs to neither "
            "modality, so the margin has no per-modality split",
        }
    if "radiology" not in split:
        return {"available": False, "reason": "fusion none: the model has no radiology branch"}
    p, r, bias = split["pathology"], split["radiology"], split["bias"]
    n = len(p)
    if n == 0:
        return {"available": False, "reason": "no pairs"}
    total = np.abs(p) + np.abs(r)
    share = np.divide(np.abs(r), total, out=np.zeros(n), where=total > 0)
    counts, _ = np.histogram(share, bins=10, range=(0.0, 1.0))
    return {
        "available": True,
        "n": int(n),
        "mean_margin": float(split["margin"].mean()),
        "mean_abs_pathology": float(np.abs(p).mean()),
        "mean_abs_radiology": float(np.abs(r).mean()),
        "mean_radiology_share": float(share.mean()),
        "radiology_share_quantiles": {f"q{round(q * 100)}": float(np.quantile(share, q)) for q in QUANTILES},
        "radiology_share_histogram": [int(c) for c in counts],
        "decided_by_radiology": float((p + bias < 0).mean()),
        "radiology_opposes": float((r < 0).mean()),
    }
