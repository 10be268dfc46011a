"""Decode and resize images exactly as the bundle's resize rule says (Pillow, BILINEAR, uint8).

What is converted and what is refused (README "Input formats"; each refusal is an :class:`ImageError`
whose ``kind`` the run summary counts):

- converted: EXIF orientation (applied first), 16-bit grayscale (``value >> 8``, the high byte),
  alpha (composited over white for RGB inputs, black for L inputs), palette, CMYK (Pillow's formula,
  no ICC profile), grayscale -> RGB (channel repeated), RGB -> L (ITU-R 601-2 luma), bilevel,
  any size >= :data:`MIN_SIDE` and non-square images (the resize rule squashes them to S x S).
- refused: files in any format but :data:`FORMATS` whatever their extension (Pillow reads dozens, some
  through external programs: PostScript goes to Ghostscript; those decoders are never reached),
  empty or non-regular files, undecodable / truncated files, more than :data:`MAX_PIXELS`
  declared pixels (decompression bombs, whole-slide images), a side below :data:`MIN_SIDE`, several
  frames, 32-bit integer values above 65535, floating-point and other exotic modes.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .confine import Confined, Refused
from .errors import ImageError

log = logging.getLogger(__name__)

CHANNELS = {"RGB": 3, "L": 1}
# The formats the README lists, by Pillow's format ids; Pillow's JPEG reader also gives MPO (a camera
# JPEG with a preview). Image.open tries these readers only.
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")
_FORMAT_NAMES = "PNG, JPEG, TIFF, BMP, GIF or WebP"
MAX_PIXELS = 8192 * 8192  # larger declared sizes are refused before any pixel is decoded
MIN_SIDE = 8  # a smaller image holds no tissue or organ structure; upscaling it would invent one
BACKGROUND = {"RGB": (255, 255, 255, 255), "L": (0, 0, 0, 255)}  # slide glass is white, CT air is black
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_VIA_RGB = ("CMYK", "YCbCr", "P")  # converted to RGB first (P: palette without transparency)

# File signatures, so a file cut inside its header is called truncated rather than "not an image".
_MAGIC = {
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",  # BigTIFF (most whole-slide files over 4 GB)
    b"MM\x00+": "TIFF",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"RIFF": "WebP",
}

# Our own MAX_PIXELS (below Pillow's) is always checked first; Pillow's warning would only repeat it.
# Pillow's other warnings (corrupt EXIF, palette transparency) would print extra lines around our one
# line per file: the file either decodes completely or is refused with the reason.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")


def check_regular_file(path: str | os.PathLike) -> os.stat_result:
    """Stat ``path`` and refuse what cannot be an image file (missing, folder, FIFO, empty, unreadable).

    Raises:
        ImageError: One line naming the file and what it is instead.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found", "missing file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise ImageError(f"{path}: cannot read ({_why(exc)})", "unreadable") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a folder, not an image file", "not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file (a FIFO, socket or device)", "not a file")
    if st.st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)", "empty file")
    return st


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def file_signature(head: bytes) -> str | None:
    """The format the first bytes of a file announce (``PNG``, ``JPEG``, ``TIFF``, ...), or None."""
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _open(path: str | os.PathLike, confined: Confined | None) -> BinaryIO:
    """Open an image file for reading, refusing what cannot be one; checked on the opened file itself.

    With ``confined``, the file is opened through :meth:`Confined.open`: a path that leads outside the
    input folder at the moment of opening (a file swapped for a symlink after the folder was listed) is
    refused, never read.
    """
    if confined is None:
        check_regular_file(path)  # stat first: a device is never opened
    try:
        if confined is not None:
            fd = confined.open(path)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO swapped in never hangs
    except Refused as exc:
        raise ImageError(f"{path}: {exc.reason}", exc.kind) from None
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found", "missing file") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read ({_why(exc)})", "unreadable") from None
    st = os.fstat(fd)  # the file that was opened, whatever the path names now
    if stat.S_ISREG(st.st_mode) and st.st_size:
        return os.fdopen(fd, "rb")
    os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file (a FIFO, socket or device)", "not a file")
    raise ImageError(f"{path}: empty file (0 bytes)", "empty file")


