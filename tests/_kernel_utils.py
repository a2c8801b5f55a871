"""Shared helpers of the Triton kernel tests (test_kernel_*.py, test_compile_ops.py).

Without CUDA the kernels run on CPU tensors in the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# The repository's copy of SPEC's float64 vectors (tests/test_spec_data.py checks it against ../shared).
SPEC_VECTORS = Path(__file__).resolve().parent / "data" / "spec_vectors.json"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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
