"""Decode and resize images exactly as the bundle's resize rule says (Pillow, BILINEAR, uint8)."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from .errors import ImageError

log = logging.getLogger(__name__)

CHANNELS = {"RGB": 3, "L": 1}


def load_image(path: str | os.PathLike, color_mode: str, size: int) -> np.ndarray:
    """Decode an image, convert it to ``color_mode`` and apply the resize rule.

    The rule (docs/bundle.md) reproduces MedMNIST's own downscaling bit-exactly: convert to uint8
    ``color_mode`` with Pillow, then, only if the result is not ``size`` x ``size``,
    ``img.resize((size, size), Image.BILINEAR)``.

    Args:
        path: The image file.
        color_mode: ``"RGB"`` (pathology) or ``"L"`` (radiology).
        size: S, the side of the model's square input.

    Returns:
        uint8 array ``[size, size, C]`` with C = 3 for RGB and 1 for L.

    Raises:
        ImageError: The file is missing, not an image, truncated or cannot be converted.
    """
    if color_mode not in CHANNELS:
        raise ValueError(f"color_mode must be one of {sorted(CHANNELS)}, got {color_mode!r}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not later
            # Simple, explicit policy: Pillow's own convert (e.g. RGBA drops alpha, L repeats to RGB).
            converted = img if img.mode == color_mode else img.convert(color_mode)
            if converted.size != (size, size):
                converted = converted.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(converted, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused, image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        detail = str(exc).replace(f" '{path}'", "").replace(str(path), "the file")  # Pillow repeats the path
        raise ImageError(f"{path}: cannot decode as an image ({detail})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array)
