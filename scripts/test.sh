#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (CPU is enough).
#   1. .venv-runtime: `pip install '.[slides]'` (the torch-free runtime and its OpenSlide extra) + test tools;
#      runs tests/runtime there, which proves the runtime works with no torch installed.
#   2. .venv: the full install with the train + export + slides extras; runs every test.
# Extra arguments go to the second pytest run (e.g. scripts/test.sh -k export -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

setup_venv() {  # $1 = folder, rest = pip install arguments
    local venv=$1; shift
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

echo "== torch-free runtime environment (.venv-runtime)"
setup_venv .venv-runtime -e ".[slides]" "pytest>=8" "hypothesis>=6.100" "onnx>=1.16" "tifffile>=2023.7"
if .venv-runtime/bin/python -c "import torch" 2>/dev/null; then
    echo "error: torch is importable in .venv-runtime; the runtime must be tested without it" >&2
    exit 1
fi
.venv-runtime/bin/python -m pytest -q -p no:cacheprovider tests/runtime

echo "== full environment with the train + export extras (.venv)"
setup_venv .venv -e ".[export,test,slides]"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
