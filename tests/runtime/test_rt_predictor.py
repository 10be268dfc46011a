"""The public Python API: ``Predictor(bundle).predict(pathology, radiology)``, torch-free."""

from __future__ import annotations

import numpy as np
import pytest
from crc_runtime import Predictions, Predictor
from crc_runtime.errors import ImageError, UserError
from crc_runtime.images import load_image
from PIL import Image

IDS = [f"case-{i}" for i in range(6)]


def _paths(tiny, pid):
    img = tiny.csv_dir / "img"
    return img / "pathology" / f"{pid}.png", img / "radiology" / f"{pid}.png"


@pytest.fixture(scope="module")
def predictor(tiny):
    with Predictor(tiny.bundle, backend="ort-cpu", batch_size=4, threads=1) as p:
        yield p


def test_paths_give_the_cli_predictions(tiny, predictor):
    pathology, radiology = zip(*(_paths(tiny, pid) for pid in IDS), strict=True)
    result = predictor.predict(list(pathology), list(radiology))
    assert isinstance(result, Predictions) and len(result) == 6
    assert result.predicted == [tiny.expected[pid][0] for pid in IDS]
    assert result.classes == tiny.classes and result.probs.shape == (6, 9)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0)
    assert result.indices.tolist() == [tiny.classes.index(c) for c in result.predicted]
    # The logits are the model's on the CLI's decoded bytes (same decode + resize rules).
    p = np.stack([load_image(path, "RGB", 8) for path in pathology])
    r = np.stack([load_image(path, "L", 8) for path in radiology])
    np.testing.assert_allclose(result.logits, tiny.logits(p, r), rtol=1e-5, atol=1e-4)


def test_pil_images_numpy_arrays_and_batches_agree_with_paths(tiny, predictor):
    path_p, path_r = _paths(tiny, "case-1")  # a 16 x 16 pair: resized to the bundle's 8 x 8
    by_path = predictor.predict(str(path_p), path_r)
    with Image.open(path_p) as pil_p, Image.open(path_r) as pil_r:
        by_pil = predictor.predict(pil_p, pil_r)
        arrays = np.asarray(pil_p.convert("RGB")), np.asarray(pil_r.convert("L"))
    by_array = predictor.predict(*arrays)
    gray_hw1 = predictor.predict(arrays[0], arrays[1][:, :, None])
    for other in (by_pil, by_array, gray_hw1):
        np.testing.assert_array_equal(other.logits, by_path.logits)
    decoded_p = load_image(path_p, "RGB", 8)[None]
    decoded_r = load_image(path_r, "L", 8)[None]
    as_batch = predictor.predict(np.repeat(decoded_p, 5, axis=0), np.repeat(decoded_r, 5, axis=0))
    assert len(as_batch) == 5 and as_batch.predicted == by_path.predicted * 5
    rgb_radiology = predictor.predict(decoded_p[0], np.repeat(decoded_r[0], 3, axis=2))  # gray as RGB
    np.testing.assert_array_equal(rgb_radiology.logits, predictor.predict(decoded_p[0], decoded_r[0]).logits)


def test_batches_are_split_at_batch_size(tiny, predictor, monkeypatch):
    sizes = []
    infer = predictor.backend.infer
    monkeypatch.setattr(predictor.backend, "infer", lambda x: sizes.append(len(x["pathology"])) or infer(x))
    pathology, radiology = zip(*(_paths(tiny, pid) for pid in IDS), strict=True)
    predictor.predict(list(pathology), list(radiology))
    assert sizes == [4, 2]
    empty = predictor.predict([], [])
    assert len(empty) == 0 and empty.probs.shape == (0, 9)


def test_bad_inputs_say_what_is_wrong(tiny, predictor, tmp_path):
    path_p, path_r = _paths(tiny, "case-0")
    with pytest.raises(ValueError, match="as many images"):
        predictor.predict([path_p, path_p], [path_r])
    with pytest.raises(ImageError, match=r"pathology\[0\].*float32"):
        predictor.predict(np.zeros((8, 8, 3), np.float32), path_r)
    with pytest.raises(ImageError, match=r"radiology\[0\].*smaller than|radiology\[0\].*outside"):
        predictor.predict(path_p, np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="pathology"):
        predictor.predict(42, path_r)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="junk.png"):
        predictor.predict(junk, path_r)


def test_metadata_and_closing(tiny):
    with Predictor(tiny.bundle, batch_size=2, device="cpu", threads=1) as predictor:
        backend = predictor.backend
        assert (backend.name, backend.device, backend.precision) == ("ort-cpu", "cpu", "fp32")
        assert backend.version.startswith("onnxruntime") and backend.device_info["name"]
        assert predictor.artifact["file"] == "model.onnx" and "--device cpu" in predictor.reason
        assert predictor.classes == tiny.classes
    assert not backend.active  # the context manager freed the session
    path_p, path_r = _paths(tiny, "case-0")
    with pytest.raises(UserError, match="closed"):
        predictor.predict(path_p, path_r)
    with pytest.raises(UserError, match="batch_size"):
        Predictor(tiny.bundle, batch_size=0)
    with pytest.raises(UserError, match="not a folder"):
        Predictor(tiny.bundle / "missing")
