"""Whole-slide tissue maps: open a slide, find its tissue, cut it into training-geometry tiles, classify them.

PathMNIST is NCT-CRC-HE-100K shrunk, and NCT's tiles are 224 px at 0.5 um/px (112 um) from colorectal H&E
slides, so a model trained here applies to a real slide cut into the same tiles. The stages, each one
function or class here, composed by :class:`SlideJob`:

1. :func:`open_slide`: the OpenSlide handle (SVS, NDPI, MRXS, generic tiled TIFF, ...), the microns per
   pixel of level 0 (``openslide.mpp-x`` / ``mpp-y``, which OpenSlide also derives from a TIFF resolution
   in cm or inch; else ``--mpp``; else refused), the scanned region (``openslide.bounds-*``).
2. :func:`detect_tissue`: a low-resolution RGB image of the slide (read band by band, so memory does not
   grow with the slide) and its HSV saturation (glass is grey-white, tissue is coloured). Otsu's threshold
   finds the stained tissue; pale tissue (fat, mucus) lies below it, so pixels above a third of it count
   too where they touch stained tissue (hysteresis, as in Canny's edge detector). Then a morphological
   closing, and enclosed glass up to :data:`MAX_HOLE_TILES` tile areas filled (gland lumens, fat cells,
   small tears). Saved as ``tissue_mask.png``.
3. :func:`plan_tiles`: the tile grid in level-0 pixels (``--stride`` microns apart, default 112 um:
   adjacent tiles), each tile's tissue fraction from the mask, kept when it is >= ``--min-tissue``; the
   pyramid level to read: the coarsest whose resolution is still 0.5 um/px or finer.
4. :class:`TileReader`, run by :meth:`crc_runtime.predictor.Predictor.predict_folder` (the streaming
   pipeline of folder runs) in its reader threads ahead of the model: read the tile's region at that level,
   composite transparent parts over white, resample to 224 x 224 px with Pillow BILINEAR, then apply the
   bundle's own resize rule. BILINEAR because it is the
   rule the dataset itself was made with (MedMNIST shrank NCT's 224-px tiles with Pillow BILINEAR) and
   Pillow widens its triangle kernel with the reduction factor, so downscaling averages every source pixel
   (no aliasing) without the overshoot that BICUBIC / LANCZOS add at sharp nuclear edges. A level that is
   already 0.5 um/px gives 224-px regions that are not resampled at all.
5. :meth:`SlideJob.write_outputs`: ``tissue_map.png``, ``overlay.png``, ``tiles.geojson`` and
   ``summary.json``, all derived from the finished ``tiles.csv``, each written atomically.

The one radiology image is paired with every tile: patient-level pairing, the only pairing a slide has.
"""

from __future__ import annotations

import colorsys
import csv
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .atomic import atomic_path
from .bundle import Bundle, sha256_file
from .errors import UserError
from .images import check_regular_file, conform_image, file_signature, load_image, to_mode
from .pairs import PairSet
from .predict import InferenceResult, Prediction, column_names, input_plan
from .predictions import PredictionWriter
from .predictor import Predictor
from .timing import folder_run_report, write_report

log = logging.getLogger(__name__)

TARGET_MPP = 0.5  # um per pixel of the training tiles (NCT-CRC-HE-100K, 20x)
TILE_PX = 224  # their side in pixels
TILE_UM = TARGET_MPP * TILE_PX  # 112 um
# A pyramid level counts as 0.5 um/px when within 1 %: odd-sized slides have downsamples like 2.0006, and
# 1 % is below the calibration error of the scanners' own MPP.
LEVEL_TOLERANCE = 0.01
MASK_PX_PER_TILE = 16  # tissue-mask pixels across one tile (7 um each at 112-um tiles)
MASK_MAX_SIDE = 4096  # ... but never more than this many across the slide (memory stays bounded)
# Saturation 0..255. Otsu's threshold falls between glass and stained tissue, above pale tissue (fat, mucus:
# 15-30 where glass is 0-10), so pale tissue counts from a third of it on, where it touches stained tissue.
PALE_TISSUE = 1 / 3
SATURATION_FLOOR = 12  # neither threshold goes below this: Otsu on an all-glass slide splits sensor noise
CLOSING_PX = 3  # mask pixels: closes one-pixel gaps (thin membranes of fat cells, pale cytoplasm)
MAX_HOLE_TILES = 4  # enclosed glass up to this many tile areas (about 0.05 mm^2) is filled as tissue
MIN_TISSUE = 0.5  # default --min-tissue: a tile is run when at least half of it is tissue
BAND_PIXELS = 1 << 24  # pixels per read while building the low-resolution image (64 MiB as RGBA)
MAP_SIDE = 1024  # the tissue map's grid is drawn at most this many pixels across
OVERLAY_MAX_SIDE = 2048
OVERLAY_ALPHA = 120  # of 255: the class colour over the thumbnail
# The tumour-stroma ratio's two classes (the manifest names of PathMNIST's TUM and STR).
TUMOUR_CLASS = "colorectal adenocarcinoma epithelium"
STROMA_CLASS = "cancer-associated stroma"
# Class colours by class index, chosen for PathMNIST's order (adipose, background, debris, lymphocytes,
# mucus, smooth muscle, normal mucosa, stroma, tumour); further classes get generated hues.
PALETTE = (
    (255, 214, 102),
    (189, 189, 189),
    (140, 86, 75),
    (31, 119, 180),
    (158, 218, 229),
    (227, 119, 194),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
)
NO_TISSUE = (255, 255, 255)
EXTRA = "pip install 'crc-fusion[slides]'"
OUTPUTS = {
    "tiles": "tiles.csv",
    "mask": "tissue_mask.png",
    "map": "tissue_map.png",
    "overlay": "overlay.png",
    "geojson": "tiles.geojson",
    "summary": "summary.json",
}


