#!/usr/bin/env bash
# One-shot check for a lent GPU machine (torch preinstalled, no network, no DALI):
#   1. build the extension mskd_fast._C in place (CUDA part for the local card),
#   2. install the package editable without dependencies (offline),
#   3. run the CUDA tests (pytest -m cuda),
#   4. run the whole benchmark suite and print one markdown table (bench/report.py).
# Everything it writes goes to $OUT (or ./gpu_check_out). Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
export MSKD_FAST_BUILD_CUDA=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
  export TORCH_CUDA_ARCH_LIST
fi
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
git rev-parse --short HEAD 2>/dev/null || true

step "build + install (editable, no deps)"
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c 'import mskd_fast, json; print(json.dumps(mskd_fast.info(), indent=1, default=str))'

step "CUDA tests"
timeout 240 $PY -m pytest -m cuda tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT_DIR/cuda_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks"
timeout 270 $PY -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT_DIR/bench.json" --benchmark-max-time=0.5 --benchmark-min-rounds=5 \
  2>&1 | tail -8 >"$OUT_DIR/bench_tail.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cat "$OUT_DIR/bench_tail.log"

step "report"
$PY bench/report.py "$OUT_DIR/bench.json" --versions --title "GPU benchmark ($(date +%F))" | tee "$OUT_DIR/report.md"
echo "exit status: $status"
exit $status
