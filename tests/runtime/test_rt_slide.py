"""crc-infer slide on real pyramidal TIFF slides built here: a mosaic of the example tiles on blank glass.

The 18 pathology tiles of examples/pairs/ are upscaled to 224 px and laid at known grid positions of an
8 x 6 mosaic of 224-px cells; the rest is glass. Written with tifffile as tiled pyramidal TIFFs whose
resolution tags carry the pixel size (OpenSlide reads them as openslide.mpp-x/y). Each tile position must
get exactly the prediction ``crc-infer FOLDER`` gives the same 224-px tile saved as a file.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.cli import cli
from PIL import Image

openslide = pytest.importorskip("openslide", reason="pip install 'crc-fusion[slides]'")
tifffile = pytest.importorskip("tifffile", reason="pip install 'crc-fusion[test]'")

from crc_runtime import slide as slide_mod  # noqa: E402 (after the skips: it needs nothing of them, but
from crc_runtime.slide import (  # noqa: E402  its tests do)
    Slide,
    fill_holes,
    otsu_threshold,
    plan_tiles,
    read_level,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "pairs"
sys.path.insert(0, str(ROOT / "examples"))
import make_slide  # noqa: E402 (examples/make_slide.py: the mosaic and its TIFF writer)

CELL = 224
COLS, ROWS = make_slide.COLS, make_slide.ROWS


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


class Mosaic:
    """The 18 example tiles at 224 px, their grid cells, the mosaic image and the folder-run predictions."""

    def __init__(self, root: Path, tiny) -> None:
        self.root = root
        self.image, self.cells, tiles = make_slide.demo_mosaic(CELL)
        assert len(self.cells) == 18 and {r for r, _ in self.cells.values()} == {1, 2, 3}
        self.radiology = make_slide.RADIOLOGY
        self.folder = make_slide.save_tiles(root / "tiles", tiles)
        out = root / "folder-predictions.csv"
        result = _run(self.folder, "--bundle", tiny.bundle, "--device", "cpu", "--output", out)
        assert result.exit_code == 0, result.output
        rows = _read_csv(out)
        # name -> (predicted, probabilities as written, 6 decimals)
        self.expected = {row[0]: (row[1], row[2 : 2 + len(tiny.classes)]) for row in rows[1:]}


@pytest.fixture(scope="session")
def mosaic(tiny, tmp_path_factory) -> Mosaic:
    return Mosaic(tmp_path_factory.mktemp("mosaic"), tiny)


@pytest.fixture(scope="session")
def slides(mosaic) -> dict[str, Path]:
    """The mosaic as slides: at 0.5 um/px (levels 1, 2, 4x), at 0.25 um/px (level 1 is the mosaic itself),
    without a pixel size, zlib-compressed, and the same with one tissue tile's data destroyed."""
    root, write, levels = mosaic.root, make_slide.write_slide, make_slide.pyramid(mosaic.image)
    big = np.repeat(np.repeat(mosaic.image, 2, axis=0), 2, axis=1)  # 0.25 um/px: every pixel doubled
    out = {
        "0.5": write(root / "mosaic-0.5.tif", levels, 0.5),
        "0.25": write(root / "mosaic-0.25.tif", [big, *levels], 0.25),
        "no-mpp": write(root / "mosaic-nompp.tif", levels, None),
        "zlib": write(root / "mosaic-zlib.tif", levels, 0.5, compression="zlib"),
    }
    with tifffile.TiffFile(out["zlib"]) as tif:
        page = tif.pages[0]
        # The level-0 TIFF tile under mosaic cell (2, 3): tissue, so the run reads it.
        side = page.tilewidth
        index = (2 * CELL // side) * (-(-COLS * CELL // side)) + (3 * CELL // side)
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    damaged = bytearray(out["zlib"].read_bytes())
    damaged[offset : offset + count] = b"\0" * count
    out["damaged"] = root / "mosaic-damaged.tif"
    out["damaged"].write_bytes(bytes(damaged))
    return out


def _slide_run(tiny, mosaic, slide: Path, out: Path, *extra):
    return _run(
        "slide", slide, "--radiology", mosaic.radiology, "--bundle", tiny.bundle, "-o", out,
        "--device", "cpu", "--threads", "1", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("which, scale", [("0.5", 1), ("0.25", 2)])
def test_each_tile_gets_the_prediction_of_the_same_tile_as_a_file(
    tiny, mosaic, slides, tmp_path, which, scale
):
    out = tmp_path / "out"
    result = _slide_run(tiny, mosaic, slides[which], out, "--batch-size", 5)
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "tiles.csv")
    assert rows[0][:6] == ["x", "y", "width", "height", "tissue", "predicted"]
    assert rows[0][6:] == [f"prob_{c.replace(' ', '_').replace('-', '_')}" for c in tiny.classes]
    at = {(int(r[0]), int(r[1])): r for r in rows[1:]}
    # Exactly the 18 tissue cells were classified: every glass cell was skipped.
    assert sorted(at) == sorted((c * CELL * scale, r * CELL * scale) for r, c in mosaic.cells.values())
    for name, (r, c) in mosaic.cells.items():
        row = at[(c * CELL * scale, r * CELL * scale)]
        assert row[2:4] == [str(CELL * scale)] * 2
        assert (row[5], row[6:]) == mosaic.expected[name], name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"]["read_level"] == (0 if scale == 1 else 1)  # the level at 0.5 um/px
    assert summary["tiles"]["resample"] == "none (already 224 px)"
    assert summary["tissue"]["glass_tiles_skipped"] == COLS * ROWS - 18
    assert "tiles classified: 18" in result.output and "tiles/s end-to-end" in result.output


def test_outputs(tiny, mosaic, slides, tmp_path):
    out = tmp_path / "out"
    result = _slide_run(tiny, mosaic, slides["0.5"], out)
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "tiles.csv")[1:]
    summary = json.loads((out / "summary.json").read_text())
    counts = {c: sum(r[5] == c for r in rows) for c in tiny.classes}
    tile_mm2 = (0.112 * 0.112) * np.array([float(r[4]) for r in rows])
    assert {c: v["tiles"] for c, v in summary["classes"].items()} == counts
    assert summary["tissue_area_mm2"] == pytest.approx(tile_mm2.sum())
    for c, v in summary["classes"].items():
        assert v["area_mm2"] == pytest.approx(
            sum(a for a, r in zip(tile_mm2, rows, strict=True) if r[5] == c)
        )
    tsr = summary["tumour_stroma_ratio"]
    tumour = summary["classes"][slide_mod.TUMOUR_CLASS]["area_mm2"]
    stroma = summary["classes"][slide_mod.STROMA_CLASS]["area_mm2"]
    expected = stroma / (tumour + stroma) if tumour + stroma else None
    assert tsr["value"] == (pytest.approx(expected) if expected is not None else None)
    assert (
        summary["slide"]["mpp_x"] == pytest.approx(0.5)
        and summary["slide"]["mpp_source"] == "openslide.mpp-x/y"
    )
    run = summary["run"]
    assert run["backend"]["name"] == "ort-cpu" and run["pairs"]["processed"] == 18
    assert {"end_to_end_pairs_per_s", "engine_only_pairs_per_s"} <= set(run["throughput"])
    assert run["latency"]["per_batch"]["count"] == 0  # one batch of 64: the warm-up, not timed

    # GeoJSON as QuPath imports it: a FeatureCollection of classified detections in level-0 pixels.
    geo = json.loads((out / "tiles.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 18
    for feature, row in zip(geo["features"], rows, strict=True):
        x, y, w, h = (int(v) for v in row[:4])
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert feature["geometry"]["coordinates"] == [
            [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        ]
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == row[5]
        colour = props["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
        assert [
            props["measurements"][f"prob_{c.replace(' ', '_').replace('-', '_')}"] for c in tiny.classes
        ] == [float(v) for v in row[6:]]
    again = tmp_path / "again"
    assert _slide_run(tiny, mosaic, slides["0.5"], again, "--quiet").exit_code == 0
    assert (again / "tiles.geojson").read_bytes() == (out / "tiles.geojson").read_bytes()  # stable ids

    with Image.open(out / "tissue_mask.png") as mask:
        # 16 mask pixels per tile: the 3 x 6 block of tissue is 48 x 96 pixels of a 96 x 128 mask.
        assert mask.size == (COLS * 16, ROWS * 16)
        m = np.asarray(mask) > 0
    assert m[16:64, 16:112].mean() > 0.9 and m[:16].sum() == 0 and m[64:].sum() == 0
    with Image.open(out / "tissue_map.png") as img:
        assert img.mode == "RGB" and img.width > 300
        pixels = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
    for i, name in enumerate(tiny.classes):
        if counts[name]:
            assert slide_mod.class_colour(i) in pixels
    with Image.open(out / "overlay.png") as img:
        assert img.size == (COLS * CELL, ROWS * CELL)  # the slide is smaller than 2048 px: at full size
        overlay = np.asarray(img)
    assert (overlay[:CELL, :] == mosaic.image[:CELL, :]).all()  # glass row: the slide itself
    assert not list(out.glob("*.partial*")) and not list(out.glob(".*tmp*"))


def test_overlapping_tiles_with_stride(tiny, mosaic, slides, tmp_path):
    out = tmp_path / "out"
    result = _slide_run(tiny, mosaic, slides["0.5"], out, "--stride", 56)
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "tiles.csv")[1:]
    xy = {(int(r[0]), int(r[1])) for r in rows}
    assert all(x % 112 == 0 and y % 112 == 0 for x, y in xy)  # 56 um = 112 px apart
    for name, (r, c) in mosaic.cells.items():  # the tiles that fall exactly on a mosaic cell
        row = next(row for row in rows if (int(row[0]), int(row[1])) == (c * CELL, r * CELL))
        assert (row[5], row[6:]) == mosaic.expected[name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"]["grid"] == {"cols": 15, "rows": 11, "origin": [0, 0]}


def test_mpp_missing_is_refused_unless_given(tiny, mosaic, slides, tmp_path):
    result = _slide_run(tiny, mosaic, slides["no-mpp"], tmp_path / "a")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "no pixel size" in result.output and "--mpp" in result.output
    result = _slide_run(tiny, mosaic, slides["no-mpp"], tmp_path / "b", "--mpp", "0.5")
    assert result.exit_code == 0, result.output
    assert "from --mpp" in result.output and len(_read_csv(tmp_path / "b" / "tiles.csv")) == 19


def test_coarser_than_half_a_micron_is_refused(tiny, mosaic, slides, tmp_path):
    result = _slide_run(tiny, mosaic, slides["no-mpp"], tmp_path / "a", "--mpp", "1.0")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "coarser than the 0.5 um/px" in result.output


def test_bad_slides_are_one_line_errors(tiny, mosaic, slides, tmp_path):
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(slides["0.5"].read_bytes()[:5000])
    text = tmp_path / "notes.txt"
    text.write_text("not a slide\n")
    png = EXAMPLES / "pathology" / "debris-1.png"
    cases = {
        truncated: "TIFF file OpenSlide cannot open",
        text: "not a slide format OpenSlide reads",
        png: "a PNG image, not a whole-slide file",
        tmp_path / "missing.svs": "file not found",
        slides["damaged"]: "the slide file is damaged",
    }
    for path, why in cases.items():
        result = _slide_run(tiny, mosaic, path, tmp_path / "out")
        assert result.exit_code == 1, (path, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert why in result.output and str(path) in result.output, result.output


def test_blank_glass_has_no_tissue(tiny, mosaic, tmp_path):
    levels = make_slide.pyramid(make_slide.glass(896, 1344))
    blank = make_slide.write_slide(tmp_path / "blank.tif", levels, 0.5)
    result = _slide_run(tiny, mosaic, blank, tmp_path / "out")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "no tile holds 50% tissue (24 tiles on the grid" in result.output
    with Image.open(tmp_path / "out" / "tissue_mask.png") as mask:  # saved for a look all the same
        assert not np.asarray(mask).any()


def test_radiology_is_required_and_checked(tiny, mosaic, slides, tmp_path):
    args = ["slide", slides["0.5"], "--bundle", tiny.bundle, "-o", tmp_path / "out", "--device", "cpu"]
    result = _run(*args)
    assert result.exit_code == 1 and "--radiology IMAGE" in result.output and result.output.count("\n") == 1
    result = _run(*args, "--radiology", tmp_path / "nope.png")
    assert result.exit_code == 1 and "nope.png: file not found" in result.output


def test_without_the_extra_it_names_the_extra(tiny, mosaic, slides, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide now raises ImportError
    result = _slide_run(tiny, mosaic, slides["0.5"], tmp_path / "out")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "pip install 'crc-fusion[slides]'" in result.output


def _many_tiles_args(tiny, mosaic, slides) -> list[str]:
    """Tiles every 16 um: ~1000 of them on the small mosaic; batch 1, so that a stop lands mid-run."""
    args = ["slide", str(slides["0.5"]), "--radiology", str(mosaic.radiology), "--bundle", str(tiny.bundle)]
    args += ["--device", "cpu", "--threads", "1", "--batch-size", "1", "--stride", "16"]
    return [*args, "--min-tissue", "0.25"]


def test_ctrl_c_keeps_the_tiles_and_says_how_to_resume(tiny, mosaic, slides, tmp_path, start_until, ctrl_c):
    args = [*_many_tiles_args(tiny, mosaic, slides), "-o", str(tmp_path / "out")]
    stderr = ctrl_c(proc := start_until(args, tmp_path / "out" / "tiles.csv.partial", 3000, timeout=120))
    assert proc.returncode == 130, stderr
    assert stderr.startswith("interrupted: ") and stderr.count("\n") == 1 and "--resume" in stderr, stderr
    resumed = _run(*args, "--resume")
    assert resumed.exit_code == 0 and "(resumed)" in resumed.output, resumed.output


def test_killed_run_resumes_to_the_same_tiles_csv(tiny, mosaic, slides, tmp_path, start_until, sigkill):
    args = _many_tiles_args(tiny, mosaic, slides)
    killed = tmp_path / "killed"
    partial = killed / "tiles.csv.partial"
    sigkill(start_until([*args, "-o", str(killed)], partial, 3000, timeout=120))
    assert not (killed / "tiles.csv").exists() and not (killed / "summary.json").exists()
    done = len(_read_csv(partial)) - 1

    resumed = _run(*args, "-o", killed, "--resume")
    assert resumed.exit_code == 0, resumed.output
    clean = _run(*args, "-o", tmp_path / "clean")
    assert clean.exit_code == 0, clean.output
    total = len(_read_csv(tmp_path / "clean" / "tiles.csv")) - 1
    assert 0 < done < total and total > 500
    assert f"tiles classified: {total - done}, {done} already in tiles.csv.partial" in resumed.output
    assert (killed / "tiles.csv").read_bytes() == (tmp_path / "clean" / "tiles.csv").read_bytes()
    assert not partial.exists()


# --- the parts ----------------------------------------------------------------------------------------------


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(5, 2, 5000), rng.normal(90, 20, 2000)]).clip(0, 255).astype(np.uint8)
    t = otsu_threshold(values)
    assert 12 < t < 60
    assert otsu_threshold(np.full(100, 7, dtype=np.uint8)) == 0  # one value: nothing to split


def test_fill_holes_fills_enclosed_small_holes_only():
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:35, 5:55] = True
    mask[10:13, 10:13] = False  # 9 px, enclosed: filled
    mask[15:25, 20:30] = False  # 100 px, enclosed but larger than the limit: kept
    mask[20:40, 45:50] = False  # open to the bottom edge: glass, kept
    mask[8:10, 40:42] = False  # 4 px, enclosed: filled
    filled = fill_holes(mask, max_area=50)
    expected = mask.copy()
    expected[10:13, 10:13] = True
    expected[8:10, 40:42] = True
    assert (filled == expected).all()
    assert (fill_holes(mask, max_area=1000) == (expected | _box((40, 60), 15, 25, 20, 30))).all()
    assert (fill_holes(np.ones((4, 4), bool), 10)).all() and not fill_holes(np.zeros((4, 4), bool), 10).any()


def _box(shape, r0, r1, c0, c1):
    out = np.zeros(shape, dtype=bool)
    out[r0:r1, c0:c1] = True
    return out


def _fake_slide(mpp: float, downsamples, size=(100_000, 80_000)) -> Slide:
    return Slide(
        path=Path("fake.svs"), handle=None, width=size[0], height=size[1], mpp_x=mpp, mpp_y=mpp,
        mpp_source="test", vendor="test", bounds=(0, 0, *size),
        level_dimensions=tuple((round(size[0] / d), round(size[1] / d)) for d in downsamples),
        level_downsamples=tuple(downsamples), quickhash=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "mpp, downsamples, level",
    [
        (0.25, (1, 2, 8), 1),  # 40x with a 20x level: read it
        (0.2527, (1, 4, 16), 0),  # Aperio 40x: level 1 is 1.01 um/px, too coarse; resample level 0
        (0.2501, (1, 2.0006, 4), 1),  # an odd-sized level counts as 0.5 um/px (within 1 %)
        (0.5, (1, 4, 16), 0),
        (0.2265, (1, 2, 4), 1),  # Hamamatsu 40x: 0.453 um/px at level 1
    ],
)
def test_read_level_is_the_coarsest_at_half_a_micron_or_finer(mpp, downsamples, level):
    assert read_level(_fake_slide(mpp, downsamples)) == level


def test_plan_tiles_geometry_for_an_aperio_40x_slide():
    slide = _fake_slide(0.2527, (1, 4, 16), size=(4000, 3000))
    tw0 = 112 / 0.2527  # 443.2 level-0 px
    px = tw0 / 16
    mask = np.ones((int(np.ceil(3000 / px)), int(np.ceil(4000 / px))), dtype=bool)
    tissue = slide_mod.TissueMask(mask, px, (0, 0), 0, 0, 12, 12)
    grid = plan_tiles(slide, tissue)
    assert (grid.level, grid.read_w, grid.read_h) == (0, 443, 443)
    assert (grid.cols, grid.rows) == (int((4000 - tw0) // tw0) + 1, int((3000 - tw0) // tw0) + 1)
    assert [t.x for t in grid.tiles[: grid.cols]] == [round(i * tw0) for i in range(grid.cols)]
    assert all(t.tissue == 1.0 for t in grid.tiles) and len(grid.tiles) == grid.positions


def test_thumbnail_in_bands_equals_one_read(slides, monkeypatch):
    slide = slide_mod.open_slide(slides["0.25"])
    try:
        px = 28.0
        w, h = int(np.ceil(slide.width / px)), int(np.ceil(slide.height / px))
        whole, level = slide_mod.read_thumbnail(slide, px, w, h)
        monkeypatch.setattr(slide_mod, "BAND_PIXELS", 1000)  # a few rows per read
        banded, _ = slide_mod.read_thumbnail(slide, px, w, h)
    finally:
        slide.close()
    assert level == 3 and whole.shape == (h, w, 3)  # downsamples 1, 2, 4, 8: the coarsest <= 28
    assert np.abs(whole.astype(int) - banded.astype(int)).max() <= 1


def test_opaque_rgba_takes_the_fast_path_to_the_same_bytes():
    from crc_runtime.images import BACKGROUND, to_mode

    rgba = np.random.default_rng(0).integers(0, 256, size=(40, 30, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    img = Image.fromarray(rgba, "RGBA")
    for mode in ("RGB", "L"):
        composited = Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND[mode]), img).convert("RGB")
        assert np.array_equal(np.asarray(to_mode(img, mode, "x")), np.asarray(composited.convert(mode)))
