"""Bad-input corpus, bundles: every damaged bundle is refused by crc-infer with one line and exit 1.

Also the exit codes of crc-infer (0 all processed, 1 user error, 2 bad command line, 3 some inputs
skipped) and the manifest-level engine check (an engine built for another GPU or TensorRT release).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.backends.tensorrt import engine_mismatches
from crc_runtime.bundle import REFERENCE_KEYS, load_bundle, sha256_file
from crc_runtime.cli import cli
from crc_runtime.errors import BundleError


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


def _rename_model_output(new: str) -> Callable[[Path], None]:
    """A model whose output is not called logits (the manifest still says logits), sha256 updated."""

    def damage(bundle: Path) -> None:
        import onnx

        model = onnx.load(str(bundle / "model.onnx"))
        for node in model.graph.node:
            node.output[:] = [new if o == "logits" else o for o in node.output]
        model.graph.output[0].name = new
        onnx.save(model, str(bundle / "model.onnx"))
        _rehash(bundle, "model.onnx")

    return damage


def _outputs(**changes) -> Callable[[Path], None]:
    return _edit(lambda m: m["outputs"][0].update(changes))


# Every manifest field is checked against the schema, and the manifest against the model, by run and
# validate alike (issue 12: validate passed what run refused, and odd types gave tracebacks).
SCHEMA_CASES = {
    "resize a string": (_set("resize", "Pillow"), "'resize' missing or not an object (found 'Pillow')"),
    "resize.size 0": (
        _edit(lambda m: m["resize"].update(size=[0, 0])),
        "resize.size a list of 2 items is not",
    ),
    "resize.size negative": (_edit(lambda m: m["resize"].update(size=[-8, -8])), "resize.size"),
    "resize.size huge": (_edit(lambda m: m["resize"].update(size=[10**6, 10**6])), "S in 1..4096"),
    "resize.size true": (_edit(lambda m: m["resize"].update(size=[True, True])), "resize.size"),
    "resize.size a number": (_edit(lambda m: m["resize"].update(size=8)), "resize.size 8 is not [S, S]"),
    "resize.library a list": (_edit(lambda m: m["resize"].update(library=[1])), "resize rule a list of 1"),
    "artifacts an object": (
        _set("artifacts", {"file": "model.onnx"}),
        "'artifacts' missing or not a list of artifact entries (found an object of 1 keys)",
    ),
    "artifacts entry a string": (
        _set("artifacts", ["model.onnx"]),
        "'artifacts[0]' missing or not an object",
    ),
    "artifact without kind": (
        _edit(lambda m: m["artifacts"][0].pop("kind")),
        "'artifacts[0].kind' missing or not a string (found nothing)",
    ),
    "artifact usable 'yes'": (
        _edit(lambda m: m["artifacts"][0].update(usable="yes")),
        "'artifacts[0].usable' missing or not true or false",
    ),
    "artifact parity a list": (
        _edit(lambda m: m["artifacts"][0].update(parity=["ok"])),
        "'artifacts[0].parity' missing or not an object",
    ),
    "artifact parity reasons a string": (
        _edit(lambda m: m["artifacts"][0]["parity"].update(reasons="fine")),
        "'artifacts[0].parity.reasons' missing or not a list of strings",
    ),
    "artifact parity threshold NaN": (
        _edit(lambda m: m["artifacts"][0]["parity"].update(thresholds={"max_abs_diff": float("nan")})),
        "'artifacts[0].parity.thresholds.max_abs_diff' missing or not a finite number (found NaN)",
    ),
    "artifact engine a list": (
        _edit(lambda m: m["artifacts"][0].update(engine=["sm90"])),
        "'artifacts[0].engine' missing or not an object",
    ),
    "artifact external_data a string": (
        _edit(lambda m: m["artifacts"][0].update(external_data="model.onnx.data")),
        "'artifacts[0].external_data' missing or not a list of plain file names",
    ),
    "reference a string": (_set("reference", "reference.npz"), "'reference' missing or not an object"),
    "reference.file outside": (
        _edit(lambda m: m["reference"].update(file="../reference.npz")),
        "'reference.file' missing or not a plain file name inside the bundle",
    ),
    "reference.pairs -1": (_edit(lambda m: m["reference"].update(pairs=-1)), "'reference.pairs'"),
    "model a list": (_set("model", []), "'model' missing or not an object"),
    "provenance run_id a number": (
        _edit(lambda m: m["provenance"].update(run_id=7)),
        "'provenance.run_id' missing or not a string (found 7)",
    ),
    "classes not strings": (_set("classes", list(range(9))), "'classes[0]' missing or not a string"),
    "classes repeated": (_set("classes", ["a"] * 9), "classes ['a'] appear more than once"),
    "files value a number": (
        _edit(lambda m: m["files"].update({"model.onnx": 5})),
        "'files.model.onnx' missing or not a sha256 hex string",
    ),
    "inputs entry a string": (_set("inputs", ["pathology"]), "'inputs[0]' missing or not an object"),
    "input shape a string": (
        _edit(lambda m: m["inputs"][0].update(shape="8x8")),
        "'inputs[0].shape' missing or not a list of dimensions",
    ),
    "input name unknown": (
        _edit(lambda m: m["inputs"][0].update(name="mri")),
        "'inputs[0].name' missing or not one of pathology, radiology",
    ),
    "input color_mode CMYK": (
        _edit(lambda m: m["inputs"][0].update(color_mode="CMYK")),
        "'inputs[0].color_mode' missing or not one of RGB, L",
    ),
    "input dtype unknown": (
        _edit(lambda m: m["inputs"][0].update(dtype="uint9")),
        "'inputs[0].dtype' missing or not one of uint8",
    ),
    "inputs repeat a name": (
        _edit(lambda m: m["inputs"].append(dict(m["inputs"][0]))),
        "inputs names ['pathology', 'radiology', 'pathology'] repeat a name",
    ),
    "manifest 5 classes, logits [batch, 9]": (
        _set("classes", ["a", "b", "c", "d", "e"]),
        "output logits shape ['batch', 9] is not [batch, 5]",
    ),
    "manifest 5 classes and logits [batch, 5], model 9": (
        _edit(
            lambda m: (
                m.update(classes=["a", "b", "c", "d", "e"]),
                m["outputs"][0].update(shape=["batch", 5]),
            )
        ),
        "manifest says output logits float32 [batch, 5], the model has logits float32 [batch, 9]",
    ),
    "output dtype float16": (_outputs(dtype="float16"), "manifest says output logits float16 [batch, 9]"),
    "output rank 3": (
        _outputs(shape=["batch", 9, 1]),
        "output logits shape ['batch', 9, 1] is not [batch, 9]",
    ),
    "output named scores": (_outputs(name="scores"), "outputs ['scores'] have no 'logits'"),
    "output listed twice": (
        _edit(lambda m: m["outputs"].append({"name": "probs", "dtype": "float32", "shape": ["batch", 9]})),
        "manifest outputs ['logits', 'probs'] but the model has ['logits']",
    ),
    "model output not named logits": (
        _rename_model_output("scores"),
        "manifest outputs ['logits'] but the model has ['scores']",
    ),
    "input dims disagree with the model": (
        _edit(
            lambda m: (
                m["resize"].update(size=[16, 16]),
                [spec["shape"].__setitem__(slice(1, 3), [16, 16]) for spec in m["inputs"]],
            )
        ),
        "manifest says input pathology uint8 [batch, 16, 16, 3], the model has pathology uint8 [batch, 8, 8",
    ),
    "manifest nested 100000 deep": (
        _manifest_bytes(b'{"schema_version": 1, "model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "manifest.json: not valid JSON (nested too deeply",
    ),
    "manifest 17 MB": (
        _manifest_bytes(b"{" + b" " * (17 << 20) + b"}"),
        "more than any manifest crc-export writes",
    ),
}
RUN_CASES.update(SCHEMA_CASES)


def _run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", RUN_CASES)
def test_damaged_bundle_is_refused_in_one_line(tiny, bundle_copy, tmp_path, name):
    damage, expected = RUN_CASES[name]
    damage(bundle_copy)
    out = tmp_path / "p.csv"
    # The unlabelled folder layout: a manifest with other classes still reaches the model check.
    code, stdout, stderr = _run(
        tiny.folders_dir, "--bundle", bundle_copy, "--output", out, "--backend", "ort-cpu"
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


def _npy_member(header: bytes, data: bytes = b"") -> bytes:
    """A raw .npy file: magic, version 1.0, the header text as given (padded), then ``data``."""
    text = header + b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def _npz_members(ref: dict[str, np.ndarray], **raw: bytes) -> bytes:
    """reference.npz with the real arrays, but the members named in ``raw`` replaced by raw bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for key, array in ref.items():
            if key in raw:
                archive.writestr(f"{key}.npy", raw[key])
            else:
                member = io.BytesIO()
                np.save(member, array)
                archive.writestr(f"{key}.npy", member.getvalue())
    return buf.getvalue()


