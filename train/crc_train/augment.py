"""Training-time data augmentation on uint8 NHWC batches, on the training device, inside the training step.

``Augment`` runs after the batch is moved to the device and before the forward pass. It takes and
returns uint8 NHWC tensors, so the model's in-graph preprocessing (cast, z-score, NCHW) is unchanged and
evaluation and export never see it: the model holds no augmentation, and ``Augment`` is the identity in
``eval()`` mode. Every operation is a batched tensor op (``torch.where``, batched matmul, one
``grid_sample``); there is no per-image Python loop.

Random parameters are drawn on the CPU from torch's global generator (seeded by ``seed_everything``,
saved in last.pt by ``rundir.capture_rng``), then moved to the device: the same seed gives the same
augmented batches on every device, and a resumed run draws exactly what the uninterrupted one drew.

Modes (``TrainConfig.augment``):

- ``none``: nothing.
- ``d4``: pathology tiles get one of the eight symmetries of the square (dihedral group D4: four rotations
  by 90 degrees, each with or without a mirror), uniformly per tile. A tissue tile has no orientation, so
  every symmetry is an equally valid view. The radiology image is untouched.
- ``full`` (the default): ``d4``, then H&E colour jitter on pathology, and small intensity and affine
  jitter on radiology.

  * H&E stain jitter (Tellez et al. 2018, "HED-light"): RGB -> optical density -> haematoxylin / eosin /
    DAB concentrations through the Ruifrok & Johnston stain matrix (scikit-image's ``rgb2hed``), each
    concentration scaled by U(1 - 0.05, 1 + 0.05) and shifted by U(-0.05, 0.05), back to RGB; then
    brightness x U(0.9, 1.1) and contrast x U(0.9, 1.1) around the tile's mean. This imitates the spread
    of staining and scanning between labs, the main domain shift in histopathology.
  * Radiology (CT): brightness x U(0.9, 1.1), contrast x U(0.9, 1.1), and an affine warp with rotation
    U(-10, 10) degrees, scale U(0.95, 1.05) and translation U(-4, 4) % of the side, bilinear, zero
    (air) outside. **Never flipped**: an axial CT slice has a left and a right (the liver is on the
    patient's right), so a mirror image is not a plausible scan; every warp has a positive determinant.

Pair shuffling (``TrainConfig.shuffle_pairs``, independent of the mode) is not an image augmentation: it
permutes the radiology images across the training batch at every step, so each tissue tile meets a new CT
slice every time. It is valid only because the pathology-radiology pairing is synthetic (different
patients, a seeded permutation): a fixed partner is then an arbitrary per-pair identifier from which a
fused model memorises the training labels, and that memorised noise costs held-out accuracy. On real
paired data it would destroy the signal fusion is for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from crc_train.config import AUGMENTS

__all__ = [
    "AUGMENTS",
    "Augment",
    "D4_SIZE",
    "RGB_FROM_HED",
    "apply_d4",
    "colour_jitter_he",
    "intensity_affine_ct",
    "shuffle_pairs",
]

#: Number of symmetries of the square (the dihedral group D4).
D4_SIZE = 8

#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) as scikit-image uses them.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))

_STAIN = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
_STAIN_INV = torch.linalg.inv(_STAIN).to(torch.float32)
_STAIN = _STAIN.to(torch.float32)

#: HED-light (Tellez et al. 2018): per-stain scale U(1 - s, 1 + s) and shift U(-s, s), in optical density.
HED_SIGMA = 0.05
#: Brightness and contrast factors of both modalities are drawn from U(1 - this, 1 + this).
INTENSITY_JITTER = 0.1
#: Radiology affine jitter: largest rotation (degrees), scale change and translation (fraction of the side).
CT_ROTATION_DEG = 10.0
CT_SCALE = 0.05
CT_TRANSLATE = 0.04


def _uniform(n: int, low: float, high: float, *shape: int) -> torch.Tensor:
    """U(low, high) of shape [n, *shape] from torch's global CPU generator (see the module docstring)."""
    return low + (high - low) * torch.rand(n, *shape)


