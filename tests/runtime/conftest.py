"""A real tiny bundle built with onnx.helper, plus example pairs; no torch anywhere in tests/runtime.

The model: Cast -> ReduceMean over H, W -> Concat -> MatMul + Add, so its logits are a linear
function of the mean colour of each image and numpy computes the same numbers.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from crc_runtime.bundle import SCHEMA_VERSION, sha256_file, write_manifest
from crc_runtime.images import load_image
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

SIZE = 8
CLASSES = [
    "adipose",
    "background",
    "debris",
    "lymphocytes",
    "mucus",
    "smooth muscle",
    "normal colon mucosa",
    "cancer-associated stroma",
    "colorectal adenocarcinoma epithelium",
]
REFERENCE_PAIRS = 20


@dataclass
class Tiny:
    """The tiny bundle and its example folders, with the numpy twin of the model."""

    bundle: Path
    csv_dir: Path
    folders_dir: Path
    weight: np.ndarray
    bias: np.ndarray
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    expected: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (predicted, label)

    def logits(self, pathology: np.ndarray, radiology: np.ndarray) -> np.ndarray:
        feats = np.concatenate(
            [pathology.astype(np.float32).mean(axis=(1, 2)), radiology.astype(np.float32).mean(axis=(1, 2))],
            axis=1,
        )
        return (feats @ self.weight + self.bias).astype(np.float32)

    @property
    def size(self) -> int:
        """S, the side of the model's inputs."""
        return SIZE

    def cams(self, pathology: np.ndarray, radiology: np.ndarray) -> dict[str, np.ndarray]:
        """The class activation maps of the explain graph (``build_explain_model``), by output name."""
        return {
            "pathology_cam": np.einsum("nhwk,kc->nchw", pathology.astype(np.float32), self.weight[:3]),
            "radiology_cam": np.einsum("nhwk,kc->nchw", radiology.astype(np.float32), self.weight[3:]),
        }