def _changed(**arrays) -> Callable[[dict], bytes]:
    return lambda ref: _npz(**{**ref, **{k: (v(ref) if callable(v) else v) for k, v in arrays.items()}})


# name: (reference.npz bytes from the real arrays, text the validate error must contain)
REFERENCE_CASES = {
    "not a zip": (lambda ref: b"not a zip file", "reference.npz: not a readable .npz"),
    "empty file": (lambda ref: b"", "reference.npz: not a readable .npz"),
    "pickle": (
        lambda ref: _npz(pathology=np.array([{"exec": "anything"}], dtype=object)),
        "reference.npz: not a readable .npz (Object arrays cannot be loaded when allow_pickle=False)",
    ),
    "missing arrays": (
        lambda ref: _npz(pathology=ref["pathology"], radiology=ref["radiology"]),
        "reference.npz: missing arrays ['labels', 'logits']",
    ),
    "header declares 10^12 bytes": (
        lambda ref: _npz_members(
            ref,
            logits=_npy_member(
                b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }", b"\0" * 64
            ),
        ),
        "logits declares [1000000000000] float32 (4,000,000,000,000 bytes) but holds 64 bytes",
    ),
    "header 60 KB long": (
        lambda ref: _npz_members(
            ref,
            labels=_npy_member(b"{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }" + b" " * 60_000),
        ),
        "reference.npz: not a readable .npz (Header info length",
    ),
    "header not a dict": (
        lambda ref: _npz_members(ref, labels=_npy_member(b"[1, 2, 3]")),
        "reference.npz: not a readable .npz",
    ),
    "npy version 9": (
        lambda ref: _npz_members(ref, labels=b"\x93NUMPY\x09\x00" + b"\0" * 60),
        "reference.npz: labels is .npy format version (9, 0), not 1.0 or 2.0",
    ),
    "member cut short": (
        lambda ref: _npz_members(ref, logits=_npz_member_bytes(ref["logits"])[:-10]),
        "logits declares [20, 9] float32 (720 bytes) but holds 710 bytes",
    ),
    "no pairs": (
        _changed(**{k: (lambda r, k=k: r[k][:0]) for k in REFERENCE_KEYS}),
        "reference.npz: holds no reference pairs (N = 0)",
    ),
    "labels float": (_changed(labels=lambda r: r["labels"].astype(np.float32)), "labels is float32 [20]"),
    "labels out of range": (
        _changed(labels=lambda r: np.full_like(r["labels"], 9)),
        "labels range 9..9, outside 0..8 (the manifest's classes)",
    ),
    "labels negative": (_changed(labels=lambda r: r["labels"] - 100), "outside 0..8"),
    "labels 2-D": (
        _changed(labels=lambda r: r["labels"][:, None]),
        "labels is int64 [20, 1], expected integers",
    ),
    "logits NaN": (
        _changed(
            logits=lambda r: np.where(np.arange(20)[:, None] == 3, np.nan, r["logits"]).astype(np.float32)
        ),
        "1 of 20 reference logit rows are NaN or infinite",
    ),
    "logits inf": (_changed(logits=lambda r: r["logits"] * np.float32(np.inf)), "20 of 20 reference logit"),
    "logits 5 classes": (
        _changed(logits=lambda r: r["logits"][:, :5]),
        "logits is float32 [20, 5], expected float",
    ),
    "logits int": (_changed(logits=lambda r: r["logits"].astype(np.int64)), "logits is int64 [20, 9]"),
    "fewer logits than labels": (_changed(logits=lambda r: r["logits"][:10]), "logits is float32 [10, 9]"),
    "pathology float": (
        _changed(pathology=lambda r: r["pathology"].astype(np.float32)),
        "pathology is float32 [20, 8, 8, 3], expected uint8 [20, 8, 8, 3]",
    ),
    "radiology 16 px": (
        _changed(radiology=lambda r: np.repeat(np.repeat(r["radiology"], 2, 1), 2, 2)),
        "radiology is uint8 [20, 16, 16, 1], expected uint8 [20, 8, 8, 1]",
    ),
}


