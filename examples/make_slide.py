"""A whole-slide image made of the example tiles, for ``crc-infer slide`` (needs tifffile):

    python examples/make_slide.py demo-out/mosaic.tif [--mpp 0.5] [--tiles demo-out/mosaic-tiles]

The 18 pathology tiles of examples/pairs/ (28 px) are upscaled to 112 um (224 px at 0.5 um/px, Pillow
BICUBIC) and laid out as a 3 x 6 block of tissue at grid rows 1-3, columns 1-6 of an 8 x 6 grid of 112-um
cells; the rest is blank glass (near-white with a little noise). Written as a tiled pyramidal TIFF
(downsamples 1, 2, 4) whose resolution tags give the pixel size, which OpenSlide reports as
``openslide.mpp-x`` / ``mpp-y``. ``--tiles FOLDER`` also saves each 224-px tile as a PNG pair
(pathology/ + radiology/, one radiology image for all), the same tiles ``crc-infer FOLDER`` can run.
tests/runtime/test_rt_slide.py and benchmarks/slide.py build their slides with these functions.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

PAIRS = Path(__file__).resolve().parent / "pairs"
COLS, ROWS = 8, 6
GLASS = (242, 242, 239)
RADIOLOGY = PAIRS / "radiology" / "debris-1.png"  # patient-level pairing: one image for every tile


def example_tiles(cell: int) -> dict[str, np.ndarray]:
    """The 18 example pathology tiles, by file stem, upscaled to ``cell`` x ``cell`` RGB."""
    tiles = {}
    for path in sorted((PAIRS / "pathology").glob("*.png")):
        with Image.open(path) as img:
            tiles[path.stem] = np.asarray(img.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC))
    return tiles


def glass(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blank glass: near-white with a little sensor noise."""
    noise = np.random.default_rng(seed).integers(-3, 4, size=(height, width, 3))
    return np.clip(np.array(GLASS) + noise, 0, 255).astype(np.uint8)


def demo_mosaic(cell: int = 224) -> tuple[np.ndarray, dict[str, tuple[int, int]], dict[str, np.ndarray]]:
    """The 8 x 6-cell mosaic, each example tile's (row, column), and the tiles themselves."""
    tiles = example_tiles(cell)
    cells = {name: (1 + i // 6, 1 + i % 6) for i, name in enumerate(tiles)}
    image = glass(ROWS * cell, COLS * cell)
    for name, (r, c) in cells.items():
        image[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = tiles[name]
    return image, cells, tiles


def pyramid(image: np.ndarray, downsamples: tuple[int, ...] = (1, 2, 4)) -> list[np.ndarray]:
    """``image`` reduced by each downsample (Pillow's box-averaging ``reduce``)."""
    return [image if d == 1 else np.asarray(Image.fromarray(image).reduce(d)) for d in downsamples]


def write_slide(
    path: Path, levels: list[np.ndarray], mpp: float | None, compression: str | None = None, tile: int = 256
) -> Path:
    """A tiled pyramidal TIFF (levels as successive pages, ``tile``-px TIFF tiles); level 0 is ``mpp`` um/px
    (None: no resolution tags)."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=levels[0].nbytes > 2**31) as tw:
        for i, level in enumerate(levels):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * levels[0].shape[1] / level.shape[1])
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                level, tile=(tile, tile), photometric="rgb", compression=compression,
                subfiletype=0 if i == 0 else 1, **extra,
            )  # fmt: skip
    return path


def save_tiles(folder: Path, tiles: dict[str, np.ndarray]) -> Path:
    """Each tile as ``folder/pathology/<name>.png``, the one radiology image as ``radiology/<name>.png``."""
    for sub in ("pathology", "radiology"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, tile in tiles.items():
        Image.fromarray(tile).save(folder / "pathology" / f"{name}.png")
        shutil.copy(RADIOLOGY, folder / "radiology" / f"{name}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the slide to write (.tif)")
    ap.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of level 0 (0.5 or finer)")
    ap.add_argument("--tiles", type=Path, default=None, help="also save the 224-px tiles as PNG pairs here")
    args = ap.parse_args()
    image, _, tiles = demo_mosaic(round(112 / args.mpp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_slide(args.out, pyramid(image), args.mpp)
    print(f"{args.out}: {image.shape[1]} x {image.shape[0]} px at {args.mpp} um/px, 18 tissue tiles on glass")
    if args.tiles is not None:
        print(
            f"{save_tiles(args.tiles, example_tiles(224))}: the 18 tiles at 224 px as pathology/ + radiology/"
        )


if __name__ == "__main__":
    main()
