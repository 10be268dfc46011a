"""The README's explanation picture from a ``crc-infer --explain`` run on examples/pairs (Pillow only).

After ``./scripts/demo.sh`` (its crc-infer step writes demo-out/predictions.csv and demo-out/explain):

    python examples/explain_figure.py demo-out/predictions.csv demo-out/explain docs/img/explain-demo.png

One row per chosen pair: the tissue tile, its pathology overlay, the CT slice, its radiology overlay (each
shown 4x, pixels kept square), and a caption with the true and predicted class and the margin split.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SCALE = 4
GAP = 4
LINE = 13  # caption line height, px
DEFAULT_IDS = (
    "lymphocytes-1",
    "colorectal-adenocarcinoma-epithelium-1",
    "normal-colon-mucosa-1",
    "mucus-1",
)


def _tile(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img = img.convert("RGB")
        return img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST)


def compose(predictions: Path, explain: Path, pairs: Path, ids: list[str]) -> Image.Image:
    """The picture: one row of four panels and a caption per pair id."""
    with open(predictions, newline="") as fh:
        rows = {row["id"]: row for row in csv.DictReader(fh)}
    with open(pairs / "pairs.csv", newline="") as fh:
        sources = {row["id"]: row for row in csv.DictReader(fh)}
    font = ImageFont.load_default()
    panels = []
    for pid in ids:
        src, row = sources[pid], rows[pid]
        images = [
            _tile(pairs / src["pathology"]),
            _tile(explain / f"{pid}.pathology.png"),
            _tile(pairs / src["radiology"]),
            _tile(explain / f"{pid}.radiology.png"),
        ]
        caption = (
            f"{pid}: predicted {row['predicted']}\n"
            f"runner-up {row['runner_up']}\n"
            f"margin {float(row['margin']):.2f} = pathology {float(row['margin_pathology']):+.2f} "
            f"+ radiology {float(row['margin_radiology']):+.2f} + bias {float(row['margin_bias']):+.2f}"
        )
        panels.append((images, caption))
    side = panels[0][0][0].width
    width = 4 * side + 5 * GAP
    caption_height = 3 * LINE + GAP
    height = len(panels) * (side + caption_height + GAP) + GAP + 16
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for x, title in zip(range(4), ("tissue tile", "pathology map", "CT slice", "radiology map"), strict=True):
        draw.text((GAP + x * (side + GAP), 2), title, fill="black", font=font)
    y = 16
    for images, caption in panels:
        for x, img in enumerate(images):
            canvas.paste(img, (GAP + x * (side + GAP), y))
        draw.multiline_text((GAP, y + side + 2), caption, fill="black", font=font, spacing=2)
        y += side + caption_height + GAP
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("predictions", type=Path, help="predictions.csv of a crc-infer --explain run")
    parser.add_argument("explain", type=Path, help="the --explain folder of that run")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument(
        "--pairs", type=Path, default=Path(__file__).parent / "pairs", help="the pairs folder"
    )
    parser.add_argument("--ids", default=",".join(DEFAULT_IDS), help="comma-separated pair ids, one row each")
    args = parser.parse_args()
    compose(args.predictions, args.explain, args.pairs, args.ids.split(",")).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
