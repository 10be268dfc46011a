"""Synthetic PathMNIST / OrganAMNIST files in MedMNIST's exact npz format.

They let the whole pipeline (training, export, runtime) run without the real datasets. Images are
learnable but not trivially so: pathology classes differ by hue *and* stripe frequency / orientation,
with hue jitter wide enough that neighbouring classes overlap in colour, random stripe phase and
pixel noise. Radiology images are gray blobs whose position and size depend on one of 11 organ classes.
The files are read back through the medmnist package like the real data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PATHOLOGY_CLASSES = 9
RADIOLOGY_CLASSES = 11
_CHUNK = 128  # images generated at once: bounds memory at 224 px


def size_flag(size: int) -> str:
    """MedMNIST's file-name suffix: empty at 28 px, "_<size>" otherwise."""
    return "" if size == 28 else f"_{size}"


def _hsv_to_rgb(h: np.ndarray, s: float, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, h in [0, 1), s scalar, v array; returns [..., 3] in 0..1."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((*np.broadcast(h, v).shape, 3))
    for k, (r, g, b) in enumerate(choices):
        mask = i == k
        rgb[..., 0] = np.where(mask, r, rgb[..., 0])
        rgb[..., 1] = np.where(mask, g, rgb[..., 1])
        rgb[..., 2] = np.where(mask, b, rgb[..., 2])
    return rgb


def _pathology(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 [N, S, S, 3]: class c has hue ~c/9, stripe frequency c//3 and orientation c%3."""
    n = len(labels)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    for start in range(0, n, _CHUNK):
        c = labels[start : start + _CHUNK].astype(float)
        m = len(c)
        # Hue jitter of +-0.08 (about 0.7 class spacings): colour alone cannot separate neighbours.
        hue = (c / PATHOLOGY_CLASSES + rng.uniform(-0.08, 0.08, m)) % 1.0
        freq = 2.0 + 1.5 * (c // 3) + rng.uniform(-0.3, 0.3, m)
        angle = np.pi * (c % 3) / 3.0 + rng.uniform(-0.2, 0.2, m)
        phase = rng.uniform(0, 2 * np.pi, m)
        proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
        value = 0.35 + 0.5 * stripes + rng.normal(0, 0.12, (m, size, size))
        rgb = _hsv_to_rgb(hue[:, None, None] + np.zeros((m, size, size)), 0.6, np.clip(value, 0, 1))
        rgb += rng.normal(0, 0.05, rgb.shape)
        out[start : start + m] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _radiology(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Gray uint8 [N, S, S] (no channel axis, like OrganAMNIST): one bright blob per image."""
    n = len(labels)
    out = np.empty((n, size, size), dtype=np.uint8)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    for start in range(0, n, _CHUNK):
        c = labels[start : start + _CHUNK].astype(float)
        m = len(c)
        theta = 2 * np.pi * c / RADIOLOGY_CLASSES + rng.uniform(-0.2, 0.2, m)
        cx, cy = 0.45 * np.cos(theta), 0.45 * np.sin(theta)
        radius = 0.15 + 0.02 * (c % 4) + rng.uniform(-0.03, 0.03, m)
        d2 = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2
        blob = np.exp(-d2 / (2 * radius[:, None, None] ** 2))
        body = np.exp(-(xx**2 + yy**2) / 0.5)  # a dim "body" behind the organ
        img = 0.25 * body + 0.7 * blob + rng.normal(0, 0.06, (m, size, size))
        out[start : start + m] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def write_synthetic_medmnist(
    root: str | Path,
    size: int = 28,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 150,
    seed: int = 0,
) -> Path:
    """Write synthetic ``pathmnist{flag}.npz`` and ``organamnist{flag}.npz`` into ``root``.

    The layout is MedMNIST's: keys ``{train,val,test}_{images,labels}``; pathology images uint8
    [N, S, S, 3], radiology images uint8 [N, S, S], labels uint8 [N, 1]; ``np.savez_compressed``.
    Both modalities get the same number of samples per split; labels cycle through every class so each
    split holds all of them.

    Args:
        root: folder to write into (created if missing).
        size: image side, one of 28, 64, 128, 224.
        n_train: samples per modality in the training split.
        n_val: samples per modality in the validation split.
        n_test: samples per modality in the test split.
        seed: seed of the generator; the same arguments give the same bytes.

    Returns:
        The folder, usable as the medmnist ``root``.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for flag, n_classes, make in (
        ("pathmnist", PATHOLOGY_CLASSES, _pathology),
        ("organamnist", RADIOLOGY_CLASSES, _radiology),
    ):
        arrays = {}
        for split, n in counts.items():
            labels = rng.permutation(np.arange(n) % n_classes).astype(np.uint8)
            arrays[f"{split}_images"] = make(labels, size, rng)
            arrays[f"{split}_labels"] = labels[:, None]
        path = root / f"{flag}{size_flag(size)}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        log.info("wrote %s (%s)", path, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return root
