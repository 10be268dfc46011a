"""Cold start, peak RSS and installed size: the torch-free runtime against the same job done with torch.

Each job runs as a child of a fresh measuring process, so ``RUSAGE_CHILDREN`` sees that one job only:
its wall time from process start to exit (one batch of predictions written) and its peak RSS.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# The measuring process: starts the clock, runs the job, reports wall time and the child's peak RSS.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_mib": peak}))
"""


def measure(cmd: list[str], repeats: int = 3) -> dict:
    """Median wall time and largest peak RSS of ``cmd`` over ``repeats`` isolated runs."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True
        )
        run = json.loads(out.stdout.strip().splitlines()[-1])
        if run["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {run['rc']}")
        runs.append(run)
    return {
        "command": cmd,
        "repeats": repeats,
        "wall_s_median": statistics.median(r["wall_s"] for r in runs),
        "wall_s_all": [r["wall_s"] for r in runs],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }


def site_packages(python: str | Path) -> Path:
    """The purelib folder of the environment that ``python`` belongs to."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def folder_bytes(folder: Path) -> int:
    """Bytes of every regular file under ``folder`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def env_sizes(runtime_python: Path, torch_python: Path) -> dict:
    """site-packages sizes (MiB) of the runtime-only environment and of the torch environment."""
    rt, full = site_packages(runtime_python), site_packages(torch_python)
    rt_mib, full_mib = folder_bytes(rt) / 2**20, folder_bytes(full) / 2**20
    return {
        "runtime_env": {"python": str(runtime_python), "site_packages": str(rt), "mib": rt_mib},
        "torch_env": {"python": str(torch_python), "site_packages": str(full), "mib": full_mib},
        "ratio": rt_mib / full_mib,
    }


def one_pair_folder(folder: Path, dest: Path) -> Path:
    """A copy of ``folder`` (a pairs.csv folder) that keeps only its first pair: the first-prediction job."""
    import csv
    import shutil

    with open(folder / "pairs.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        first = next(reader)
        fields = reader.fieldnames
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerow(first)
    for key in ("pathology", "radiology"):
        (dest / first[key]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / first[key], dest / first[key])
    return dest


def cold_start(
    runtime_python: Path,
    bundle: Path,
    run_dir: Path,
    folder: Path,
    out_dir: Path,
    artifact: str = "fp32",
    torch_job: dict | None = None,
) -> dict:
    """The same job (predict every pair of ``folder`` in one batch, write a CSV) via crc-infer and via torch.

    Each is timed from process start to exit, so interpreter start-up and teardown count on both sides.
    With a one-pair folder this is the issue's cold start: process start -> first prediction.

    Args:
        artifact: what crc-infer runs (``--artifact``: fp32, int8); the torch job is always FP32.
        torch_job: a :func:`measure` result of the torch job to reuse instead of measuring it again.
    """
    here = Path(__file__).resolve().parent
    with open(folder / "pairs.csv") as fh:
        pairs = sum(1 for _ in fh) - 1
    runtime_cmd = [
        str(runtime_python), "-m", "crc_runtime.cli", str(folder), "--bundle", str(bundle),
        "--backend", "ort-cpu", "--artifact", artifact, "--batch-size", "64",
        "--output", str(out_dir / "cold_runtime.csv"),
    ]  # fmt: skip
    torch_cmd = [
        sys.executable,
        str(here / "torch_job.py"),
        str(run_dir),
        str(folder),
        str(out_dir / "cold_torch.csv"),
    ]
    runtime = measure(runtime_cmd)
    torch_job = torch_job or measure(torch_cmd)
    return {
        "job": f"predict the {pairs} pair(s) of {folder} in one batch, write a CSV (process start -> exit)",
        "pairs": pairs,
        "artifact": artifact,
        "runtime": runtime,
        "torch": torch_job,
        "cold_start_ratio": runtime["wall_s_median"] / torch_job["wall_s_median"],
        "peak_rss_ratio": runtime["peak_rss_mib"] / torch_job["peak_rss_mib"],
    }


def imports_only(runtime_python: Path) -> dict:
    """Library overhead alone: importing the runtime's stack against importing torch + torchvision."""
    runtime = measure([str(runtime_python), "-c", "import crc_runtime.cli, crc_runtime.predict, onnxruntime"])
    torch_job = measure([sys.executable, "-c", "import torch, torchvision, crc_train.model"])
    return {
        "runtime": runtime,
        "torch": torch_job,
        "wall_ratio": runtime["wall_s_median"] / torch_job["wall_s_median"],
        "rss_ratio": runtime["peak_rss_mib"] / torch_job["peak_rss_mib"],
    }


def runtime_python_or_none(path: str | None) -> Path | None:
    """The python of a torch-free runtime environment (checked to have no torch), or None."""
    candidates = [path] if path else [".venv-runtime/bin/python"]
    for cand in candidates:
        python = Path(cand)
        if not python.is_file():
            continue
        probe = subprocess.run(
            [str(python), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
            capture_output=True,
            text=True,
        )
        if probe.stdout.strip() == "True":
            return python
        log.warning("%s has torch installed; not a runtime-only environment", python)
    return None
