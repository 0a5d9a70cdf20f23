#!/usr/bin/env bash
# The one prepared script a GPU session runs on the device machine: a copy of this repository, Python with
# torch and triton, no package registry (pytest, safetensors and numpy may be missing).
#
#   bash benchmarks/run_gpu.sh          # results under $OUT (default: /tmp/adaptr-gpu-results)
#
# 1. environment: nvidia-smi, Python / torch / triton versions          -> $OUT/env.txt
# 2. tests/kernels compiled on the GPU, when pytest is there           -> $OUT/pytest-kernels.log
#    (--noconftest: tests/conftest.py needs the service layer; the kernel tests use no fixture of it.
#    test_backend.py drives the CLI and is left out. TRITON_INTERPRET=0, because tests/conftest.py and
#    tests/kernel_checks.py default it to 1 and the kernels must compile for the GPU.)
# 3. python benchmarks/gpu_kernels.py --quick                           -> $OUT/benchmarks.md, gpu_kernels.json/.log
#
# Time: the kernel tests stop after PYTEST_TIMEOUT (120 s); the benchmark skips what is left after
# BENCH_DEADLINE (270 s) and still writes its table; the whole script stays under ~7 minutes.
# DRY_RUN=1 rehearses the plumbing on a machine without a GPU (interpreter, --dry-run).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-${TMPDIR:-/tmp}/adaptr-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$REPO:$REPO/plugins${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
MODE=--quick
if [ "${DRY_RUN:-0}" = 1 ]; then
    export TRITON_INTERPRET=1
    MODE=--dry-run
fi
export PYTHONUNBUFFERED=1
START=$(date +%s)

{
    date -u
    nvidia-smi || true
    "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"); print("triton", triton.__version__)'
    for mod in pytest numpy safetensors; do
        "$PY" -c "import $mod; print('$mod', $mod.__version__)" 2>/dev/null || echo "$mod: not installed"
    done
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if "$PY" -c 'import pytest' 2>/dev/null; then
    echo "== tests/kernels on the GPU (at most ${PYTEST_TIMEOUT:-120} s)"
    timeout -s INT -k 15 "${PYTEST_TIMEOUT:-120}" "$PY" -m pytest tests/kernels -q -rfE --noconftest \
        --ignore=tests/kernels/test_backend.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest-kernels.log"
    echo "pytest exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest-kernels.log"
else
    echo "pytest is not installed here: tests/kernels skipped (the benchmark's check column still compares" \
        "every kernel with its torch twin)" | tee "$OUT/pytest-kernels.log"
fi

echo "== benchmarks/gpu_kernels.py $MODE (after $(( $(date +%s) - START )) s)"
timeout -s KILL "$(( ${BENCH_DEADLINE:-270} + 90 ))" "$PY" benchmarks/gpu_kernels.py "$MODE" \
    --deadline "${BENCH_DEADLINE:-270}" --out "$OUT/benchmarks.md" --json "$OUT/gpu_kernels.json" \
    2>&1 | tee "$OUT/gpu_kernels.log"
status=${PIPESTATUS[0]}
echo "benchmark exit status: $status; total $(( $(date +%s) - START )) s" | tee -a "$OUT/gpu_kernels.log"
exit "$status"
