"""Shared helpers of the Triton kernel tests (test_kernel_*.py, test_compile_ops.py).

Without CUDA the kernels run on CPU tensors in the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# The repository's copy of SPEC's float64 vectors (tests/test_spec_data.py checks it against ../shared).
SPEC_VECTORS = Path(__file__).resolve().parent / "data" / "spec_vectors.json"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Compiled Triton (a CUDA run without TRITON_INTERPRET) and the interpreter (numpy) round differently.
COMPILED_TRITON = DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

# fp32 tolerances of the kernel tests are set for the interpreter and scaled by GPU_ERROR_FACTOR for
# compiled Triton. Derivation: a kernel and its reference comparison run the same sequence of float32
# operations on either backend, so to first order the error is sum_i kappa_i * u_i, with kappa_i the
# sensitivity of the result to op i (the same for both) and u_i the relative error of op i. Under the
# interpreter every op is numpy float32, correctly rounded: u <= 2^-24. Compiled for NVIDIA GPUs,
# tl.exp is ex2.approx.f32 of x*log2(e) (<= 2 ulp from the rounded result, so <= 2.5 ulp = 5 * 2^-24
# from the exact one, plus the rounding of x*log2(e), which for the shifted arguments exp(v - max)
# these kernels use adds at most |d| e^-d * 2^-24 <= 0.37 * 2^-24 relative to the largest term),
# float32 '/' is div.full.f32 (<= 2 ulp) and tl.sqrt is sqrt.approx.ftz.f32 (<= 2^-23): u <= 6 * 2^-24.
# Hence every bound is multiplied by u_gpu / u_interp = 6 on the GPU. bfloat16/float16 tolerances are
# set by the input rounding (2^-9, 2^-12), which this does not change.
GPU_ERROR_FACTOR = 6.0


def fp32_rtol(interpreter_rtol: float) -> float:
    """An fp32 kernel tolerance stated for the interpreter, scaled for compiled Triton (see above)."""
    return interpreter_rtol * (GPU_ERROR_FACTOR if COMPILED_TRITON else 1.0)


cuda_only = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]

# Masked-off lanes of the interpreted kernels compute log(0), exp(inf) or inf - inf (numpy warns); the
# results are discarded by masks, and on a GPU nobody sees them.
ignore_interpreter_nan_warnings = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def spec_cases() -> list[dict]:
    if not SPEC_VECTORS.exists():
        pytest.fail(f"spec vectors not found at {SPEC_VECTORS} (they are part of the repository)")
    return json.loads(SPEC_VECTORS.read_text())["cases"]


def as_tensor(case: dict, key: str, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(case[key], dtype=dtype, device=DEVICE)


def targets_with_edge_rows(b: int, c: int, p: float = 0.3, dtype=torch.float32) -> torch.Tensor:
    """Random 0/1 targets; row 0 has no positive and row 1 (if any) is all positive (SPEC 1 edge rows)."""
    y = (torch.rand(b, c, device=DEVICE) < p).to(dtype)
    y[0] = 0
    if b > 1:
        y[1] = 1
    return y


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN (floats) or 127 (int8), so an unwritten element shows."""
    from mskd_fast.kernels import _utils

    monkeypatch.setattr(_utils, "POISON_OUTPUTS", True)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """``|actual - expected| <= rtol * (|expected| + max|expected|)`` elementwise, and ``actual`` finite.

    The error of a row-wise reduction in float32 scales with the largest entries it combines, so
    entries far below the maximum are checked against the tensor's scale, not their own size.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    scale = expected.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale), msg=lambda m: f"{what}: {m}")
