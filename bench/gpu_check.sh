#!/usr/bin/env bash
# One-shot check for a lent GPU machine (torch preinstalled, no network, no DALI), and its CPU rehearsal:
#   bash bench/gpu_check.sh              # on the GPU machine: phase 1 (build, kernel/op/crop/ROI tests,
#                                        # trainer-step benchmark), then phase 2 (other CUDA tests, benchmarks)
#   bash bench/gpu_check.sh --rehearse   # the same phases on CPU (Triton interpreter, CPU benchmark twins)
# Writes gpu_check_summary.md and gpu_check_logs.tar.gz to $OUT (or ./gpu_check_out), whatever fails.
# The logic lives in bench/gpu_check.py (`--help` lists the options); PYTHON selects the interpreter
# (default: python3, or .venv/bin/python for --rehearse when it exists).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  PY=python3
  case " $* " in *" --rehearse "*) [ -x .venv/bin/python ] && PY=.venv/bin/python ;; esac
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py --python "$PY" "$@"