class SlideError(UserError):
    """A slide that cannot be used: unreadable, not a slide, no pixel size, too coarse, damaged tiles."""


def _openslide() -> Any:
    """The openslide module, or a one-line error naming the extra to install."""
    try:
        import openslide
    except (ImportError, OSError) as exc:  # OSError: openslide-python without the OpenSlide library
        raise UserError(f"crc-infer slide needs OpenSlide, which is not installed ({exc}); {EXTRA}") from None
    return openslide


def class_colour(index: int) -> tuple[int, int, int]:
    """The map colour of class ``index``."""
    if index < len(PALETTE):
        return PALETTE[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.65, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass
class Slide:
    """An open whole-slide image: level 0 size, microns per pixel, pyramid, scanned region.

    Region reads are thread-safe (OpenSlide's handle is, and ctypes releases the GIL while it reads).
    """

    path: Path
    handle: Any
    width: int
    height: int
    mpp_x: float
    mpp_y: float
    mpp_source: str
    vendor: str
    bounds: tuple[int, int, int, int]  # x, y, width, height in level-0 px of the scanned region
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    quickhash: str | None
    _error: type = field(default=Exception, repr=False)

    def read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """The RGB region whose top-left is level-0 pixel (x, y), ``width`` x ``height`` pixels of ``level``.

        Transparent pixels (outside the scanned region) come out white, like glass.

        Raises:
            SlideError: OpenSlide cannot decode the region (the file is damaged); OpenSlide's handle is
                unusable after such an error, so the run stops rather than skipping every later tile.
        """
        try:
            region = self.handle.read_region((x, y), level, (width, height))
        except self._error as exc:
            raise SlideError(
                f"{self.path}: cannot read the region at x={x}, y={y} (level {level}): {exc}; "
                "the slide file is damaged"
            ) from None
        return to_mode(region, "RGB", self.path)

    def describe(self) -> dict:
        """The slide's facts for summary.json."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "width": self.width,
            "height": self.height,
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "mpp_source": self.mpp_source,
            "bounds": list(self.bounds),
            "levels": [
                {"width": w, "height": h, "downsample": d}
                for (w, h), d in zip(self.level_dimensions, self.level_downsamples, strict=True)
            ],
            "quickhash": self.quickhash,
        }

    def close(self) -> None:
        self.handle.close()


def _positive_float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image with OpenSlide and read its pixel size.

    Args:
        path: The slide (for MIRAX, the .mrxs file next to its data folder).
        mpp: Microns per pixel of level 0 for both axes; overrides the slide's own metadata.

    Raises:
        UserError: OpenSlide is not installed (names the extra).
        SlideError: One line: missing, not a slide, corrupt, no pixel size, or coarser than 0.5 um/px.
    """
    openslide = _openslide()
    path = Path(path)
    check_regular_file(path)
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        with open(path, "rb") as fh:
            fmt = file_signature(fh.read(4))
        if fmt == "TIFF":
            why = (
                "a TIFF file OpenSlide cannot open as a slide: truncated or corrupt, or a plain (untiled) "
                "image; crc-infer FOLDER takes single images"
            )
        elif fmt:
            why = f"a {fmt} image, not a whole-slide file; crc-infer FOLDER takes single images"
        else:
            why = "not a slide format OpenSlide reads (Aperio SVS, Hamamatsu NDPI, MIRAX MRXS, tiled TIFF...)"
        raise SlideError(f"{path}: {why}") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path}: corrupt slide ({exc})") from None
    props = handle.properties
    own = (_positive_float(props.get("openslide.mpp-x")), _positive_float(props.get("openslide.mpp-y")))
    if mpp is not None:
        mpp_x = mpp_y = float(mpp)
        source = "--mpp"
        if None not in own and abs(own[0] / mpp_x - 1) > LEVEL_TOLERANCE:
            log.warning("%s: --mpp %g overrides the slide's own %g um/px", path, mpp_x, own[0])
    elif None not in own:
        mpp_x, mpp_y = own
        source = "openslide.mpp-x/y"
    else:
        handle.close()
        raise SlideError(
            f"{path}: no pixel size in the slide's metadata (no openslide.mpp-x/y: neither a scanner MPP nor "
            "a TIFF resolution in cm or inch); pass --mpp, e.g. --mpp 0.25 for a 40x scan"
        )
    if max(mpp_x, mpp_y) > TARGET_MPP * (1 + LEVEL_TOLERANCE):
        handle.close()
        raise SlideError(
            f"{path}: level 0 is {max(mpp_x, mpp_y):g} um/px ({source}), coarser than the {TARGET_MPP} um/px "
            f"of the model's tiles; scan at 20x or finer (or fix the pixel size with --mpp)"
        )
    width, height = handle.dimensions
    bounds = [_positive_float(props.get(f"openslide.bounds-{k}")) for k in ("width", "height")]
    if None in bounds:
        box = (0, 0, width, height)
    else:
        bx, by = (int(props.get(f"openslide.bounds-{k}", 0) or 0) for k in ("x", "y"))
        box = (bx, by, int(bounds[0]), int(bounds[1]))
    return Slide(
        path=path,
        handle=handle,
        width=width,
        height=height,
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        mpp_source=source,
        vendor=props.get("openslide.vendor", "unknown"),
        bounds=box,
        level_dimensions=tuple(handle.level_dimensions),
        level_downsamples=tuple(float(d) for d in handle.level_downsamples),
        quickhash=props.get("openslide.quickhash-1"),
        _error=openslide.OpenSlideError,
    )


