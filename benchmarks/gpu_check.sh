#!/usr/bin/env bash
# The GPU proof in one call: every GPU path of crc-fusion on a borrowed NVIDIA machine, in at most
# $BUDGET seconds (default 470: under 8 minutes), from a checkout that is not installed.
#
#   RESULTS=/tmp/gpu-results bash benchmarks/gpu_check.sh
#
# Sized for the machine we can borrow: NVIDIA H200, CUDA 13 driver, Python 3.12 with torch 2.11 (cu130),
# onnx, onnxruntime (CPU build) and cuda-bindings; no tensorrt, no onnxruntime-gpu, no downloads. The code
# runs from this checkout (PYTHONPATH=train:export:runtime, python -m ...); the wheels it lacks
# (onnxruntime-gpu 1.31.1, medmnist) are carried beforehand with benchmarks/gpu_wheels.sh and installed
# here with pip install --no-deps --target. Each step has a time limit and writes as it goes, so a run
# cut short still leaves its numbers; $RESULTS/summary.md says for every step: ran, FAILED or skipped,
# its seconds, and why. Steps:
#   A (no extra wheel but medmnist): machine facts; the runtime's cuda-bindings layer and TrtBackend on
#     real CUDA with a stand-in engine (the gpu tests of tests/runtime/test_rt_contract.py); crc-train on
#     CUDA for a few steps with --amp bf16 and --amp fp16; the harness's torch eager FP32 / AMP FP16 rows
#     (it builds the resnet50 @ 64 px bundle) and its torch.compile row.
#   B (onnxruntime-gpu): the ORT-CUDA FP32 / FP16 / TF32 rows and the end-to-end folder run, the
#     runtime's gpu tests, crc-infer validate --device cuda, crc-infer bench --backend ort-cuda, then
#     the whole runtime test suite with a working CUDA provider.
#   C (TensorRT): skipped with the reason unless a tensorrt with its builder imports.
# Exit 0 when no step FAILED (skipped steps, and steps cut at their time limit, are not failures; the
# summary says which); the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results-gpu}
WORK=${WORK:-${TMPDIR:-/tmp}/crc-gpu-check}
STAGE=${STAGE:-/tmp/crc-wheels}
SITE=${SITE:-/tmp/crc-site}
BUDGET=${BUDGET:-470}
BATCHES=${BATCHES:-1,8,64,256}
DURATION=${DURATION:-1.5}
RESERVE_B=${RESERVE_B:-170} # seconds kept for B while A runs, when B can run
mkdir -p "$RESULTS" "$WORK"
LOG="$RESULTS/gpu_check.log"
SUMMARY="$RESULTS/summary.md"
START=$(date +%s)
FAILED=0
RESERVE=0
BASE_PATH="$PWD/train:$PWD/export:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$SITE/deps:$BASE_PATH" PYTHONUNBUFFERED=1
: >"$LOG"
printf '# gpu_check %s\n\n| step | result | seconds | note |\n|---|---|---|---|\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - START))); }
row() { echo "| $1 | $2 | $3 | $4 |" >>"$SUMMARY"; }
skip() {
    echo "== $1: skipped ($2)" | tee -a "$LOG"
    row "$1" skipped - "$2"
}

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds (less when the budget is short), output
# to the terminal and the log, one row in the summary.
step() {
    local name=$1 cap=$2
    shift 2
    local limit=$(($(left) - RESERVE))
    ((cap < limit)) && limit=$cap
    if ((limit < 10)); then
        skip "$name" "time budget spent (BUDGET=${BUDGET}s)"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local secs=$(($(date +%s) - t0))
    if ((rc == 0)); then
        row "$name" ran "$secs" ""
    elif ((rc == 124 || rc == 137)); then # the budget ran out, not a defect: the log has what it printed
        row "$name" "cut at its time limit" "$secs" "limit ${limit}s (BUDGET, CAP); numbers so far are in the log"
    else
        row "$name" "FAILED (exit $rc)" "$secs" "see $LOG"
        FAILED=1
    fi
}

