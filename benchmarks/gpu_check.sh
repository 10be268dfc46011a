#!/usr/bin/env bash
# Every GPU check in one call, for a machine with an NVIDIA GPU (e.g. a lent H100):
#   1. what the machine has (nvidia-smi, onnxruntime providers, tensorrt, cuda-bindings, torch CUDA);
#   2. the gpu / trt tests of the runtime and the exporter (they skip themselves, with the reason, when a
#      piece is missing, so the output says exactly what ran);
#   3. the benchmark harness on every backend and batch size, plus the end-to-end folder run at batch 64;
#   4. crc-infer bench on the bundle the harness built, for each GPU backend, with JSON reports.
# Results land in $OUT (default benchmarks/results-gpu). Needs an environment with the project installed
# with its train + export + test extras and the GPU packages:
#   pip install -e '.[export,test,trt]' && pip uninstall -y onnxruntime && pip install onnxruntime-gpu
# (onnxruntime and onnxruntime-gpu install the same module: keep only one; see docs/runtime.md, "GPU extras"). Offline,
# point WHEELS at a folder of wheels and they are installed from there first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results-gpu}
BATCHES=${BATCHES:-1,8,32,64,128,256}
DURATION=${DURATION:-5}
mkdir -p "$OUT"
status=0

if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "== installing wheels from $WHEELS"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl || status=1
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
"$PY" - <<'EOF'
import importlib.util
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
for mod in ("tensorrt", "cuda.bindings", "torch"):
    try:
        found = importlib.util.find_spec(mod) is not None
    except ImportError:
        found = False
    print(mod, "installed" if found else "MISSING")
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    pass
EOF

echo "== GPU tests (gpu / trt markers; skips say why)"
"$PY" -m pytest -q -p no:cacheprovider -rs -m "gpu or trt" tests/runtime tests/export \
    2>&1 | tee "$OUT/gpu_tests.txt" || status=1

echo "== benchmark harness"
"$PY" benchmarks/run.py --out "$OUT" --batch-sizes "$BATCHES" --duration "$DURATION" \
    --backends torch-eager-fp32,torch-amp-fp16,torch-compile,ort-cuda-fp32,ort-cuda-fp16,trt-fp16,ort-cpu \
    --e2e-pairs 4096 --e2e-batch 64 --skip-footprint 2>&1 | tee "$OUT/harness.txt" || status=1

BUNDLE=${BUNDLE:-${TMPDIR:-/tmp}/crc-fusion-bench/bundle}
for backend in trt ort-cuda; do
    echo "== crc-infer bench --backend $backend"
    "$PY" -m crc_runtime.cli bench --bundle "$BUNDLE" --backend "$backend" --batch-sizes "$BATCHES" \
        --duration "$DURATION" --report "$OUT/bench-$backend.json" 2>&1 | tee "$OUT/bench-$backend.txt"
done
echo "== crc-infer bench --backend trt --cuda-graphs"
"$PY" -m crc_runtime.cli bench --bundle "$BUNDLE" --backend trt --cuda-graphs --batch-sizes "$BATCHES" \
    --duration "$DURATION" --report "$OUT/bench-trt-graphs.json" 2>&1 | tee "$OUT/bench-trt-graphs.txt"

echo "== results in $OUT (results.md holds the table for benchmarks/RESULTS.md)"
exit $status
