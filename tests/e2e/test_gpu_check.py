"""benchmarks/gpu_check.sh and gpu_wheels.sh on a machine without a GPU: clean exit, every skip explained,
and the wheel carrying (split, receive part by part, assemble, install --target) for real on dummy wheels.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIG = "onnxruntime_gpu-0.0.0-py3-none-any.whl"


def make_wheel(folder: Path, dist: str, package: str, source: str) -> Path:
    """A minimal valid pure-Python wheel holding ``package/__init__.py``."""
    version = "0.0.0" if package == "onnxruntime" else "0.1"
    name = f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{package}/__init__.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(folder / name, "w") as whl:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
            whl.writestr(path, data)
        whl.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return folder / name


def sh(script: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, **env},
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_wheels_travel_in_parts_and_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    here, carried = tmp_path / "here", tmp_path / "carried"
    here.mkdir()
    carried.mkdir()
    make_wheel(here, "onnxruntime_gpu", "onnxruntime", "__version__ = '0.0.0'\n" + "# padding\n" * 400)
    small = make_wheel(here, "crcdummy", "crcdummy", "VALUE = 42\n")
    env = {
        "WHEELS": str(here),
        "STAGE": str(tmp_path / "stage"),
        "SITE": str(tmp_path / "site"),
        "BIG": BIG,
        "SMALL_SPECS": "crcdummy==0.1",
        "PART_BYTES": "1000",
    }
    out = sh("gpu_wheels.sh", "split", env=env).stdout
    parts = sorted(here.glob(f"{BIG}.part-*"))
    assert (
        len(parts) >= 2 and f"{len(parts)} part(s)" in out and "bash benchmarks/gpu_wheels.sh receive" in out
    )
    # One "device call" per part: each carries one part (and the checksum and small wheel) into the tree.
    for part in parts:
        shutil.copy(part, carried)
        shutil.copy(here / f"{BIG}.sha256", carried)
        shutil.copy(small, carried)
        sh("gpu_wheels.sh", "receive", env={**env, "WHEELS": str(carried)})
        assert not any(carried.iterdir())  # moved out of the tree, so the next call carries only its part
        if part != parts[-1]:
            incomplete = sh("gpu_wheels.sh", "assemble", env=env, check=False)
            assert incomplete.returncode == 1 and "sha256 differs" in incomplete.stderr

    results = tmp_path / "results"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "RESULTS": str(results),
            "WORK": str(tmp_path / "work"),
            "PATH": "/usr/bin:/bin",
            **env,
        },  # fmt: skip
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "ort" / "onnxruntime" / "__init__.py").is_file()
    assert (tmp_path / "site" / "deps" / "crcdummy" / "__init__.py").is_file()
    summary = (results / "summary.md").read_text()
    assert "| install-wheels | ran |" in summary and "FAILED" not in summary
    for step in ("cuda-bindings", "train-bf16", "train-fp16", "harness-torch", "harness-compile",
                 "harness-ort", "validate-cuda", "bench-ort-cuda", "tensorrt"):  # fmt: skip
        assert f"| {step} | skipped | - | no NVIDIA GPU here" in summary, step
    assert summary in proc.stdout and (results / "gpu_check.log").is_file()
