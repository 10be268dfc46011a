#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh, carried to a GPU machine that cannot download anything.
#
# The borrowed GPU machine has Python 3.12, torch 2.11 (cu130), onnx, onnxruntime (the CPU build) and
# cuda-bindings, but neither onnxruntime-gpu nor medmnist (crc-train reads its data through it), and
# files reach it in pieces of at most 64 MiB per command. So the onnxruntime-gpu wheel (~256 MB) travels
# in 60 MB parts, one per command, and is put back together there:
#
#   here:   bash benchmarks/gpu_wheels.sh prepare     # pip download into wheels/ (git-ignored), split
#   there:  one command per part, carrying wheels/<part> (+ the .sha256 and the small wheels):
#               bash benchmarks/gpu_wheels.sh receive   # moves what was carried to $STAGE, out of the tree
#           then benchmarks/gpu_check.sh installs what $STAGE holds (or: bash benchmarks/gpu_wheels.sh install)
#
# Steps: prepare (download + split), split (only split a wheel already in $WHEELS), receive, assemble
# (join the parts in $STAGE and check the sha256), install (assemble, then pip install --no-deps
# --target: onnxruntime-gpu into $SITE/ort, the small wheels into $SITE/deps; nothing else is touched).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
STAGE=${STAGE:-/tmp/crc-wheels}
SITE=${SITE:-/tmp/crc-site}
PART_BYTES=${PART_BYTES:-60000000}
BIG_SPEC=${BIG_SPEC:-onnxruntime-gpu==1.31.1}
BIG=${BIG:-onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl}
SMALL_SPECS=${SMALL_SPECS:-medmnist==3.0.2}

die() {
    echo "error: $*" >&2
    exit 1
}

split_big() {
    [ -f "$WHEELS/$BIG" ] || die "$WHEELS/$BIG not found; run: bash benchmarks/gpu_wheels.sh prepare"
    rm -f "$WHEELS/$BIG".part-*
    split -b "$PART_BYTES" -d -a 2 "$WHEELS/$BIG" "$WHEELS/$BIG.part-"
    (cd "$WHEELS" && sha256sum "$BIG" >"$BIG.sha256")
    local parts=("$WHEELS/$BIG".part-*) small=()
    for spec in $SMALL_SPECS; do
        small+=("$(ls "$WHEELS"/"${spec%%==*}"-*.whl 2>/dev/null | head -n 1)")
    done
    echo "$BIG: ${#parts[@]} part(s) of at most $PART_BYTES bytes in $WHEELS"
    echo "on the GPU machine, one command per part (each carries one part, the .sha256 and the small wheels):"
    for part in "${parts[@]}"; do
        echo "  carry: $part $WHEELS/$BIG.sha256 ${small[*]}"
        echo "  command: bash benchmarks/gpu_wheels.sh receive"
    done
    echo "then: RESULTS=/tmp/gpu-results bash benchmarks/gpu_check.sh (it installs what was received)"
}

receive() {
    mkdir -p "$STAGE"
    shopt -s nullglob
    local moved=0
    for f in "$WHEELS"/*.part-* "$WHEELS"/*.sha256 "$WHEELS"/*.whl; do
        mv -f "$f" "$STAGE"/
        moved=$((moved + 1))
    done
    echo "received $moved file(s); $STAGE holds: $(cd "$STAGE" && ls | tr '\n' ' ')"
}

assemble() {
    [ -f "$STAGE/$BIG" ] && return 0
    shopt -s nullglob
    local parts=("$STAGE/$BIG".part-*)
    [ ${#parts[@]} -gt 0 ] || die "no part of $BIG in $STAGE; carry them with: bash benchmarks/gpu_wheels.sh receive"
    [ -f "$STAGE/$BIG.sha256" ] || die "$STAGE/$BIG.sha256 missing; carry it with the parts"
    cat "${parts[@]}" >"$STAGE/$BIG.joining" # the glob sorts part-00, part-01, ...
    local want got
    want=$(cut -d' ' -f1 "$STAGE/$BIG.sha256")
    got=$(sha256sum "$STAGE/$BIG.joining" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then
        rm -f "$STAGE/$BIG.joining"
        die "$BIG: the ${#parts[@]} part(s) in $STAGE do not make the wheel (sha256 differs); a part is missing or damaged"
    fi
    mv "$STAGE/$BIG.joining" "$STAGE/$BIG"
    echo "assembled $STAGE/$BIG from ${#parts[@]} part(s), sha256 ok"
}

install() {
    assemble
    shopt -s nullglob
    local small=()
    for whl in "$STAGE"/*.whl; do
        [ "$(basename "$whl")" = "$BIG" ] || small+=("$whl")
    done
    "$PY" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check --upgrade \
        --target "$SITE/ort" "$STAGE/$BIG"
    if [ ${#small[@]} -gt 0 ]; then
        "$PY" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check --upgrade \
            --target "$SITE/deps" "${small[@]}"
    fi
    echo "installed: $SITE/ort ($BIG) and $SITE/deps (${#small[@]} small wheel(s))"
    echo "use: export PYTHONPATH=$SITE/ort:$SITE/deps:\$PYTHONPATH"
}

case "${1:-}" in
prepare)
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" "$BIG_SPEC"
    # shellcheck disable=SC2086  # one argument per spec
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$WHEELS" $SMALL_SPECS
    split_big
    ;;
split) split_big ;;
receive) receive ;;
assemble) assemble ;;
install) install ;;
*)
    echo "usage: bash benchmarks/gpu_wheels.sh prepare|split|receive|assemble|install (see the top of this file)" >&2
    exit 2
    ;;
esac