def read_level(slide: Slide) -> int:
    """The coarsest pyramid level whose resolution is still :data:`TARGET_MPP` or finer (within 1 %)."""
    mpp = max(slide.mpp_x, slide.mpp_y)
    usable = [
        i for i, d in enumerate(slide.level_downsamples) if mpp * d <= TARGET_MPP * (1 + LEVEL_TOLERANCE)
    ]
    return max(usable, key=lambda i: slide.level_downsamples[i]) if usable else 0


# --- tissue detection -------------------------------------------------------------------------------------


@dataclass
class TissueMask:
    """The tissue mask of a slide.

    Mask pixel (0, 0) covers level-0 pixels ``origin`` to ``origin + px`` in both axes.
    """

    mask: np.ndarray  # bool [h, w], True = tissue
    px: float  # level-0 pixels per mask pixel
    origin: tuple[int, int]
    level: int  # the pyramid level it was read from
    otsu: int  # Otsu's threshold on saturation (0..255)
    low: int  # pale tissue: saturation > low, kept where it touches stained tissue
    high: int  # stained tissue: saturation > high

    def describe(self, mpp: float) -> dict:
        return {
            "method": "HSV saturation of a low-resolution image: stained tissue above Otsu's threshold, pale "
            "tissue above a third of it where it touches stained tissue (hysteresis), a "
            f"{CLOSING_PX}x{CLOSING_PX} closing, enclosed glass up to {MAX_HOLE_TILES} tile areas filled",
            "mask_um_per_px": self.px * mpp,
            "mask_size": [int(self.mask.shape[1]), int(self.mask.shape[0])],
            "read_level": self.level,
            "otsu_saturation": self.otsu,
            "saturation_thresholds": {"pale": self.low, "stained": self.high},
            "tissue_fraction_of_slide": float(self.mask.mean()) if self.mask.size else 0.0,
        }


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t that maximises the between-class variance of <= t and > t.

    Over a run of empty histogram bins the variance is flat; the lowest t of the run is returned, so pale
    tissue just above the glass peak stays on the tissue side.
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    omega = np.cumsum(hist) / total
    mu = np.cumsum(hist * np.arange(256)) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    return int(np.argmax(np.nan_to_num(between, nan=0.0, posinf=0.0)))