def _npz_member_bytes(array: np.ndarray) -> bytes:
    member = io.BytesIO()
    np.save(member, array)
    return member.getvalue()


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_damaged_reference_set(tiny, bundle_copy, name):
    build, expected = REFERENCE_CASES[name]
    with np.load(bundle_copy / "reference.npz") as data:
        ref = {key: data[key] for key in REFERENCE_KEYS}
    (bundle_copy / "reference.npz").write_bytes(build(ref))
    _rehash(bundle_copy, "reference.npz")
    code, stdout, stderr = _run("validate", bundle_copy)
    assert code == 1 and stderr.startswith("error: ") and expected in stderr, stdout + stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
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


@pytest.mark.parametrize("locked", ["manifest.json", "model.onnx", "reference.npz", "the bundle folder"])
def test_unreadable_bundle_files(tiny, as_nobody, open_dir, locked):
    """Root reads everything, so the load runs as user nobody: one line, no PermissionError."""
    bundle = Path(shutil.copytree(tiny.bundle, open_dir / "bundle"))
    for path in (bundle, *bundle.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    target = bundle if locked == "the bundle folder" else bundle / locked
    target.chmod(0o000)
    with as_nobody(), pytest.raises(BundleError) as info:
        load_bundle(bundle)
    message = str(info.value)
    assert "cannot read (permission denied)" in message and "\n" not in message, message
    assert message.startswith(str(target if locked != "the bundle folder" else bundle)), message
