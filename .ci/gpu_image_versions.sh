#!/usr/bin/env bash
# The GPU image's torch / torchvision / Triton (constraints-gpu-image.txt) on this CPU machine, so
# that API drift against the versions in constraints.txt shows up in CI and not on the lent GPU.
#
# A second virtual environment outside the tree; the project is installed (editable, CPU extension
# only) into a *copy* of the checkout, because an editable install here would replace the
# extension that .venv built against its own torch. Then the kernel, op, compile and step tests
# run there, on CPU with the Triton interpreter; test_kernel_codegen.py also compiles every kernel
# for sm_90 with this Triton (the one the GPU machine launches with) and checks for spills.
#
# Usage: bash .ci/gpu_image_versions.sh [extra pytest args]
# MSKD_GPU_IMAGE_DIR (default /tmp/mskd-fast-gpu-image) holds the venv (reused while its versions
# match) and the copy (replaced every run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${MSKD_GPU_IMAGE_DIR:-/tmp/mskd-fast-gpu-image}
VENV=$WORK/venv
SRC=$WORK/src/repo
PIP_FLAGS=(-q --disable-pip-version-check)
WANT=$(grep -E '^(torch|torchvision|triton)==' constraints-gpu-image.txt | sort | tr '\n' ' ')
start=$SECONDS

have=$("$VENV/bin/python" - 2>/dev/null <<'PY' || true
import importlib.metadata as m
print(" ".join(sorted(f"{p}=={m.version(p)}" for p in ("torch", "torchvision", "triton"))) + " ")
PY
)
if [ "$have" != "$WANT" ]; then
    echo "gpu-image venv: creating $VENV ($WANT)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install "${PIP_FLAGS[@]}" -c constraints-gpu-image.txt torch torchvision triton
fi
"$VENV/bin/pip" install "${PIP_FLAGS[@]}" -c constraints-gpu-image.txt --upgrade pip "setuptools>=77,<82" wheel ninja numpy

rm -rf "$WORK/src"
mkdir -p "$SRC"
# Tracked and untracked-but-not-ignored files, as in the working tree (no .venv, build or _C*.so).
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null \
    | tar -xf - -C "$SRC"
if [ -d "$ROOT/../shared" ]; then ln -s "$(cd "$ROOT/../shared" && pwd)" "$WORK/src/shared"; fi

cd "$SRC"
MSKD_FAST_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install "${PIP_FLAGS[@]}" --no-build-isolation \
    -c constraints-gpu-image.txt -e '.[dev]'
"$VENV/bin/python" -c "import torch, torchvision, triton; print('gpu-image venv: torch', torch.__version__, \
'torchvision', torchvision.__version__, 'triton', triton.__version__)"
echo "gpu-image venv: ready after $((SECONDS - start)) s"
# Triton 3.6's interpreter converts 1-element arrays with int() (numpy < 2.4 warns once per launch).
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -W "ignore:Conversion of an array with ndim:DeprecationWarning" \
    tests/test_kernel_*.py tests/test_ops_api.py tests/test_compile_ops.py tests/test_step.py "$@"
echo "gpu-image venv: done after $((SECONDS - start)) s"