def apply_d4(images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Symmetry ``codes[i]`` (0..7) of the square applied to image i of an NHWC batch (H == W).

    Bit 0 transposes (swaps H and W), bit 1 flips H, bit 2 flips W; the eight combinations are the eight
    elements of D4 (code 0 is the identity).

    Args:
        images: [N, S, S, C], any dtype.
        codes: int [N] on the same device.
    """
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"D4 symmetries need square images, got {tuple(images.shape[1:3])}")
    bit = codes.view(-1, 1, 1, 1)
    out = torch.where((bit & 1).bool(), images.transpose(1, 2), images)
    out = torch.where((bit & 2).bool(), out.flip(1), out)
    return torch.where((bit & 4).bool(), out.flip(2), out)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0.0, 255.0).round_().to(torch.uint8)


def _brightness_contrast(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """x [N, H, W, C] float 0..255 times brightness [N], then contrast [N] around each image's mean."""
    x = x * brightness.view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast.view(-1, 1, 1, 1) + mean


def colour_jitter_he(
    images: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
) -> torch.Tensor:
    """H&E stain jitter then brightness / contrast on uint8 RGB NHWC tiles; returns uint8 NHWC.

    Optical density ``od = -ln((x + 1) / 256)`` (x in 0..255, so od is finite for black pixels and the
    round trip is exact), stains ``s = od @ inv(M)`` with M = ``RGB_FROM_HED``, jittered ``s * alpha +
    beta``, back ``od' = s' @ M``. Both steps are linear in od, so they fold into one 3x3 matrix and an
    offset per tile: one batched matmul.

    Args:
        images: uint8 [N, H, W, 3].
        alpha: per-stain scale [N, 3] (1 = unchanged).
        beta: per-stain shift in optical density [N, 3] (0 = unchanged).
        brightness: [N] (1 = unchanged).
        contrast: [N] (1 = unchanged).
    """
    n, h, w, _ = images.shape
    m, m_inv = _STAIN.to(images.device), _STAIN_INV.to(images.device)
    alpha, beta = alpha.to(images.device, torch.float32), beta.to(images.device, torch.float32)
    mix = m_inv.unsqueeze(0) @ (alpha.unsqueeze(2) * m.unsqueeze(0))  # [N, 3, 3]: od -> od'
    shift = (beta.unsqueeze(1) @ m).view(n, 1, 3)  # [N, 1, 3]
    od = -torch.log((images.reshape(n, h * w, 3).to(torch.float32) + 1.0) / 256.0)
    rgb = 256.0 * torch.exp(-(od @ mix + shift)) - 1.0
    dev = images.device
    rgb = _brightness_contrast(
        rgb.view(n, h, w, 3), brightness.to(dev, torch.float32), contrast.to(dev, torch.float32)
    )
    return _to_uint8(rgb)


def intensity_affine_ct(
    images: torch.Tensor,
    angle_deg: torch.Tensor,
    scale: torch.Tensor,
    translate: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
) -> torch.Tensor:
    """Rotation, scale and translation (no mirror), then brightness / contrast, of uint8 gray NHWC slices.

    Args:
        images: uint8 [N, H, W, 1].
        angle_deg: rotation [N], degrees.
        scale: zoom [N] (> 0; 1 = unchanged).
        translate: shift [N, 2] as a fraction of the side (x, y).
        brightness: [N] (1 = unchanged).
        contrast: [N] (1 = unchanged).
    """
    dev = images.device
    n = images.shape[0]
    theta = angle_deg.to(dev, torch.float32) * (math.pi / 180.0)
    inv_scale = 1.0 / scale.to(dev, torch.float32)
    cos, sin = torch.cos(theta) * inv_scale, torch.sin(theta) * inv_scale
    # affine_grid maps output coordinates to input ones (normalised to [-1, 1]); det = 1 / scale^2 > 0.
    t = 2.0 * translate.to(dev, torch.float32)
    mat = torch.stack(
        [torch.stack([cos, -sin, -t[:, 0]], dim=1), torch.stack([sin, cos, -t[:, 1]], dim=1)], dim=1
    )
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = _brightness_contrast(
        x.permute(0, 2, 3, 1), brightness.to(dev, torch.float32), contrast.to(dev, torch.float32)
    )
    return _to_uint8(x).view(n, *images.shape[1:])


def shuffle_pairs(radiology: torch.Tensor) -> torch.Tensor:
    """The radiology batch in a fresh random order (torch's global generator): new synthetic partners."""
    return radiology[torch.randperm(radiology.shape[0]).to(radiology.device)]


class Augment(nn.Module):
    """The training augmentation of one mode (see the module docstring); the identity in ``eval()`` mode.

    Holds no parameters or buffers, so it never enters a state dict, a checkpoint or an exported graph.

    Args:
        mode: "none", "d4" or "full".
        pair_shuffle: also re-pair the radiology images across the batch (``shuffle_pairs``).
    """

    def __init__(self, mode: str, pair_shuffle: bool = False) -> None:
        super().__init__()
        if mode not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {mode!r}")
        self.mode = mode
        self.pair_shuffle = pair_shuffle

    @torch.no_grad()
    def forward(self, pathology: torch.Tensor, radiology: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented pathology uint8 [N, S, S, 3] and radiology uint8 [N, S, S, 1]; the inputs in eval()."""
        if not self.training:
            return pathology, radiology
        if self.pair_shuffle:
            radiology = shuffle_pairs(radiology)
        if self.mode == "none":
            return pathology, radiology
        n = pathology.shape[0]
        codes = torch.randint(0, D4_SIZE, (n,)).to(pathology.device)
        pathology = apply_d4(pathology, codes)
        if self.mode == "d4":
            return pathology, radiology
        j = INTENSITY_JITTER
        pathology = colour_jitter_he(
            pathology,
            alpha=_uniform(n, 1.0 - HED_SIGMA, 1.0 + HED_SIGMA, 3),
            beta=_uniform(n, -HED_SIGMA, HED_SIGMA, 3),
            brightness=_uniform(n, 1.0 - j, 1.0 + j),
            contrast=_uniform(n, 1.0 - j, 1.0 + j),
        )
        radiology = intensity_affine_ct(
            radiology,
            angle_deg=_uniform(n, -CT_ROTATION_DEG, CT_ROTATION_DEG),
            scale=_uniform(n, 1.0 - CT_SCALE, 1.0 + CT_SCALE),
            translate=_uniform(n, -CT_TRANSLATE, CT_TRANSLATE, 2),
            brightness=_uniform(n, 1.0 - j, 1.0 + j),
            contrast=_uniform(n, 1.0 - j, 1.0 + j),
        )
        return pathology, radiology
