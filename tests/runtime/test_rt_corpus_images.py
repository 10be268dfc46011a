"""Bad-input corpus, images: every oddity is converted by a stated rule or refused with one line.

The corpus is generated here (no binary fixtures). Each case runs for both modalities (RGB pathology,
L radiology); one end-to-end run puts them all in one folder and checks the summary and exit code.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.cli import cli
from crc_runtime.errors import ImageError
from crc_runtime.images import MAX_PIXELS, MIN_SIDE, load_image
from PIL import Image, features

S = 8  # the tiny bundle's input size (conftest.SIZE)
RNG = np.random.default_rng(6)
RGB8 = RNG.integers(0, 256, size=(S, S, 3), dtype=np.uint8)
GRAY8 = RNG.integers(0, 256, size=(S, S), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, size=(S, S), dtype=np.uint16)
ALPHA = (RNG.integers(0, 2, size=(S, S)) * 255).astype(np.uint8)  # 0 or 255: compositing is exact


def _save(array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, one tiny IDAT, IEND: a bomb's header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 9))
        + chunk(b"IEND", b"")
    )


def _multi(fmt: str) -> bytes:
    frames = [Image.fromarray(RGB8), Image.fromarray(255 - RGB8)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _exif_rotated() -> bytes:
    """A 16x8 PNG whose EXIF says orientation 6: display rotated 90 degrees clockwise."""
    img = Image.fromarray(np.concatenate([RGB8, 255 - RGB8], axis=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    return buf.getvalue()


def _palette(transparent: bool) -> bytes:
    img = Image.fromarray(RGB8).quantize(16)
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": 0} if transparent else {}))
    return buf.getvalue()


def _expect_rgb(rgb: np.ndarray) -> Callable[[str], np.ndarray]:
    """Expected output of an RGB source: itself (RGB) or Pillow's ITU-R 601-2 luma (L), resized."""

    def expect(mode: str) -> np.ndarray:
        img = Image.fromarray(rgb).convert(mode)
        if img.size != (S, S):
            img = img.resize((S, S), Image.Resampling.BILINEAR)
        out = np.asarray(img)
        return out if out.ndim == 3 else out[:, :, None]

    return expect


def _expect_gray(gray: np.ndarray) -> Callable[[str], np.ndarray]:
    def expect(mode: str) -> np.ndarray:
        return np.repeat(gray[:, :, None], 3 if mode == "RGB" else 1, axis=2)

    return expect


def _composite(mode: str) -> np.ndarray:
    background = 255 if mode == "RGB" else 0  # white glass for pathology, black air for radiology
    rgb = np.where(ALPHA[:, :, None] == 255, RGB8, background).astype(np.uint8)
    return _expect_rgb(rgb)(mode)


@dataclass(frozen=True)
class Case:
    """One corpus file: its name, how to make it, and either the refusal kind or the expected pixels."""

    name: str
    build: Callable[[Path], None]
    kind: str | None = None
    expect: Callable[[str], np.ndarray] | None = None


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _cut(data: bytes, size: int) -> Callable[[Path], None]:
    return _bytes(data[:size])


def _mkdir(path: Path) -> None:
    path.mkdir()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


PNG = _save(RGB8, "PNG")
JPEG = _save(RGB8, "JPEG", quality=95)
TIFF = _save(RGB8, "TIFF")
DAMAGED = "truncated or corrupt"
EPS = _save(RGB8, "EPS")  # a real PostScript file: "%!PS-Adobe-3.0 EPSF-3.0", then the image as hex
# DOS EPS: a binary header pointing at the PostScript section; Pillow reads it the same way.
DOS_EPS = struct.pack("<4s6IH", b"\xc5\xd0\xd3\xc6", 30, len(EPS), 0, 0, 0, 0, 0xFFFF) + EPS
# Formats Pillow decodes but the README does not list: refused as "not an image", whatever the name.
_CODEC = {"JPEG2000": "jpg_2000", "AVIF": "avif"}  # formats whose writer needs an optional codec
OTHER_FORMATS = [
    fmt
    for fmt in ("ICO", "PCX", "TGA", "PPM", "JPEG2000", "AVIF", "SGI", "QOI", "DDS")
    if fmt not in _CODEC or features.check(_CODEC[fmt])
]