# What this machine has, as shell variables (a reason string where something is missing, empty if fine).
eval "$("$PY" - <<'EOF'
import importlib.util, shlex, shutil, subprocess
def spec(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
why = {}
smi = shutil.which("nvidia-smi")
gpu = smi and subprocess.run([smi, "-L"], capture_output=True, text=True).returncode == 0
why["NO_GPU"] = "" if gpu else "no NVIDIA GPU here (nvidia-smi is missing or lists none)"
import sys
facts = [f"python {sys.version.split()[0]}"]
why["SYS_ORT_CUDA"] = ""
try:
    import onnxruntime
    facts.append(f"onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
    why["SYS_ORT_CUDA"] = "1" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ""
except ImportError:
    facts.append("onnxruntime missing")
try:
    import torch
    ok = torch.cuda.is_available()
    why["NO_TORCH_CUDA"] = "" if ok else f"torch {torch.__version__} sees no CUDA device"
    facts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {ok})")
except ImportError:
    why["NO_TORCH_CUDA"] = "torch is not installed"
why["NO_CUDA_BINDINGS"] = "" if spec("cuda.bindings") or spec("cuda.cudart") else "cuda-bindings is not installed"
why["NO_MEDMNIST"] = "" if spec("medmnist") else "medmnist is not installed (crc-train reads data through it): carry its wheel with benchmarks/gpu_wheels.sh"
trt = ""
if not spec("tensorrt"):
    trt = ("tensorrt is not installed: its builder wheels download only from NVIDIA's index "
           "(pypi.nvidia.com), which this machine and the registry we use do not reach")
else:
    import tensorrt
    if not hasattr(tensorrt, "Builder"):
        trt = "the installed tensorrt has no builder (PyPI's placeholder or a lean runtime)"
why["NO_TRT"] = trt
facts += [f"{m}: {'installed' if spec(m) else 'missing'}" for m in ("cuda.bindings", "tensorrt", "medmnist")]
why["FACTS"] = "; ".join(facts)
print("\n".join(f"{k}={shlex.quote(v)}" for k, v in why.items()))
EOF
)"
NO_GPU_STEPS=${NO_GPU:-$NO_TORCH_CUDA}

have_ort_gpu() { [ -d "$SITE/ort/onnxruntime" ]; }
have_ort_parts() { compgen -G "$STAGE/onnxruntime_gpu-*.part-*" >/dev/null || compgen -G "$STAGE/onnxruntime_gpu-*.whl" >/dev/null; }

# ---- A: what runs without onnxruntime-gpu --------------------------------------------------------
echo "machine: $FACTS" | tee -a "$LOG"
row machine ran - "$FACTS"
if [ -z "$NO_GPU" ]; then
    step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv
fi
if ! have_ort_gpu && compgen -G "$STAGE/*" >/dev/null; then
    step install-wheels 90 bash benchmarks/gpu_wheels.sh install
    NO_MEDMNIST=$("$PY" -c 'import medmnist' 2>/dev/null && echo "" || echo "$NO_MEDMNIST")
fi
if [ -z "$NO_GPU_STEPS" ] && { have_ort_gpu || [ -n "$SYS_ORT_CUDA" ]; }; then RESERVE=$RESERVE_B; fi

if [ -n "$NO_GPU" ] || [ -n "$NO_CUDA_BINDINGS" ]; then
    skip cuda-bindings "${NO_GPU:-$NO_CUDA_BINDINGS}"
else
    step cuda-bindings 90 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/runtime/test_rt_contract.py
fi

for amp in bf16 fp16; do
    if [ -n "$NO_GPU_STEPS" ] || [ -n "$NO_MEDMNIST" ]; then
        skip "train-$amp" "${NO_GPU_STEPS:-$NO_MEDMNIST}"
        continue
    fi
    step "train-$amp" 75 bash -c "\"$PY\" -m crc_train.cli train --data-source synthetic --data-root \"$WORK/data\" \
        --size 28 --backbone resnet18 --epochs 1 --max-train-pairs 256 --batch-size 64 --device cuda \
        --amp $amp --no-evaluate --log-interval 1 --out \"$WORK/train-$amp\" && cat \"$WORK/train-$amp/metrics.csv\""
done

HARNESS=("$PY" benchmarks/run.py --work "$WORK/bench" --batch-sizes "$BATCHES" --duration "$DURATION"
    --warmup 3 --skip-footprint)
