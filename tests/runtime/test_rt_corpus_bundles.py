"""Bad-input corpus, bundles: every damaged bundle is refused by crc-infer with one line and exit 1.

Also the exit codes of crc-infer (0 all processed, 1 user error, 2 bad command line, 3 some inputs
skipped) and the manifest-level engine check (an engine built for another GPU or TensorRT release).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.backends.tensorrt import engine_mismatches
from crc_runtime.bundle import load_bundle, sha256_file
from crc_runtime.cli import cli


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        manifest = _manifest(bundle)
        fn(manifest)
        _write_manifest(bundle, manifest)

    return damage


def _rehash(bundle: Path, name: str) -> None:
    """Make the manifest agree with a damaged file, so the next line of defence is what refuses it."""
    manifest = _manifest(bundle)
    manifest["files"][name] = sha256_file(bundle / name)
    _write_manifest(bundle, manifest)


def _truncate(name: str, keep: float, rehash: bool) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        data = (bundle / name).read_bytes()
        (bundle / name).write_bytes(data[: int(len(data) * keep)])
        if rehash:
            _rehash(bundle, name)

    return damage


def _flip(name: str) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        data = bytearray((bundle / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bundle / name).write_bytes(bytes(data))

    return damage


def _manifest_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda bundle: (bundle / "manifest.json").write_bytes(data)


def _symlink_outside(name: str) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        outside = bundle.parent / f"outside-{name}"
        (bundle / name).rename(outside)
        (bundle / name).symlink_to(outside)

    return damage


def _set(key: str, value) -> Callable[[Path], None]:
    def edit(m: dict) -> None:
        if value is _DELETE:
            del m[key]
        else:
            m[key] = value

    return _edit(edit)


_DELETE = object()

# name: (damage, text the one error line must contain)
RUN_CASES = {
    "manifest missing": (lambda b: (b / "manifest.json").unlink(), "manifest.json: missing"),
    "manifest not JSON": (_manifest_bytes(b"this is not json"), "manifest.json: not valid JSON"),
    "manifest empty": (_manifest_bytes(b""), "manifest.json: not valid JSON"),
    "manifest truncated": (lambda b: _manifest_bytes(b"{" + b" " * 3)(b), "manifest.json: not valid JSON"),
    "manifest not UTF-8": (_manifest_bytes(b'{"schema_version": "\xff"}'), "manifest.json: not valid JSON"),
    "manifest a JSON list": (_manifest_bytes(b"[1, 2]"), "expected a JSON object, found list"),
    "schema_version 2": (_set("schema_version", 2), "schema_version 2 is not one this runtime knows"),
    "schema_version '1'": (_set("schema_version", "1"), "schema_version '1' is not one"),
    "schema_version 1.0": (_set("schema_version", 1.0), "schema_version 1.0 is not one"),
    "schema_version missing": (_set("schema_version", _DELETE), "schema_version None is not one"),
    "classes empty": (_set("classes", []), "'classes' missing or not a non-empty list"),
    "files not an object": (_set("files", ["model.onnx"]), "'files' missing or not a dict"),
    "unknown resize rule": (
        _edit(lambda m: m["resize"].update(filter="BICUBIC")),
        "resize rule Pillow/BICUBIC is not one",
    ),
    "model.onnx missing": (
        lambda b: (b / "model.onnx").unlink(),
        "model.onnx: listed in manifest.json but missing",
    ),
    "reference.npz missing": (
        lambda b: (b / "reference.npz").unlink(),
        "reference.npz: listed in manifest.json but missing",
    ),
    "model.onnx altered": (_flip("model.onnx"), "model.onnx: sha256"),
    "model.onnx truncated": (_truncate("model.onnx", 0.5, rehash=False), "model.onnx: sha256"),
    "model.onnx truncated, sha256 updated": (
        _truncate("model.onnx", 0.5, rehash=True),
        "model.onnx: onnxruntime cannot load it",
    ),
    "model.onnx empty, sha256 updated": (
        _truncate("model.onnx", 0.0, rehash=True),
        "model.onnx: onnxruntime cannot load it",
    ),
    "files entry with ..": (
        _edit(lambda m: m["files"].update({"../model.onnx": m["files"]["model.onnx"]})),
        "files entry '../model.onnx' is not a plain file name",
    ),
    "files entry absolute": (
        _edit(lambda m: m["files"].update({"/etc/passwd": "0" * 64})),
        "files entry '/etc/passwd' is not a plain file name",
    ),
    "artifact not in files": (
        _edit(lambda m: m["artifacts"][0].update(file="../../elsewhere.onnx")),
        "elsewhere.onnx: not listed in manifest.json 'files'",
    ),
    "model.onnx a symlink outside": (_symlink_outside("model.onnx"), "model.onnx: a symlink to"),
    "manifest a symlink outside": (_symlink_outside("manifest.json"), "manifest.json: a symlink to"),
    "artifact unusable": (
        _edit(
            lambda m: m["artifacts"][0].update(
                usable=False, parity={"reasons": ["fp32 abs_diff 0.5 > 0.001"]}
            )
        ),
        "marked unusable in manifest.json (fp32 abs_diff 0.5 > 0.001)",
    ),
}


def _run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", RUN_CASES)
def test_damaged_bundle_is_refused_in_one_line(tiny, bundle_copy, tmp_path, name):
    damage, expected = RUN_CASES[name]
    damage(bundle_copy)
    out = tmp_path / "p.csv"
    code, stdout, stderr = _run(
        tiny.csv_dir, "--bundle", bundle_copy, "--output", out, "--backend", "ort-cpu"
    )
    assert code == 1, stdout + stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert expected in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob("p.csv*"))  # nothing half-written
    code, stdout, stderr = _run("validate", bundle_copy)
    assert code == 1 and stderr.count("\n") <= 1 and "Traceback" not in stderr, stdout + stderr


@pytest.mark.parametrize("where", ["not a folder", "missing"])
def test_bundle_path_that_is_no_bundle(tiny, tmp_path, where):
    path = tmp_path / "bundle"
    if where == "not a folder":
        path.write_text("x")
    code, _, stderr = _run(tiny.csv_dir, "--bundle", path)
    assert code == 1 and stderr.startswith(f"error: {path}: not a folder") and stderr.count("\n") == 1


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a zip file", "reference.npz: not a readable .npz"),
        (
            "pickle",
            "reference.npz: not a readable .npz (Object arrays cannot be loaded when allow_pickle=False)",
        ),
        ("missing", "reference.npz: missing arrays ['labels', 'logits']"),
    ],
)
def test_damaged_reference_set(tiny, bundle_copy, content, expected):
    if content == "pickle":
        content = _npz(pathology=np.array([{"exec": "anything"}], dtype=object))
    elif content == "missing":
        ref = np.load(bundle_copy / "reference.npz")
        content = _npz(pathology=ref["pathology"], radiology=ref["radiology"])
    (bundle_copy / "reference.npz").write_bytes(content)
    _rehash(bundle_copy, "reference.npz")
    code, stdout, stderr = _run("validate", bundle_copy)
    assert code == 1 and stderr.startswith("error: ") and expected in stderr, stdout + stderr
    # Running pairs never reads the reference set, so the damaged one does not stop it.
    code, stdout, _ = _run(tiny.csv_dir, "--bundle", bundle_copy, "--output", bundle_copy.parent / "p.csv")
    assert code == 0, stdout


H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.mark.parametrize(
    ("record", "reasons"),
    [
        ({"gpu_name": H100["name"], "compute_capability": "9.0", "tensorrt_version": "10.13.0.35"}, []),
        (
            {
                "gpu_name": "NVIDIA A100-SXM4-80GB",
                "compute_capability": "8.0",
                "tensorrt_version": "10.13.0.35",
            },
            ["compute capability 8.0", "built on 'NVIDIA A100-SXM4-80GB'"],
        ),
        (
            {"gpu_name": H100["name"], "compute_capability": "9.0", "tensorrt_version": "10.8.0.43"},
            ["built with TensorRT 10.8.0.43, this is TensorRT 10.13.0.35"],
        ),
        ({"gpu_name": H100["name"], "compute_capability": "9.0"}, ["built with TensorRT None"]),
        (None, ["no 'engine' record"]),
    ],
)
def test_engine_for_another_gpu_or_tensorrt(record, reasons):
    """The manifest-level check the TensorRT backend runs before it deserializes an engine."""
    found = engine_mismatches(record, H100, "10.13.0.35")
    assert len(found) == len(reasons) and all(r in f for r, f in zip(reasons, found, strict=True))


def test_bundle_with_a_foreign_engine_still_runs_onnx(tiny, bundle_copy, tmp_path):
    """An engine for another GPU does not make the bundle unusable: auto picks onnxruntime, says why."""
    plan = "nvidia-a100-sxm4-80gb_sm80_trt10.8.0.plan"
    (bundle_copy / plan).write_bytes(b"not really an engine")
    manifest = _manifest(bundle_copy)
    manifest["files"][plan] = sha256_file(bundle_copy / plan)
    manifest["artifacts"].append(
        {
            "file": plan,
            "kind": "tensorrt",
            "precision": "fp16",
            "usable": True,
            "engine": {
                "gpu_name": "NVIDIA A100-SXM4-80GB",
                "compute_capability": "8.0",
                "tensorrt_version": "10.8.0",
            },
        }
    )
    _write_manifest(bundle_copy, manifest)
    assert load_bundle(bundle_copy).artifact(plan, kind=None)["kind"] == "tensorrt"
    code, stdout, stderr = _run(tiny.csv_dir, "--bundle", bundle_copy, "--output", tmp_path / "p.csv")
    assert code == 0 and "backend: ort-cpu" in stdout, stdout + stderr
    code, stdout, stderr = _run(
        tiny.csv_dir, "--bundle", bundle_copy, "--backend", "trt", "--output", tmp_path / "q.csv"
    )
    assert code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1, stdout + stderr


# ---------------------------------------------------------------- exit codes


def test_exit_0_every_pair_processed(tiny, csv_copy):
    assert _run(csv_copy, "--bundle", tiny.bundle)[0] == 0


def test_exit_3_finished_with_skips(tiny, csv_copy):
    with open(csv_copy / "pairs.csv", "a") as fh:
        fh.write("gone,img/pathology/nope.png,img/radiology/case-0.png,\n")
    code, stdout, _ = _run(csv_copy, "--bundle", tiny.bundle)
    assert code == 3 and "skipped by reason: missing file 1" in stdout
    assert (csv_copy / "predictions.csv").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["{empty}", "--bundle", "{bundle}"],  # nothing to do
        ["{bundle}", "--bundle", "{bundle}"],  # a folder without pairs
        ["{csv}", "--bundle", "{csv}"],  # not a bundle
        ["{csv}", "--bundle", "{bundle}", "--output", "{csv}/no/such/dir/p.csv"],
        ["{all_bad}", "--bundle", "{bundle}"],  # every pair skipped: nothing could be processed
    ],
)
def test_exit_1_user_error(tiny, csv_copy, tmp_path, args):
    (tmp_path / "empty").mkdir()
    all_bad = tmp_path / "all_bad"
    for modality in ("pathology", "radiology"):
        (all_bad / modality).mkdir(parents=True)
        (all_bad / modality / "a.png").write_bytes(b"junk")
    names = {"empty": tmp_path / "empty", "bundle": tiny.bundle, "csv": csv_copy, "all_bad": all_bad}
    code, _, stderr = _run(*(a.format(**{k: str(v) for k, v in names.items()}) for a in args))
    assert code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert not (all_bad / "predictions.csv").exists() and not list(all_bad.glob("predictions.csv*"))


@pytest.mark.parametrize(
    "args", [["--no-such-flag"], ["{csv}"], ["{csv}", "--bundle", "{bundle}", "--batch-size", "0"]]
)
def test_exit_2_bad_command_line(tiny, csv_copy, args):
    names = {"bundle": str(tiny.bundle), "csv": str(csv_copy)}
    assert _run(*(a.format(**names) for a in args))[0] == 2


def test_nothing_written_outside_folder_bundle_and_output(tiny, bundle_copy, csv_copy, tmp_path):
    """A run reads the input folder and the bundle and writes only next to the output path."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    watched = [bundle_copy, csv_copy, tmp_path]

    def snapshot() -> dict[str, float]:
        return {
            os.path.join(root, name): os.lstat(os.path.join(root, name)).st_mtime_ns
            for top in watched
            for root, dirs, files in os.walk(top)
            for name in dirs + files
            if not os.path.join(root, name).startswith(str(out_dir))
        }

    before = snapshot()
    code, stdout, _ = _run(csv_copy, "--bundle", bundle_copy, "--output", out_dir / "p.csv")
    assert code == 0, stdout
    assert snapshot() == before and os.listdir(out_dir) == ["p.csv"]