def _decode(fh: BinaryIO, path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """Identify (allowed formats only), check the declared size and frame count, decode, apply the EXIF
    orientation."""
    with fh:
        try:
            img = Image.open(fh, formats=FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{path}: refused, declared size too large ({exc})", "too large") from None
        except Image.UnidentifiedImageError:
            fh.seek(0)
            fmt = file_signature(fh.read(4))
            if fmt:
                why = f"{path}: starts like a {fmt} file but its header is truncated or corrupt"
                raise ImageError(why, "truncated or corrupt") from None
            raise ImageError(
                f"{path}: cannot decode as an image (not {_FORMAT_NAMES}, the formats crc-infer reads)",
                "not an image",
            ) from None
        except Exception as exc:  # noqa: BLE001 (corrupt headers raise many types inside Pillow)
            raise ImageError(f"{path}: corrupt image header ({_why(exc)})", "truncated or corrupt") from None
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{path}: refused, {width}x{height} = {width * height:,} pixels is over the limit of "
                    f"{max_pixels:,} (a decompression bomb or a whole-slide image; tile it first)",
                    "too large",
                )
            if min(width, height) < MIN_SIDE:
                raise ImageError(
                    f"{path}: refused, {width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE} pixels",
                    "too small",
                )
            try:
                frames = getattr(img, "n_frames", 1)  # TIFF and GIF walk their frames to count them
            except Exception as exc:  # noqa: BLE001 (a damaged frame table raises TypeError, EOFError, ...)
                why = f"{path}: truncated or corrupt (cannot walk its frames: {_why(exc)})"
                raise ImageError(why, "truncated or corrupt") from None
            if frames > 1 and img.format != "MPO":  # MPO: a camera JPEG with a preview; frame 0 is it
                raise ImageError(
                    f"{path}: refused, {img.format} with {frames} frames; save the one image to use",
                    "multi-frame",
                )
            try:
                img.load()  # decode now so truncated files fail here, not later
                return ImageOps.exif_transpose(img)  # a copy, independent of the file
            except Exception as exc:  # noqa: BLE001 (truncated data raises OSError, ValueError, ...)
                detail = _why(exc).replace(f" '{path}'", "").replace(str(path), "the file")
                raise ImageError(f"{path}: truncated or corrupt ({detail})", "truncated or corrupt") from None


def to_mode(img: Image.Image, color_mode: str, path: str | os.PathLike) -> Image.Image:
    """``img`` converted to ``color_mode`` by the policy of the module docstring (alpha over white for RGB).

    Whole-slide runs use it on OpenSlide's RGBA regions (transparent outside the scan, so white: glass).

    Raises:
        ImageError: A mode with no defined conversion; the message names ``path``.
    """
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img)
        if img.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(
                f"{path}: refused, 32-bit integer pixels outside 0..65535; save it as 8 or 16 bit",
                "unsupported mode",
            )
        img = Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), "L")
    if (img.mode == "P" and "transparency" in img.info) or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode == "RGBA" and img.getchannel("A").getextrema() == (255, 255):
        img = img.convert("RGB")  # opaque (every slide tile inside the scan): the same bytes, ~4x faster
    elif img.mode in ("RGBA", "LA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, BACKGROUND[color_mode])
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    elif img.mode in _VIA_RGB:
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode not in CHANNELS:
        raise ImageError(
            f"{path}: refused, pixel mode {img.mode} has no defined conversion to {color_mode}",
            "unsupported mode",
        )
    # RGB -> L is Pillow's ITU-R 601-2 luma; L -> RGB repeats the channel.
    return img if img.mode == color_mode else img.convert(color_mode)


def load_image(
    path: str | os.PathLike,
    color_mode: str,
    size: int,
    max_pixels: int = MAX_PIXELS,
    confined: Confined | None = None,
) -> np.ndarray:
    """Decode an image, convert it to ``color_mode`` and apply the resize rule.

    The rule (docs/bundle.md) reproduces MedMNIST's own downscaling bit-exactly: convert to uint8
    ``color_mode`` with Pillow, then, only if the result is not ``size`` x ``size``,
    ``img.resize((size, size), Image.BILINEAR)``. Odd files are converted or refused as the module
    docstring says.

    Args:
        path: The image file.
        color_mode: ``"RGB"`` (pathology) or ``"L"`` (radiology).
        size: S, the side of the model's square input.
        max_pixels: Refuse images that declare more pixels than this.
        confined: The input folder's :class:`~crc_runtime.confine.Confined`: the file is opened so that
            the confinement check and the read are one operation (None: open ``path`` as it is).

    Returns:
        uint8 array ``[size, size, C]`` with C = 3 for RGB and 1 for L.

    Raises:
        ImageError: One line naming the file and what is wrong; ``kind`` is the summary's category.
    """
    if color_mode not in CHANNELS:
        raise ValueError(f"color_mode must be one of {sorted(CHANNELS)}, got {color_mode!r}")
    return _conform(_decode(_open(path, confined), path, max_pixels), color_mode, size, path)


def conform_image(
    image: Image.Image | np.ndarray, color_mode: str, size: int, name: str = "image"
) -> np.ndarray:
    """An image already in memory through the rules :func:`load_image` applies to a file.

    A Pillow image gets its EXIF orientation applied; a numpy array must be uint8 ``[H, W]``,
    ``[H, W, 1]``, ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA). Then the same size limits, conversion
    policy (module docstring) and resize rule as for a file.

    Args:
        image: A ``PIL.Image.Image`` or a numpy array.
        color_mode: ``"RGB"`` (pathology) or ``"L"`` (radiology).
        size: S, the side of the model's square input.
        name: How error messages name the image (e.g. ``pathology[3]``).

    Returns:
        uint8 array ``[size, size, C]``.

    Raises:
        ImageError: One line naming the image and what is wrong.
    """
    if color_mode not in CHANNELS:
        raise ValueError(f"color_mode must be one of {sorted(CHANNELS)}, got {color_mode!r}")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(
                f"{name}: refused, numpy dtype {image.dtype}; pass uint8 pixels", "unsupported mode"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ImageError(
                f"{name}: refused, array shape {list(image.shape)}; expected [H, W], [H, W, 1], [H, W, 3] "
                "or [H, W, 4]",
                "unsupported mode",
            )
        image = Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL image or a numpy array, given {type(image).__name__}")
    width, height = image.size
    if width * height > MAX_PIXELS or min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{name}: refused, {width}x{height} is outside {MIN_SIDE}x{MIN_SIDE} .. {MAX_PIXELS:,} pixels",
            "too large" if width * height > MAX_PIXELS else "too small",
        )
    try:
        image.load()  # a lazily opened image decodes here: truncated data fails with its name
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 (truncated data and damaged EXIF raise many types in Pillow)
        raise ImageError(f"{name}: truncated or corrupt ({_why(exc)})", "truncated or corrupt") from None
    return _conform(image, color_mode, size, name)


def decode_image(
    path: str | os.PathLike,
    color_mode: str,
    max_pixels: int = MAX_PIXELS,
    confined: Confined | None = None,
) -> Image.Image:
    """Decode an image and convert it to ``color_mode`` as :func:`load_image` does (same refusals, same
    confinement), at its own size: the image an explanation overlay is drawn on.

    Raises:
        ImageError: One line naming the file and what is wrong; ``kind`` is the summary's category.
    """
    if color_mode not in CHANNELS:
        raise ValueError(f"color_mode must be one of {sorted(CHANNELS)}, got {color_mode!r}")
    return _convert(_decode(_open(path, confined), path, max_pixels), color_mode, path)


def _convert(img: Image.Image, color_mode: str, path: str | os.PathLike) -> Image.Image:
    """The conversion policy of the module docstring, its failures as :class:`ImageError`."""
    try:
        return to_mode(img, color_mode, path)
    except (OSError, ValueError) as exc:  # Pillow's "conversion not supported" and the like
        raise ImageError(
            f"{path}: cannot convert to {color_mode} ({_why(exc)})", "unsupported mode"
        ) from None


def _conform(img: Image.Image, color_mode: str, size: int, path: str | os.PathLike) -> np.ndarray:
    """Convert a decoded image to ``color_mode`` and apply the resize rule; ``[size, size, C]`` uint8."""
    converted = _convert(img, color_mode, path)
    try:
        if converted.size != (size, size):
            converted = converted.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(converted, dtype=np.uint8)
    except (OSError, ValueError) as exc:  # Pillow's "conversion not supported" and the like
        raise ImageError(
            f"{path}: cannot convert to {color_mode} ({_why(exc)})", "unsupported mode"
        ) from None
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array)