def label_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 4-connected regions of True pixels, found on runs rather than pixels.

    numpy finds each row's runs of True and which runs of the row above overlap them; a union-find joins
    those, so the cost follows the number of runs, not of pixels.

    Returns:
        ``(row, start, end, region)`` per run (``start`` inclusive, ``end`` exclusive, in row-major
        order); ``region`` is the index of the run that names the run's region.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    row, start = np.nonzero(edges == 1)
    _, end = np.nonzero(edges == -1)  # same rows, same order: every run has one start and one end
    n = len(row)
    key = w + 1  # (row, column) as one sortable number
    start_key, end_key = row * key + start, row * key + end
    # Runs of the row above that overlap run i (end > start_i and start < end_i): a contiguous index range.
    lo = np.searchsorted(end_key, (row - 1) * key + start, side="right")
    hi = np.searchsorted(start_key, (row - 1) * key + end, side="left")
    counts = np.maximum(hi - lo, 0)
    below = np.repeat(np.arange(n), counts)
    above = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(above.tolist(), below.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    region = np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
    return row, start, end, region


def _paint(shape: tuple[int, int], row: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """A bool image with the given runs set."""
    h, w = shape
    paint = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(paint, (row, start), 1)
    np.add.at(paint, (row, end), -1)
    return np.cumsum(paint[:, :w], axis=1) > 0


def fill_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill the background regions ``mask`` encloses (4-connected, not touching the border), up to
    ``max_area`` pixels each."""
    h, w = mask.shape
    row, start, end, region = label_runs(~mask)
    if not len(row):
        return mask.copy()
    area = np.bincount(region, weights=end - start, minlength=len(row))
    border = np.zeros(len(row), dtype=bool)
    border[region[(row == 0) | (row == h - 1) | (start == 0) | (end == w)]] = True
    fill = ~border[region] & (area[region] <= max_area)
    return mask | _paint(mask.shape, row[fill], start[fill], end[fill])


def hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The 4-connected regions of ``weak`` that hold a ``strong`` pixel (``strong`` lies within ``weak``)."""
    row, start, end, region = label_runs(weak)
    if not len(row):
        return np.zeros_like(weak)
    count = np.zeros((weak.shape[0], weak.shape[1] + 1), dtype=np.int32)
    count[:, 1:] = np.cumsum(strong, axis=1, dtype=np.int32)
    seeded = (count[row, end] - count[row, start]) > 0
    keep = np.bincount(region, weights=seeded, minlength=len(row))[region] > 0
    return _paint(weak.shape, row[keep], start[keep], end[keep])


def read_thumbnail(slide: Slide, px: float, width: int, height: int) -> tuple[np.ndarray, int]:
    """The slide's bounds as an RGB image of ``width`` x ``height``, each pixel ``px`` level-0 pixels.

    Read from the coarsest level at least that fine, in bands of at most :data:`BAND_PIXELS` source pixels,
    each shrunk with Pillow's BOX filter (the mean of the source pixels it covers).
    """
    level = slide.handle.get_best_level_for_downsample(px)
    down = slide.level_downsamples[level]
    f = px / down  # source pixels per output pixel
    bx, by = slide.bounds[:2]
    # Reads start on whole source pixels (OpenSlide interpolates a region that starts between two); the
    # fractions go into Pillow's box.
    left = math.floor(bx / down)
    dx = bx / down - left
    src_w = math.ceil(dx + width * f) + 1
    rows_per_band = max(1, int(BAND_PIXELS // max(1.0, src_w * f)))
    out = np.empty((height, width, 3), dtype=np.uint8)
    for r0 in range(0, height, rows_per_band):
        r1 = min(height, r0 + rows_per_band)
        y = (by + r0 * px) / down  # the band's top in source pixels
        top = math.floor(y)
        dy = y - top
        src_h = math.ceil(dy + (r1 - r0) * f) + 1
        band = slide.read(round(left * down), round(top * down), level, src_w, src_h)
        box = (dx, dy, dx + width * f, dy + (r1 - r0) * f)
        out[r0:r1] = np.asarray(band.resize((width, r1 - r0), Image.Resampling.BOX, box=box))
    return out, level


def detect_tissue(slide: Slide, tile_px0: float) -> TissueMask:
    """Find the tissue of ``slide`` (see the module docstring, stage 2).

    Args:
        slide: The open slide.
        tile_px0: The tile side in level-0 pixels (the mask has :data:`MASK_PX_PER_TILE` pixels across it,
            or fewer when the slide is so large that the mask would exceed :data:`MASK_MAX_SIDE`).
    """
    bx, by, bw, bh = slide.bounds
    px = max(tile_px0 / MASK_PX_PER_TILE, max(bw, bh) / MASK_MAX_SIDE)
    width, height = max(1, math.ceil(bw / px)), max(1, math.ceil(bh / px))
    thumb, level = read_thumbnail(slide, px, width, height)
    saturation = np.asarray(Image.fromarray(thumb).convert("HSV"))[:, :, 1]
    otsu = otsu_threshold(saturation)
    high = max(otsu, SATURATION_FLOOR)
    low = max(round(otsu * PALE_TISSUE), SATURATION_FLOOR)
    tissue = hysteresis(saturation > low, saturation > high)
    closed = Image.fromarray((tissue * 255).astype(np.uint8))
    closed = closed.filter(ImageFilter.MaxFilter(CLOSING_PX)).filter(ImageFilter.MinFilter(CLOSING_PX))
    filled = fill_holes(np.asarray(closed) > 0, MAX_HOLE_TILES * (tile_px0 / px) ** 2)
    log.info(
        "%s: tissue mask %dx%d from level %d, Otsu %d, thresholds %d / %d, %.1f %% tissue",
        slide.path, width, height, level, otsu, low, high, 100 * filled.mean(),
    )  # fmt: skip
    return TissueMask(filled, px, (bx, by), level, otsu, low, high)


# --- the tile grid ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile: top-left in level-0 pixels, grid row and column, tissue fraction."""

    x: int
    y: int
    row: int
    col: int
    tissue: float

    @property
    def id(self) -> str:
        return f"{self.x},{self.y}"

    @property
    def label(self) -> None:  # run_inference's items carry a label; tiles have none
        return None


@dataclass
class TileGrid:
    """Where the tiles are and how each is read."""

    tile_w0: float  # tile footprint in level-0 pixels
    tile_h0: float
    stride_x0: float
    stride_y0: float
    stride_um: float
    origin: tuple[int, int]
    cols: int
    rows: int
    level: int  # pyramid level the tiles are read from
    read_w: int  # region read at that level, resampled to TILE_PX
    read_h: int
    min_tissue: float
    tiles: list[Tile]  # the tiles with enough tissue, row by row

    @property
    def positions(self) -> int:
        return self.cols * self.rows

    @property
    def size0(self) -> tuple[int, int]:
        """The tile's footprint in whole level-0 pixels (tiles.csv width, height)."""
        return round(self.tile_w0), round(self.tile_h0)

    def describe(self, slide: Slide) -> dict:
        return {
            "tile_um": TILE_UM,
            "tile_px": TILE_PX,
            "target_mpp": TARGET_MPP,
            "stride_um": self.stride_um,
            "tile_level0_px": [self.tile_w0, self.tile_h0],
            "stride_level0_px": [self.stride_x0, self.stride_y0],
            "grid": {"cols": self.cols, "rows": self.rows, "origin": list(self.origin)},
            "read_level": self.level,
            "read_level_mpp": [
                slide.mpp_x * slide.level_downsamples[self.level],
                slide.mpp_y * slide.level_downsamples[self.level],
            ],
            "read_px": [self.read_w, self.read_h],
            "resample": "none (already 224 px)"
            if (self.read_w, self.read_h) == (TILE_PX, TILE_PX)
            else f"Pillow BILINEAR {self.read_w}x{self.read_h} -> {TILE_PX}x{TILE_PX}",
            "then": "the bundle's resize rule (Pillow BILINEAR to S x S when S != 224)",
        }


def plan_tiles(
    slide: Slide, tissue: TissueMask, stride_um: float = TILE_UM, min_tissue: float = MIN_TISSUE
) -> TileGrid:
    """Lay the grid over the scanned region and keep the tiles with enough tissue.

    Tile (row, col) has its top-left at ``origin + round((col, row) x stride)`` and covers
    :data:`TILE_UM` microns; only tiles wholly inside the scanned region are on the grid.
    """
    tw0, th0 = TILE_UM / slide.mpp_x, TILE_UM / slide.mpp_y
    sx0, sy0 = stride_um / slide.mpp_x, stride_um / slide.mpp_y
    bx, by, bw, bh = slide.bounds
    cols = math.floor((bw - tw0) / sx0) + 1 if bw >= tw0 else 0
    rows = math.floor((bh - th0) / sy0) + 1 if bh >= th0 else 0
    xs = bx + np.round(np.arange(cols) * sx0).astype(np.int64)
    ys = by + np.round(np.arange(rows) * sy0).astype(np.int64)
    # Tissue fraction of every tile from the integral image of the mask (tile edges rounded to mask pixels).
    h, w = tissue.mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int32)  # the mask has at most MASK_MAX_SIDE^2 pixels
    integral[1:, 1:] = tissue.mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    c0 = np.clip(np.round((xs - bx) / tissue.px).astype(np.int64), 0, w - 1)
    c1 = np.clip(np.round((xs - bx + tw0) / tissue.px).astype(np.int64), c0 + 1, w)
    r0 = np.clip(np.round((ys - by) / tissue.px).astype(np.int64), 0, h - 1)
    r1 = np.clip(np.round((ys - by + th0) / tissue.px).astype(np.int64), r0 + 1, h)
    inside = (
        integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0]
    )  # [rows, cols]
    fraction = inside / ((r1 - r0)[:, None] * (c1 - c0)[None, :])
    level = read_level(slide)
    down = slide.level_downsamples[level]
    tiles = [
        Tile(int(xs[c]), int(ys[r]), int(r), int(c), round(float(fraction[r, c]), 3))
        for r, c in zip(*np.nonzero(fraction >= min_tissue), strict=True)
    ]
    return TileGrid(
        tile_w0=tw0,
        tile_h0=th0,
        stride_x0=sx0,
        stride_y0=sy0,
        stride_um=stride_um,
        origin=(bx, by),
        cols=cols,
        rows=rows,
        level=level,
        read_w=max(1, round(tw0 / down)),
        read_h=max(1, round(th0 / down)),
        min_tissue=min_tissue,
        tiles=tiles,
    )


class TileReader:
    """Makes one tile into the model's inputs (the ``decode`` of :func:`~crc_runtime.predict.run_inference`).

    Args:
        slide: The open slide.
        grid: Level and read size.
        plan: ``(input name, color mode)`` per model input (:func:`~crc_runtime.predict.input_plan`).
        size: S, the model's input side.
        radiology: The one radiology image, already at S x S (the same array for every tile).
    """

    def __init__(
        self,
        slide: Slide,
        grid: TileGrid,
        plan: list[tuple[str, str]],
        size: int,
        radiology: np.ndarray | None,
    ) -> None:
        self.slide, self.grid, self.plan, self.size, self.radiology = slide, grid, plan, size, radiology

    def tile_image(self, tile: Tile) -> Image.Image:
        """The tile at 0.5 um/px: 224 x 224 RGB."""
        g = self.grid
        img = self.slide.read(tile.x, tile.y, g.level, g.read_w, g.read_h)
        if img.size != (TILE_PX, TILE_PX):
            img = img.resize((TILE_PX, TILE_PX), Image.Resampling.BILINEAR)
        return img

    def __call__(self, tile: Tile) -> dict[str, np.ndarray]:
        img = self.tile_image(tile)
        source = f"{self.slide.path} tile {tile.id}"
        return {
            name: self.radiology if name == "radiology" else conform_image(img, mode, self.size, source)
            for name, mode in self.plan
        }


# --- the job ----------------------------------------------------------------------------------------------


def tile_columns(classes: list[str]) -> list[str]:
    """The tiles.csv header: x, y, width, height (level-0 px), tissue, predicted, prob_<class>..."""
    return ["x", "y", "width", "height", "tissue", "predicted", *column_names(classes)]


class SlideJob:
    """One slide's run: open it, find the tissue, plan the tiles, classify them, write every output.

    Args:
        slide_path: The slide file.
        radiology: The radiology image paired with every tile (None when the bundle has no radiology input).
        bundle: The loaded bundle.
        out_dir: Output folder (created if missing).
        mpp: Overrides the slide's microns per pixel.
        stride_um: Distance between tile origins in microns (<= 112: adjacent or overlapping tiles).
        min_tissue: Tissue fraction a tile needs to be classified.

    Raises:
        UserError: Any one-line problem with the slide, the radiology image or the output folder.
    """

    def __init__(
        self,
        slide_path: str | os.PathLike,
        radiology: str | os.PathLike | None,
        bundle: Bundle,
        out_dir: str | os.PathLike,
        mpp: float | None = None,
        stride_um: float = TILE_UM,
        min_tissue: float = MIN_TISSUE,
    ) -> None:
        self.bundle = bundle
        self.out = Path(out_dir)
        self.seconds: dict[str, float] = {}
        self.plan = input_plan(bundle)
        modes = dict(self.plan)
        if "radiology" in modes and radiology is None:
            raise UserError(
                f"{bundle.path}: the model takes a radiology image; pass the patient's with "
                "--radiology IMAGE (it is paired with every tile)"
            )
        if "radiology" not in modes and radiology is not None:
            log.warning("%s: the bundle has no radiology input; --radiology is ignored", bundle.path)
            radiology = None
        self.radiology_path = Path(radiology) if radiology is not None else None
        rad = load_image(radiology, modes["radiology"], bundle.image_size) if radiology is not None else None
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder; pass a folder with -o")
        t0 = time.perf_counter()
        self.slide = open_slide(slide_path, mpp)
        self.seconds["open"] = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            self.tissue = detect_tissue(
                self.slide, min(TILE_UM / self.slide.mpp_x, TILE_UM / self.slide.mpp_y)
            )
            self.grid = plan_tiles(self.slide, self.tissue, stride_um, min_tissue)
            self.seconds["tissue"] = time.perf_counter() - t0
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                with atomic_path(self.out / OUTPUTS["mask"]) as tmp:
                    Image.fromarray((self.tissue.mask * 255).astype(np.uint8)).save(tmp, format="PNG")
            except OSError as exc:
                raise UserError(f"{self.out}: cannot write the outputs ({exc.strerror or exc})") from None
            if not self.grid.tiles:
                raise SlideError(
                    f"{self.slide.path}: no tile holds {min_tissue:.0%} tissue ({self.grid.positions} tiles "
                    f"on the grid, saturation thresholds {self.tissue.low} / {self.tissue.high}; mask in "
                    f"{self.out / OUTPUTS['mask']}); lower --min-tissue if the tissue is there"
                )
        except BaseException:
            self.slide.close()
            raise
        self.reader = TileReader(self.slide, self.grid, self.plan, bundle.image_size, rad)
        self.writer: PredictionWriter | None = None
        self.result: InferenceResult | None = None

    def run_key(self, predictor: Predictor) -> dict:
        """What must be equal for a resumed run's rows to be kept: model, slide, radiology image, grid."""
        g, s = self.grid, self.slide
        return {
            **predictor.model_key(),
            "slide": {"quickhash": s.quickhash, "size": [s.width, s.height], "mpp": [s.mpp_x, s.mpp_y]},
            "radiology_sha256": sha256_file(self.radiology_path) if self.radiology_path else None,
            "grid": {"stride_um": g.stride_um, "min_tissue": g.min_tissue, "level": g.level, "cols": g.cols},
        }

    def start(self, predictor: Predictor, resume: bool = False) -> PredictionWriter:
        """Open ``tiles.csv.partial`` for this model and grid (with ``resume``, keep the rows it holds)."""
        self.writer = PredictionWriter(
            self.out / OUTPUTS["tiles"],
            tile_columns(self.bundle.classes),
            resume,
            self.run_key(predictor),
            key_columns=2,
        )
        return self.writer

    @property
    def todo(self) -> int:
        """Tiles still to classify: all of them, less those the resumed partial file holds."""
        return len(self.grid.tiles) - (len(self.writer.done_ids) if self.writer is not None else 0)

    def run(
        self,
        predictor: Predictor,
        workers: int | None = None,
        on_batch: Callable[[list[Prediction]], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> InferenceResult:
        """Classify every tile not yet in the partial file (:meth:`start` first); tiles.csv at the end.

        The tiles go through :meth:`Predictor.predict_folder`, batch by batch (``predictor.batch_size``),
        read by :class:`TileReader` in ``workers`` threads; rows stream to ``tiles.csv.partial``, which a
        killed run keeps for ``--resume``.
        """
        if self.writer is None:
            self.start(predictor)
        classes = self.bundle.classes
        width, height = self.grid.size0
        by_id = {t.id: t for t in self.grid.tiles}

        def write(preds: list[Prediction]) -> None:
            rows = []
            for p in preds:
                tile = by_id[p.id]
                probs = (f"{x:.6f}" for x in p.probs)
                rows.append(
                    [tile.x, tile.y, width, height, f"{tile.tissue:.3f}", classes[p.predicted], *probs]
                )
            self.writer.write_rows(rows)
            if on_batch is not None:
                on_batch(preds)

        t0 = time.perf_counter()
        self.result = predictor.predict_folder(
            PairSet(pairs=self.grid.tiles, source=str(self.slide.path)),
            skip_ids=self.writer.done_ids,
            on_batch=write,
            workers=workers,
            keep_predictions=False,  # rows stream to the writer: memory stays flat
            decode=self.reader,
            on_progress=on_progress,
        )
        self.seconds["tiles"] = time.perf_counter() - t0
        try:
            self.writer.finalize(order=[t.id for t in self.grid.tiles])
        except OSError as exc:
            raise UserError(f"{self.writer.path}: cannot write ({exc.strerror or exc})") from None
        return self.result

    def write_outputs(self, predictor: Predictor) -> dict:
        """tissue_map.png, overlay.png, tiles.geojson and summary.json from the finished tiles.csv.

        Returns:
            The summary (also in summary.json).
        """
        t0 = time.perf_counter()
        try:
            summary = self._write_outputs(predictor, t0)
        except OSError as exc:
            raise UserError(f"{self.out}: cannot write the outputs ({exc.strerror or exc})") from None
        return summary

    def _write_outputs(self, predictor: Predictor, t0: float) -> dict:
        classes = self.bundle.classes
        g, slide = self.grid, self.slide
        grid = np.full((g.rows, g.cols), -1, dtype=np.int32)
        tiles = np.zeros(len(classes), dtype=np.int64)
        area = np.zeros(len(classes), dtype=np.float64)
        cell_mm2 = (g.stride_x0 * slide.mpp_x) * (g.stride_y0 * slide.mpp_y) / 1e6
        by_id = {t.id: t for t in g.tiles}
        index = {name: i for i, name in enumerate(classes)}
        with open(self.out / OUTPUTS["tiles"], newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader)
            for row in reader:
                tile, k = by_id[f"{row[0]},{row[1]}"], index[row[5]]
                grid[tile.row, tile.col] = k
                tiles[k] += 1
                area[k] += cell_mm2 * float(row[4])  # tissue area: the tile's grid cell x its tissue fraction
        total = float(area.sum())
        per_class = {
            name: {
                "tiles": int(tiles[i]),
                "area_mm2": float(area[i]),
                "area_fraction": float(area[i] / total) if total else 0.0,
                "colour": list(class_colour(i)),
            }
            for i, name in enumerate(classes)
        }
        tsr = tumour_stroma(per_class)
        self._write_geojson(index)
        with atomic_path(self.out / OUTPUTS["map"]) as tmp:
            render_map(grid, classes, per_class, tsr, g.stride_um, slide.path.name).save(tmp, format="PNG")
        with atomic_path(self.out / OUTPUTS["overlay"]) as tmp:
            render_overlay(slide, g, grid).save(tmp, format="PNG")
        self.seconds["outputs"] = time.perf_counter() - t0
        run = folder_run_report(self.result, predictor)
        run["kind"] = "crc-infer slide"
        summary = {
            "kind": "crc-infer slide",
            "slide": slide.describe(),
            "radiology": {
                "path": str(self.radiology_path) if self.radiology_path else None,
                "pairing": "patient-level: this one radiology image is paired with every tile",
            },
            "bundle": {"path": str(self.bundle.path), "classes": classes},
            "tiles": g.describe(slide),
            "tissue": {
                **self.tissue.describe(slide.mpp_x),
                "min_tissue_fraction": g.min_tissue,
                "grid_tiles": g.positions,
                "tissue_tiles": len(g.tiles),
                "glass_tiles_skipped": g.positions - len(g.tiles),
            },
            "classes": per_class,
            "tissue_area_mm2": total,
            "tumour_stroma_ratio": tsr,
            "run": run,
            "seconds": self.seconds,
            "outputs": {key: name for key, name in OUTPUTS.items()},
        }
        write_report(self.out / OUTPUTS["summary"], summary)
        return summary

    def _write_geojson(self, index: dict[str, int]) -> None:
        """One QuPath detection per tile, streamed from tiles.csv (GeoJSON FeatureCollection, level-0 px)."""
        namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"crc-infer:{self.slide.quickhash or self.slide.path}")
        with atomic_path(self.out / OUTPUTS["geojson"]) as tmp, open(tmp, "w", encoding="utf-8") as out:
            with open(self.out / OUTPUTS["tiles"], newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = next(reader)
                out.write('{"type": "FeatureCollection", "features": [\n')
                for n, row in enumerate(reader):
                    x, y, w, h = (int(v) for v in row[:4])
                    feature = {
                        "type": "Feature",
                        "id": str(uuid.uuid5(namespace, f"{x},{y}")),  # the same tile gets the same id
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]],
                        },
                        "properties": {
                            "objectType": "detection",
                            "classification": {"name": row[5], "color": list(class_colour(index[row[5]]))},
                            "measurements": {
                                "tissue": float(row[4]),
                                **{name: float(v) for name, v in zip(header[6:], row[6:], strict=True)},
                            },
                        },
                    }
                    out.write(("," if n else "") + json.dumps(feature) + "\n")
                out.write("]}\n")

    def close(self) -> None:
        self.slide.close()


def tumour_stroma(per_class: dict) -> dict:
    """The tumour-stroma ratio: stroma area / (tumour + stroma area), or null with the reason."""
    result = {
        "definition": f"area({STROMA_CLASS}) / (area({TUMOUR_CLASS}) + area({STROMA_CLASS})), whole slide",
        "tumour_class": TUMOUR_CLASS,
        "stroma_class": STROMA_CLASS,
        "value": None,
    }
    if TUMOUR_CLASS not in per_class or STROMA_CLASS not in per_class:
        return {**result, "why_null": "the bundle's classes do not include both"}
    tumour, stroma = per_class[TUMOUR_CLASS]["area_mm2"], per_class[STROMA_CLASS]["area_mm2"]
    result.update(tumour_mm2=tumour, stroma_mm2=stroma)
    if tumour + stroma == 0:
        return {**result, "why_null": "no tile was classified as tumour or stroma"}
    return {**result, "value": stroma / (tumour + stroma)}


# --- pictures ---------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def render_map(
    grid: np.ndarray, classes: list[str], per_class: dict, tsr: dict, cell_um: float, title: str
) -> Image.Image:
    """The tissue map: one cell per tile in its class colour (white: no tissue), a legend and a scale bar."""
    rows, cols = grid.shape
    k = max(1, min(32, MAP_SIDE // max(rows, cols, 1)))
    colours = np.array([NO_TISSUE, *(class_colour(i) for i in range(len(classes)))], dtype=np.uint8)
    cells = Image.fromarray(colours[grid + 1]).resize((cols * k, rows * k), Image.Resampling.NEAREST)
    font, small = _font(16), _font(13)
    pad, line, swatch = 16, 22, 14
    lines = [
        (f"{name}: {c['tiles']} tiles, {c['area_mm2']:.2f} mm2 ({c['area_fraction']:.0%})", class_colour(i))
        for i, (name, c) in enumerate(per_class.items())
    ]
    lines.append(("no tissue (not classified)", NO_TISSUE))
    legend_w = 16 + max(int(small.getlength(text)) for text, _ in lines) + swatch + 2 * pad
    legend_h = (len(lines) + 4) * line
    scale_px = 1000 / cell_um * k  # one millimetre
    width = pad + cells.width + legend_w
    height = pad + max(cells.height + 3 * line, legend_h) + pad
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), f"tissue map: {title}", fill=(0, 0, 0), font=font)
    top = pad + line + 4
    img.paste(cells, (pad, top))
    draw.rectangle((pad - 1, top - 1, pad + cells.width, top + cells.height), outline=(160, 160, 160))
    bar_y = top + cells.height + line // 2
    bar = scale_px if scale_px <= cells.width else scale_px / 10
    label = "1 mm" if scale_px <= cells.width else "100 um"  # ASCII: Pillow's built-in font has no µ
    draw.rectangle((pad, bar_y, pad + max(1, round(bar)), bar_y + 4), fill=(0, 0, 0))
    draw.text((pad + round(bar) + 6, bar_y - 6), label, fill=(0, 0, 0), font=small)
    x0 = pad + cells.width + pad
    y = top
    for text, colour in lines:
        draw.rectangle((x0, y + 2, x0 + swatch, y + 2 + swatch), fill=colour, outline=(120, 120, 120))
        draw.text((x0 + swatch + 8, y), text, fill=(0, 0, 0), font=small)
        y += line
    value = tsr.get("value")
    text = "tumour-stroma ratio: n/a" if value is None else f"tumour-stroma ratio (stroma share): {value:.2f}"
    draw.text((x0, y + line // 2), text, fill=(0, 0, 0), font=small)
    return img


def render_overlay(slide: Slide, grid: TileGrid, classes: np.ndarray) -> Image.Image:
    """The class map over the slide, at most :data:`OVERLAY_MAX_SIDE` pixels across (each tile's grid cell,
    centred on the tile, in its class colour; glass left as it is)."""
    bw, bh = slide.bounds[2:]
    px = max(1.0, max(bw, bh) / OVERLAY_MAX_SIDE)  # level-0 pixels per overlay pixel
    thumb = Image.fromarray(read_thumbnail(slide, px, max(1, round(bw / px)), max(1, round(bh / px)))[0])
    if grid.rows == 0 or grid.cols == 0:
        return thumb
    colours = np.array(
        [(0, 0, 0, 0), *((*class_colour(i), OVERLAY_ALPHA) for i in range(int(classes.max()) + 1))],
        dtype=np.uint8,
    )
    size = (max(1, round(grid.cols * grid.stride_x0 / px)), max(1, round(grid.rows * grid.stride_y0 / px)))
    layer = Image.fromarray(colours[classes + 1], "RGBA").resize(size, Image.Resampling.NEAREST)
    canvas = Image.new("RGBA", thumb.size, (0, 0, 0, 0))
    # Cells are centred on their tiles (they are the tiles when the stride is the tile size).
    canvas.paste(
        layer,
        (round((grid.tile_w0 - grid.stride_x0) / 2 / px), round((grid.tile_h0 - grid.stride_y0) / 2 / px)),
    )
    return Image.alpha_composite(thumb.convert("RGBA"), canvas).convert("RGB")