if [ -n "$NO_GPU_STEPS" ] || [ -n "$NO_MEDMNIST" ]; then
    skip harness-torch "${NO_GPU_STEPS:-$NO_MEDMNIST}"
    skip harness-compile "${NO_GPU_STEPS:-$NO_MEDMNIST}"
else
    step harness-torch 240 "${HARNESS[@]}" --out "$RESULTS/harness-torch" --backends torch-eager-fp32,torch-amp-fp16
    step harness-compile 90 "$PY" benchmarks/run.py --work "$WORK/bench" --batch-sizes 64 --duration "$DURATION" \
        --warmup 2 --skip-footprint --out "$RESULTS/harness-compile" --backends torch-compile
fi
RESERVE=0

# ---- B: onnxruntime-gpu ------------------------------------------------------------------------
BUNDLE="$WORK/bench/bundle"
NO_ORT=""
if [ -n "$NO_GPU" ]; then
    NO_ORT=$NO_GPU
else
    if ! have_ort_gpu && have_ort_parts; then
        step install-onnxruntime-gpu 90 bash benchmarks/gpu_wheels.sh install
    fi
    # The carried onnxruntime-gpu, when there is one, goes before the installed onnxruntime; it finds
    # CUDA 13 and cuDNN 9 in the nvidia-* wheels torch brought along.
    if have_ort_gpu; then export PYTHONPATH="$SITE/ort:$SITE/deps:$BASE_PATH"; fi
    NV_LIBS=$("$PY" -c 'import glob, os, sysconfig; print(":".join(sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "lib")))))')
    export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    PROVIDERS=$("$PY" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' 2>&1 | tail -n 1)
    echo "onnxruntime for B: $PROVIDERS" | tee -a "$LOG"
    case "$PROVIDERS" in
    *CUDAExecutionProvider*) ;;
    *) NO_ORT="onnxruntime lists no CUDA provider ($PROVIDERS): carry onnxruntime-gpu's wheel parts (bash benchmarks/gpu_wheels.sh prepare, then one receive command per part) or install onnxruntime-gpu" ;;
    esac
fi
if [ -n "$NO_ORT" ]; then
    for s in harness-ort gpu-tests validate-cuda bench-ort-cuda runtime-tests; do skip "$s" "$NO_ORT"; done
elif [ ! -f "$BUNDLE/manifest.json" ]; then
    for s in harness-ort validate-cuda bench-ort-cuda; do skip "$s" "no bundle in $BUNDLE (the harness builds it; see above)"; done
    step gpu-tests 90 "$PY" -m pytest -q -p no:cacheprovider -rs -m "gpu or trt" tests/runtime
    step runtime-tests 150 "$PY" -m pytest -q -p no:cacheprovider -x tests/runtime
else
    step harness-ort 150 "${HARNESS[@]}" --out "$RESULTS/harness-ort" \
        --backends ort-cuda-fp32,ort-cuda-fp16,ort-cuda-tf32 --e2e-pairs 1024 --e2e-batch 64
    step gpu-tests 90 "$PY" -m pytest -q -p no:cacheprovider -rs -m "gpu or trt" tests/runtime
    step validate-cuda 60 "$PY" -m crc_runtime.cli validate "$BUNDLE" --device cuda
    step bench-ort-cuda 90 "$PY" -m crc_runtime.cli bench --bundle "$BUNDLE" --backend ort-cuda \
        --batch-sizes "$BATCHES" --duration "$DURATION" --warmup-iters 3 --report "$RESULTS/bench-ort-cuda.json"
    step runtime-tests 150 "$PY" -m pytest -q -p no:cacheprovider -x tests/runtime
fi

# ---- C: TensorRT -------------------------------------------------------------------------------
if [ -n "$NO_GPU" ] || [ -n "$NO_TRT" ]; then
    skip tensorrt "${NO_GPU:-$NO_TRT}"
else
    step tensorrt-tests 200 "$PY" -m pytest -q -p no:cacheprovider -rs -m trt tests/runtime tests/export
    step harness-trt 200 "$PY" benchmarks/run.py --work "$WORK/bench-trt" --batch-sizes "$BATCHES" \
        --duration "$DURATION" --skip-footprint --out "$RESULTS/harness-trt" --backends trt-fp16
fi

echo "== done in $(($(date +%s) - START)) s; results in $RESULTS" | tee -a "$LOG"
cat "$SUMMARY"
exit $FAILED