CASES = [
    # refused
    *(Case(f"zero_byte.{ext}", _bytes(b""), "empty file") for ext in ("png", "jpg", "tif")),
    Case("text.png", _bytes(b"id,pathology\nthis is text, not a PNG\n"), "not an image"),
    Case("postscript.png", _bytes(EPS), "not an image"),  # never handed to Ghostscript
    Case("postscript.jpg", _bytes(EPS), "not an image"),
    Case("dos_eps.tif", _bytes(DOS_EPS), "not an image"),
    *(
        Case(f"{fmt.lower()}_as.{ext}", _bytes(_save(RGB8, fmt)), "not an image")
        for fmt in OTHER_FORMATS
        for ext in ("png", "jpg")
    ),
    Case("html.jpg", _bytes(b"<html><body>404 Not Found</body></html>"), "not an image"),
    *(Case(f"trunc_{n}B.png", _cut(PNG, n), DAMAGED) for n in (4, 20, 40, len(PNG) // 2, len(PNG) - 30)),
    *(Case(f"trunc_{n}B.jpg", _cut(JPEG, n), DAMAGED) for n in (4, 20, 200, len(JPEG) // 2, len(JPEG) - 2)),
    *(Case(f"trunc_{n}B.tif", _cut(TIFF, n), DAMAGED) for n in (4, 20, 100, len(TIFF) // 2, len(TIFF) - 1)),
    Case("bad_crc.png", _bytes(PNG[:40] + bytes([PNG[40] ^ 0xFF]) + PNG[41:]), DAMAGED),
    Case("bomb_100k.png", _bytes(_png_header_only(100_000, 100_000)), "too large"),
    Case("bomb_9k.png", _bytes(_png_header_only(9000, 9000)), "too large"),  # under Pillow's own limit
    Case("one_pixel.png", _bytes(_save(RGB8[:1, :1], "PNG")), "too small"),
    Case("thin.png", _bytes(_save(np.zeros((100, MIN_SIDE - 1, 3), np.uint8), "PNG")), "too small"),
    Case("multi_frame.tif", _bytes(_multi("TIFF")), "multi-frame"),
    Case("animated.gif", _bytes(_multi("GIF")), "multi-frame"),
    Case("float32.tif", _bytes(_save(RNG.random((S, S), dtype=np.float32), "TIFF")), "unsupported mode"),
    Case("int32_big.tif", _bytes(_save(np.full((S, S), 70_000, np.int32), "TIFF", "I")), "unsupported mode"),
    Case("folder.png", _mkdir, "not a file"),
    Case("fifo.png", _fifo, "not a file"),
    # converted
    Case("ok.png", _bytes(PNG), expect=_expect_rgb(RGB8)),
    Case("ok.tif", _bytes(TIFF), expect=_expect_rgb(RGB8)),
    Case("ok.bmp", _bytes(_save(RGB8, "BMP")), expect=_expect_rgb(RGB8)),
    Case("ok.webp", _bytes(_save(RGB8, "WEBP", lossless=True)), expect=_expect_rgb(RGB8)),
    Case("gray16.png", _bytes(_save(GRAY16, "PNG")), expect=_expect_gray((GRAY16 >> 8).astype(np.uint8))),
    Case(
        "int32_small.tif",
        _bytes(_save(GRAY16.astype(np.int32), "TIFF", "I")),
        expect=_expect_gray((GRAY16 >> 8).astype(np.uint8)),
    ),
    Case("rgba.png", _bytes(_save(np.dstack([RGB8, ALPHA]), "PNG")), expect=_composite),
    Case("gray_alpha.png", _bytes(_save(np.dstack([GRAY8, ALPHA]), "PNG", "LA")), expect=None),
    Case("palette.png", _bytes(_palette(False)), expect=None),
    Case("palette_transparent.png", _bytes(_palette(True)), expect=None),
    Case(
        "bilevel.png", _bytes(_save(GRAY8 > 127, "PNG")), expect=_expect_gray(np.where(GRAY8 > 127, 255, 0))
    ),
    Case("gray.png", _bytes(_save(GRAY8, "PNG")), expect=_expect_gray(GRAY8)),  # gray pathology
    Case("rgb.png", _bytes(PNG), expect=_expect_rgb(RGB8)),  # RGB radiology: luma
    Case(
        "wide.png",
        _bytes(_save(np.tile(RGB8, (1, 3, 1)), "PNG")),
        expect=_expect_rgb(np.tile(RGB8, (1, 3, 1))),
    ),
    Case("big.png", _bytes(_save(np.kron(RGB8, np.ones((28, 28, 1), np.uint8)), "PNG")), expect=None),
    Case("exif_rotated.png", _bytes(_exif_rotated()), expect=None),
    Case("cmyk.jpg", lambda p: Image.new("CMYK", (S, S), (255, 0, 0, 0)).save(p, "JPEG"), expect=None),
    Case("ok.jpg", _bytes(JPEG), expect=None),
    Case("trailing_junk.png", _bytes(PNG + b"\0junk after IEND"), expect=_expect_rgb(RGB8)),
    # Cut after the last pixel byte (zlib checksum, IEND missing): every pixel is there, so it is used.
    Case("cut_after_pixels.png", _bytes(PNG[:-16]), expect=_expect_rgb(RGB8)),
]
MODES = ("RGB", "L")


def test_the_corpus_is_big_enough():
    assert len(CASES) * len(MODES) >= 100, len(CASES) * len(MODES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for case in CASES:
        case.build(folder / case.name)
    return folder


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(corpus, case, mode):
    path = corpus / case.name
    if case.kind is not None:
        with pytest.raises(ImageError) as info:
            load_image(path, mode, S)
        message = str(info.value)
        assert info.value.kind == case.kind, message
        assert message.startswith(f"{path}: ") and "\n" not in message
        return
    out = load_image(path, mode, S)
    assert out.dtype == np.uint8 and out.shape == (S, S, 3 if mode == "RGB" else 1)
    if case.expect is not None:
        np.testing.assert_array_equal(out, case.expect(mode))


@pytest.mark.parametrize("name", ["postscript.png", "postscript.jpg", "dos_eps.tif"])
def test_postscript_never_reaches_ghostscript(corpus, monkeypatch, name):
    """Pillow decodes EPS by running Ghostscript (``gs -dSAFER ... -f FILE``): never for crc-infer."""
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    opened = []
    real_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(
        EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1) or real_open(self)
    )
    with pytest.raises(ImageError) as info:
        load_image(corpus / name, "RGB", S)
    assert info.value.kind == "not an image" and "not PNG, JPEG, TIFF, BMP, GIF or WebP" in str(info.value)
    assert calls == [] and opened == []  # the EPS reader is not even tried


def test_exif_rotation_is_applied(corpus):
    """Orientation 6 on a 16 (wide) x 8 (high) image gives what rotating 90 degrees clockwise gives."""
    stored = np.asarray(Image.open(corpus / "exif_rotated.png").convert("RGB"))
    rotated = np.ascontiguousarray(np.rot90(stored, k=-1))
    expected = np.asarray(Image.fromarray(rotated).resize((S, S), Image.Resampling.BILINEAR))
    unrotated = np.asarray(Image.fromarray(stored).resize((S, S), Image.Resampling.BILINEAR))
    out = load_image(corpus / "exif_rotated.png", "RGB", S)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, unrotated)


def test_alpha_palette_and_cmyk_rules(corpus):
    la = load_image(corpus / "gray_alpha.png", "RGB", S)[:, :, 0]
    np.testing.assert_array_equal(la, np.where(ALPHA == 255, GRAY8, 255))  # over white
    la = load_image(corpus / "gray_alpha.png", "L", S)[:, :, 0]
    np.testing.assert_array_equal(la, np.where(ALPHA == 255, GRAY8, 0))  # over black
    pal = Image.open(corpus / "palette.png")
    np.testing.assert_array_equal(
        load_image(corpus / "palette.png", "RGB", S), np.asarray(pal.convert("RGB"))
    )
    transparent = load_image(corpus / "palette_transparent.png", "RGB", S)
    index0 = np.asarray(Image.open(corpus / "palette_transparent.png")) == 0
    assert index0.any() and (transparent[index0] == 255).all()
    cyan = load_image(corpus / "cmyk.jpg", "RGB", S).reshape(-1, 3).mean(axis=0)
    assert abs(cyan[0] - 0) < 12 and abs(cyan[1] - 255) < 12 and abs(cyan[2] - 255) < 12


def test_pixel_limit_is_a_parameter(corpus):
    with pytest.raises(ImageError, match="over the limit of 63") as info:
        load_image(corpus / "ok.png", "RGB", S, max_pixels=63)
    assert info.value.kind == "too large"
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS  # ours is checked first, so Pillow never warns


@pytest.mark.parametrize("mode", MODES)
def test_unreadable_file(mode, as_nobody, open_dir):
    # Root reads a chmod-000 file anyway, so the test drops to user nobody.
    path = open_dir / "locked.png"
    path.write_bytes(PNG)
    path.chmod(0o000)
    with as_nobody(), pytest.raises(ImageError) as info:
        load_image(path, mode, S)
    assert info.value.kind == "unreadable" and "permission denied" in str(info.value)


def test_end_to_end_corpus_run(tiny, tmp_path):
    """All the image oddities as pairs in one folder: one line per bad file, the rest predicted, exit 3."""
    folder = tmp_path / "in"
    for modality in ("pathology", "radiology"):
        (folder / modality).mkdir(parents=True)
    good = {"pathology": PNG, "radiology": _save(GRAY8, "PNG")}
    for i, case in enumerate(CASES):
        for modality, partner in (("pathology", "radiology"), ("radiology", "pathology")):
            stem = f"{modality[:3]}{i:02d}_{Path(case.name).stem}"
            case.build(folder / modality / f"{stem}{Path(case.name).suffix}")
            (folder / partner / f"{stem}.png").write_bytes(good[partner])
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(cli, [str(folder), "--bundle", str(tiny.bundle), "--output", str(out)])
    assert result.exit_code == 3, result.output
    refused = [c for c in CASES if c.kind is not None]
    converted = len(CASES) - len(refused)
    # A folder or FIFO is left out when the folder is listed, so its partner is also reported, alone.
    kinds = Counter(c.kind for c in refused for _ in range(2))
    kinds["missing partner"] = 2 * sum(c.kind == "not a file" for c in refused)
    skipped = sum(kinds.values())
    assert f"pairs: {2 * converted} processed, {skipped} skipped" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("  skipped ")]
    assert len(lines) == skipped
    for case in refused:
        for modality in ("pathology", "radiology"):
            name = f"{modality[:3]}{CASES.index(case):02d}_{case.name}"
            assert sum(f"/{modality}/{name}" in line for line in lines) == 1, name
    summary = next(line for line in result.output.splitlines() if line.startswith("skipped by reason: "))
    for kind, count in kinds.items():
        assert f"{kind} {count}" in summary
    with open(out, newline="") as fh:
        ids = [row[0] for row in csv.reader(fh)][1:]
    assert len(ids) == 2 * converted and ids == sorted(ids)
