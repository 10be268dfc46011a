"""Image decoding with the bundle's resize rule, and pair discovery."""

from __future__ import annotations

import numpy as np
import pytest
from crc_runtime.errors import ImageError, PairsError
from crc_runtime.images import load_image
from crc_runtime.pairs import discover_pairs
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_square_image_passes_untouched(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    out = load_image(_png(tmp_path / "a.png", rgb), "RGB", 28)
    assert out.dtype == np.uint8 and out.shape == (28, 28, 3)
    np.testing.assert_array_equal(out, rgb)


def test_resize_matches_pillow_bilinear(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).resize((28, 28), Image.BILINEAR))
    out = load_image(_png(tmp_path / "tile.png", rgb), "RGB", 28)
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=25, deadline=None)
# Sides from 8 up: images.MIN_SIDE refuses smaller ones (tests/runtime/test_rt_corpus_images.py).
@given(h=st.integers(8, 40), w=st.integers(8, 40), size=st.sampled_from([8, 28]), seed=st.integers(0, 99))
def test_grayscale_resize_bit_exact(tmp_path_factory, h, w, size, seed):
    gray = np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)
    path = _png(tmp_path_factory.mktemp("g") / "g.png", gray)
    out = load_image(path, "L", size)
    assert out.shape == (size, size, 1)
    img = Image.fromarray(gray)
    expected = gray if (h, w) == (size, size) else np.asarray(img.resize((size, size), Image.BILINEAR))
    np.testing.assert_array_equal(out[:, :, 0], expected)


def test_mode_conversion_rgba_and_gray(tmp_path):
    rgba = np.full((8, 8, 4), 100, dtype=np.uint8)
    assert load_image(_png(tmp_path / "a.png", rgba), "RGB", 8).shape == (8, 8, 3)
    gray = np.full((8, 8), 7, dtype=np.uint8)
    np.testing.assert_array_equal(load_image(_png(tmp_path / "g.png", gray), "RGB", 8), 7)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_bad_images_name_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a truncated PNG
        _png(path, np.zeros((64, 64, 3), dtype=np.uint8) + 3)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageError) as exc:
        load_image(path, "RGB", 8)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_pairs_from_csv(tiny):
    found = discover_pairs(tiny.csv_dir)
    assert [p.id for p in found.pairs] == list(tiny.expected)
    assert [p.label for p in found.pairs] == [label for _, label in tiny.expected.values()]
    assert all(p.pathology.is_file() and p.radiology.is_file() for p in found.pairs)
    assert found.skipped == []


def test_pairs_from_folders(tiny):
    found = discover_pairs(tiny.folders_dir)
    assert [p.id for p in found.pairs] == sorted(tiny.expected)
    assert all(p.label is None for p in found.pairs)


def test_missing_partner_skipped(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny.folders_dir, tmp_path / "f")
    (folder / "radiology" / "case-1.png").unlink()
    found = discover_pairs(folder)
    assert "case-1" not in [p.id for p in found.pairs]
    assert len(found.skipped) == 1
    assert "case-1.png" in found.skipped[0].item and "no radiology partner" in found.skipped[0].reason


def test_escaping_path_refused(csv_copy, tmp_path):
    (tmp_path / "outside.png").write_bytes((csv_copy / "img/pathology/case-0.png").read_bytes())
    with open(csv_copy / "pairs.csv", "a") as fh:
        fh.write("evil,../outside.png,img/radiology/case-0.png,adipose\n")
        fh.write("gone,img/pathology/nope.png,img/radiology/case-0.png,\n")
    found = discover_pairs(csv_copy)
    assert "evil" not in [p.id for p in found.pairs] and "gone" not in [p.id for p in found.pairs]
    reasons = {s.item: s.reason for s in found.skipped}
    assert any("escapes" in r and "../outside.png" in r for r in reasons.values())
    assert any("not found" in r for r in reasons.values())


def test_csv_missing_column(tmp_path):
    (tmp_path / "pairs.csv").write_text("id,pathology\na,b.png\n")
    with pytest.raises(PairsError) as exc:
        discover_pairs(tmp_path)
    assert "pairs.csv" in str(exc.value) and "radiology" in str(exc.value)


def test_empty_folder_is_user_error(tmp_path):
    with pytest.raises(PairsError, match="pairs.csv or both pathology/ and radiology/"):
        discover_pairs(tmp_path)
    (tmp_path / "pathology").mkdir()
    (tmp_path / "radiology").mkdir()
    with pytest.raises(PairsError, match="no usable pairs"):
        discover_pairs(tmp_path)
    with pytest.raises(PairsError, match="not a folder"):
        discover_pairs(tmp_path / "nope")