def logit_nodes(logits: str = "logits") -> list:
    """The tiny model's nodes from the uint8 inputs to ``logits`` (``p_f``, ``r_f``: the float inputs)."""
    f32 = TensorProto.FLOAT
    return [
        helper.make_node("Cast", ["pathology"], ["p_f"], to=f32),
        helper.make_node("Cast", ["radiology"], ["r_f"], to=f32),
        helper.make_node("ReduceMean", ["p_f"], ["p_m"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceMean", ["r_f"], ["r_m"], axes=[1, 2], keepdims=0),
        helper.make_node("Concat", ["p_m", "r_m"], ["feat"], axis=1),
        helper.make_node("MatMul", ["feat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], [logits]),
    ]


def build_model(path: Path, weight: np.ndarray, bias: np.ndarray, nan_below: float | None = None) -> None:
    """The tiny ONNX graph: inputs uint8 NHWC with a dynamic batch, output logits float32 [batch, 9].

    ``nan_below``: the logits of a pair whose mean pathology value is below it are all NaN (the row
    gets ``0 * sqrt(mean - nan_below)``); 256 makes every row NaN.
    """
    f32 = TensorProto.FLOAT
    nodes = logit_nodes("logits" if nan_below is None else "clean")
    extra = []
    if nan_below is not None:
        nodes += [
            helper.make_node("ReduceMean", ["p_m"], ["p_all"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["p_all", "T"], ["shifted"]),
            helper.make_node("Sqrt", ["shifted"], ["root"]),  # NaN below the threshold
            helper.make_node("Mul", ["root", "Z"], ["poison"]),
            helper.make_node("Add", ["clean", "poison"], ["logits"]),
        ]
        extra = [
            numpy_helper.from_array(np.array([nan_below], np.float32), "T"),
            numpy_helper.from_array(np.array([0.0], np.float32), "Z"),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny-crc",
        [
            helper.make_tensor_value_info("pathology", TensorProto.UINT8, ["batch", SIZE, SIZE, 3]),
            helper.make_tensor_value_info("radiology", TensorProto.UINT8, ["batch", SIZE, SIZE, 1]),
        ],
        [helper.make_tensor_value_info("logits", f32, ["batch", len(CLASSES)])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B"), *extra],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def manifest_for(bundle: Path, ref: dict[str, np.ndarray], parity: dict) -> dict:
    """A manifest per docs/bundle.md for the files already in ``bundle``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"architecture": "tiny-linear", "backbone": None, "fusion": "late", "image_size": SIZE},
        "classes": CLASSES,
        "inputs": [
            {"name": "pathology", "dtype": "uint8", "shape": ["batch", SIZE, SIZE, 3], "color_mode": "RGB"},
            {"name": "radiology", "dtype": "uint8", "shape": ["batch", SIZE, SIZE, 1], "color_mode": "L"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(CLASSES)]}],
        "resize": {
            "library": "Pillow",
            "filter": "BILINEAR",
            "size": [SIZE, SIZE],
            "when": "the decoded image is not already size x size",
        },
        "files": {name: sha256_file(bundle / name) for name in ("model.onnx", "reference.npz")},
        "artifacts": [
            {"file": "model.onnx", "kind": "onnx", "precision": "fp32", "usable": True, "parity": parity}
        ],
        "reference": {
            "file": "reference.npz",
            "pairs": int(len(ref["labels"])),
            "split": "test",
            "accuracy": float((ref["logits"].argmax(1) == ref["labels"]).mean()),
        },
        "provenance": {
            "run_id": "tiny",
            "run_dir": None,
            "git_commit": None,
            "created": None,
            "versions": {},
        },
    }


def _image(rng: np.random.Generator, h: int, w: int, c: int, base: np.ndarray) -> np.ndarray:
    noise = rng.integers(-20, 21, size=(h, w, c))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def build_examples(tiny: Tiny, rng: np.random.Generator) -> None:
    """Six labelled pairs (8x8, 16x16 and 12x10 images), as pairs.csv and as pathology/ + radiology/."""
    sizes = [(8, 8), (16, 16), (12, 10), (8, 8), (16, 16), (24, 24)]
    rows = []
    for i, (h, w) in enumerate(sizes):
        pid = f"case-{i}"
        path_img = _image(rng, h, w, 3, rng.integers(30, 226, size=3))
        rad_img = _image(rng, h, w, 1, rng.integers(30, 226, size=1))
        for root, sub in ((tiny.csv_dir, "img"), (tiny.folders_dir, "")):
            _save(path_img, root / sub / "pathology" / f"{pid}.png")
            _save(rad_img, root / sub / "radiology" / f"{pid}.png")
        p = load_image(tiny.csv_dir / "img" / "pathology" / f"{pid}.png", "RGB", SIZE)[None]
        r = load_image(tiny.csv_dir / "img" / "radiology" / f"{pid}.png", "L", SIZE)[None]
        predicted = CLASSES[int(tiny.logits(p, r).argmax())]
        # Every third pair is labelled wrong on purpose, so accuracy is 4/6, not 100 %.
        label = predicted if i % 3 else CLASSES[(CLASSES.index(predicted) + 1) % len(CLASSES)]
        tiny.expected[pid] = (predicted, label)
        rows.append([pid, f"img/pathology/{pid}.png", f"img/radiology/{pid}.png", label])
    with open(tiny.csv_dir / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "pathology", "radiology", "label"])
        writer.writerows(rows)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """Build the tiny bundle and example folders once per session (treat them as read-only)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(4, len(CLASSES))) / 8).astype(np.float32)
    bias = (rng.normal(size=len(CLASSES)) * 4).astype(np.float32)
    tiny = Tiny(root / "bundle", root / "pairs_csv", root / "pairs_folders", weight, bias)
    tiny.bundle.mkdir()
    build_model(tiny.bundle / "model.onnx", weight, bias)

    pathology = rng.integers(0, 256, size=(REFERENCE_PAIRS, SIZE, SIZE, 3), dtype=np.uint8)
    radiology = rng.integers(0, 256, size=(REFERENCE_PAIRS, SIZE, SIZE, 1), dtype=np.uint8)
    logits = tiny.logits(pathology, radiology)
    labels = logits.argmax(1).astype(np.int64)
    labels[::5] = (labels[::5] + 1) % len(CLASSES)  # the "PyTorch" reference is not perfect either
    ref = {"pathology": pathology, "radiology": radiology, "labels": labels, "logits": logits}
    np.savez(tiny.bundle / "reference.npz", **ref)
    parity = {
        "backend": "ort-cpu",
        "pairs": REFERENCE_PAIRS,
        "top1_agreement": 1.0,
        "passed": True,
        "reasons": [],
    }
    write_manifest(tiny.bundle, manifest_for(tiny.bundle, ref, parity))
    build_examples(tiny, rng)
    return tiny


@pytest.fixture
def bundle_copy(tiny: Tiny, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny.bundle, tmp_path / "bundle"))


@pytest.fixture
def nan_bundle(tiny: Tiny, tmp_path: Path):
    """``nan_bundle(threshold)``: a copy of the tiny bundle whose model gives NaN logits for every pair
    with a mean pathology value below ``threshold`` (256: every pair), its sha256 updated."""

    def make(threshold: float) -> Path:
        bundle = Path(shutil.copytree(tiny.bundle, tmp_path / f"nan-bundle-{threshold:g}"))
        build_model(bundle / "model.onnx", tiny.weight, tiny.bias, nan_below=threshold)
        _edit_manifest(
            bundle, lambda m: m["files"].update({"model.onnx": sha256_file(bundle / "model.onnx")})
        )
        return bundle

    return make


@pytest.fixture
def csv_copy(tiny: Tiny, tmp_path: Path) -> Path:
    """A private copy of the pairs.csv example folder."""
    return Path(shutil.copytree(tiny.csv_dir, tmp_path / "pairs_csv"))


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def edit_manifest():
    """``edit_manifest(bundle, fn)`` applies ``fn(manifest)`` to manifest.json in place (no sha256 update)."""
    return _edit_manifest


@pytest.fixture(scope="session")
def cuda_ep(tiny: Tiny) -> str:
    """What onnxruntime's CUDA provider is here: ``absent`` (not in this build), ``dead`` (listed, as
    onnxruntime-gpu always lists it, but a session cannot start it: no GPU or no CUDA libraries) or
    ``works``. GPU tests need ``works``; listing alone is not enough.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "absent"
    session = ort.InferenceSession(
        str(tiny.bundle / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    return "works" if session.get_providers()[0] == "CUDAExecutionProvider" else "dead"


@contextlib.contextmanager
def _unprivileged():
    """Run as user nobody (65534) for a moment when we are root, so file permissions apply."""
    if os.geteuid() != 0:
        yield
        return
    Image.init()  # load Pillow's plugins while we can still read everything
    try:
        os.setegid(65534)
        os.seteuid(65534)
    except PermissionError:  # a container without CAP_SETUID: root reads everything, nothing to test
        os.setegid(0)
        pytest.skip("running as root without the right to switch to user nobody")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def as_nobody():
    """``with as_nobody(): ...`` runs the block as user nobody when the tests run as root (root reads
    every file whatever its permissions); skips the test where that switch is not allowed."""
    if not hasattr(os, "seteuid"):
        pytest.skip("needs POSIX users and permissions")
    return _unprivileged


@pytest.fixture
def open_dir() -> Path:
    """A folder user nobody can traverse (pytest's tmp folders are root-only), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="crc-perm-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# A real crc-infer process, with Ctrl-C restored (tests/conftest.py: python_c). ``preamble`` runs first (e.g.
# a file size limit).
_LAUNCHER = "import sys; from crc_runtime.cli import main; sys.argv[0] = 'crc-infer'; main()"


@pytest.fixture
def crc_infer_command(python_c):
    """``crc_infer_command(args, preamble="")``: the argv of a real ``crc-infer`` process."""

    def command(args, preamble: str = "") -> list[str]:
        return python_c(preamble + _LAUNCHER, *args)

    return command


@pytest.fixture
def many_pairs(tiny: Tiny):
    """``many_pairs(folder, n)``: n pairs in pairs.csv cycling over the six example images (ids in a
    non-sorted order)."""

    def make(folder: Path, n: int) -> None:
        shutil.copytree(tiny.csv_dir / "img", folder / "img")
        stems = sorted(tiny.expected)
        with open(folder / "pairs.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["id", "pathology", "radiology", "label"])
            for i in range(n):
                stem = stems[i % len(stems)]
                label = tiny.expected[stem][1]
                out.writerow(
                    [
                        f"p{(i * 7919) % n:05d}",
                        f"img/pathology/{stem}.png",
                        f"img/radiology/{stem}.png",
                        label,
                    ]
                )

    return make


@pytest.fixture
def start_until(crc_infer_command):
    """``start_until(args, partial, min_bytes)``: start a real ``crc-infer ARGS`` and return the process
    once ``partial`` (its OUTPUT.partial) holds more than ``min_bytes``."""

    def start(args: list, partial: Path, min_bytes: int = 2000, timeout: float = 60) -> subprocess.Popen:
        proc = subprocess.Popen(
            crc_infer_command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.stat().st_size > min_bytes:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "crc-infer finished before it could be interrupted"
        return proc

    return start


@pytest.fixture
def start_run(tiny: Tiny, start_until):
    """``start_run(folder, out)``: start a real crc-infer (batch size 1) and return (process, args) once
    some rows are on disk in OUTPUT.partial."""

    def start(folder: Path, out: Path) -> tuple[subprocess.Popen, list[str]]:
        args = [str(folder), "--bundle", str(tiny.bundle), "--batch-size", "1", "--device", "cpu"]
        args += ["--threads", "1", "--output", str(out)]
        return start_until(args, out.with_name(out.name + ".partial")), args

    return start


def _sigkill(proc: subprocess.Popen) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _ctrl_c(proc: subprocess.Popen) -> str:
    try:
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def sigkill():
    """``sigkill(proc)``: kill a started crc-infer as a crash or the OOM killer would (nothing runs after)."""
    return _sigkill


@pytest.fixture
def ctrl_c():
    """``ctrl_c(proc)``: Ctrl-C a started crc-infer, wait for it, return its stderr."""
    return _ctrl_c


# ---- the explain artifact (model.explain.onnx) of the tiny model


def build_explain_model(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    """The tiny model's explain graph: the same logits, plus per-branch class activation maps and bias.

    The tiny model's "final maps" are the input pixels themselves, so CAM[c, y, x] = sum_k W[k, c] *
    pixel[y, x, k] (a MatMul over the channel axis, transposed to [N, C, H, W]) and the mean of the
    maps over y, x plus the bias is the logit, as in the real model.
    """
    f32 = TensorProto.FLOAT
    nodes = [
        *logit_nodes(),
        helper.make_node("MatMul", ["p_f", "Wp"], ["p_cam"]),
        helper.make_node("Transpose", ["p_cam"], ["pathology_cam"], perm=[0, 3, 1, 2]),
        helper.make_node("MatMul", ["r_f", "Wr"], ["r_cam"]),
        helper.make_node("Transpose", ["r_cam"], ["radiology_cam"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["logits"], ["logits_shape"]),
        helper.make_node("Expand", ["B", "logits_shape"], ["bias"]),
    ]
    c = len(CLASSES)
    graph = helper.make_graph(
        nodes,
        "tiny-crc-explain",
        [
            helper.make_tensor_value_info("pathology", TensorProto.UINT8, ["batch", SIZE, SIZE, 3]),
            helper.make_tensor_value_info("radiology", TensorProto.UINT8, ["batch", SIZE, SIZE, 1]),
        ],
        [
            helper.make_tensor_value_info("logits", f32, ["batch", c]),
            helper.make_tensor_value_info("pathology_cam", f32, ["batch", c, SIZE, SIZE]),
            helper.make_tensor_value_info("radiology_cam", f32, ["batch", c, SIZE, SIZE]),
            helper.make_tensor_value_info("bias", f32, ["batch", c]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "B"),
            numpy_helper.from_array(np.ascontiguousarray(weight[:3]), "Wp"),
            numpy_helper.from_array(np.ascontiguousarray(weight[3:]), "Wr"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def tiny_explain(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle plus its explain artifact, as crc-export writes it (treat as read-only)."""
    bundle = Path(shutil.copytree(tiny.bundle, tmp_path_factory.mktemp("tiny-explain") / "bundle"))
    build_explain_model(bundle / "model.explain.onnx", tiny.weight, tiny.bias)
    with np.load(bundle / "reference.npz") as ref:
        np.savez(bundle / "reference.explain.npz", **tiny.cams(ref["pathology"], ref["radiology"]))
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("model.explain.onnx", "reference.explain.npz"):
        manifest["files"][name] = sha256_file(bundle / name)
    manifest["artifacts"].append(
        {
            "file": "model.explain.onnx",
            "kind": "explain",
            "precision": "fp32",
            "usable": True,
            "branches": ["pathology", "radiology"],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": ["batch", len(CLASSES)]},
                *(
                    {"name": f"{b}_cam", "dtype": "float32", "shape": ["batch", len(CLASSES), SIZE, SIZE]}
                    for b in ("pathology", "radiology")
                ),
                {"name": "bias", "dtype": "float32", "shape": ["batch", len(CLASSES)]},
            ],
            "reference": "reference.explain.npz",
            "parity": {"backend": "ort-cpu", "passed": True, "reasons": []},
        }
    )
    write_manifest(bundle, manifest)
    return bundle
