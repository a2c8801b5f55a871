"""Triton reconstruction of R-SD (kernels/graph.py) against the PyTorch reference (SPEC 4).

Pseudo labels are a discrete batch-wide selection, so the kernel must reproduce the reference's
ranking exactly (stable sort, ties to the lower flat index); the propagation and crop softmax are
compared in float64. Outputs and the internal label buffer are poisoned before the kernels run.
"""

import pytest
import torch
from _kernel_utils import (
    DEVICE,
    as_tensor,
    assert_close_scaled,
    cuda_only,
    fp32_rtol,
    ignore_interpreter_nan_warnings,
    poisoned_outputs,  # noqa: F401 - fixture
    spec_cases,
)

from mskd_fast import kernels
from mskd_fast import reference as ref

pytestmark = [pytest.mark.usefixtures("poisoned_outputs"), ignore_interpreter_nan_warnings]

FP32_RTOL = fp32_rtol(1e-5)
LOW_RTOL = 1e-2


def _inputs(b, s, c, dtype=torch.float32, p=0.3):
    o = torch.randn(b, s, c, device=DEVICE) * 2
    q = torch.randn(b, c, device=DEVICE) * 2
    if b > 1 and s > 1:
        o[1, 1] = o[1, 0]  # coincident crops
    if b > 2:
        o[2] = 0.5  # one image whose crops are all equal: zero adjacency maximum, and many tied deltas
        q[2] = 0.5
    y = (torch.rand(b, c, device=DEVICE) < p).float()
    return o.to(dtype), q.to(dtype), y


def _expected(o, q, y, layers, k):
    """Reference z with the labels ranked in the inputs' own dtype and the rest in float64."""
    if k is None:
        k = ref.default_k(y, o.shape[1])
    u = ref.pseudo_labels(o, q, k)
    weights = torch.softmax(ref.propagate(o.double(), u, layers), dim=1)
    return (weights * o.double()).sum(dim=1)


@pytest.mark.parametrize("case_index", [0, 1])
def test_spec_vectors(case_index):
    case = spec_cases()[case_index]
    z = kernels.reconstruct_logits(as_tensor(case, "o"), as_tensor(case, "q"), as_tensor(case, "targets"), layers=2)
    expected = torch.tensor(case["reconstruct_logits(o, q, targets, layers=2)"], dtype=torch.float64)
    assert_close_scaled(z, expected, FP32_RTOL, "z")


@pytest.mark.parametrize("b,s,c", [(1, 1, 20), (1, 4, 1), (3, 1, 81), (3, 4, 20), (3, 7, 81), (64, 4, 20),
                                   (3, 4, 1000), (2, 16, 33)])
@pytest.mark.parametrize("layers", [0, 2])
def test_matches_reference_fp32(b, s, c, layers):
    o, q, y = _inputs(b, s, c)
    z = kernels.reconstruct_logits(o, q, y, layers=layers)
    assert z.dtype == o.dtype and z.shape == (b, c)
    assert_close_scaled(z, ref.reconstruct_logits(o.double(), q.double(), y, layers=layers), FP32_RTOL, "z")


@pytest.mark.parametrize("k", [0, 1, 7, 50, 60, 10**9, "tensor", "cpu tensor"])
def test_explicit_k(k):
    """k as int (incl. 0, 2k > N and k > N, clamped) or as a 0-dim tensor, on any device."""
    b, s, c = 4, 3, 10
    o, q, y = _inputs(b, s, c)
    if k == "tensor":
        k = torch.tensor(33, device=DEVICE)
    elif k == "cpu tensor":
        k = torch.tensor(17, dtype=torch.int32)
    z = kernels.reconstruct_logits(o, q, y, layers=3, k=k)
    assert_close_scaled(z, _expected(o, q, y, 3, k), FP32_RTOL, "z")


def test_ties_follow_the_reference_rank():
    """Every delta equal: labels go by flat index, so only a stable ranking reproduces the reference."""
    b, s, c = 3, 4, 5
    o = torch.zeros(b, s, c, device=DEVICE)
    o[:, :, 0] = torch.arange(s, dtype=torch.float32, device=DEVICE)  # distinct crops, ties elsewhere
    q = torch.zeros(b, c, device=DEVICE)
    y = torch.zeros(b, c, device=DEVICE)
    y[0, :2] = 1
    for layers in (0, 1):
        z = kernels.reconstruct_logits(o, q, y, layers=layers)
        assert_close_scaled(z, _expected(o, q, y, layers, None), FP32_RTOL, "z")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    o, q, y = _inputs(5, 4, 30, dtype=dtype)
    z = kernels.reconstruct_logits(o, q, y)
    assert z.dtype == dtype
    assert_close_scaled(z, _expected(o, q, y, 2, None), LOW_RTOL, "z")


def test_mixed_input_dtypes_rank_in_the_promoted_dtype():
    o, q, y = _inputs(3, 4, 12, dtype=torch.bfloat16)
    q = q.float() + torch.randn_like(q.float()) * 1e-3
    z = kernels.reconstruct_logits(o, q, y, layers=1)
    assert_close_scaled(z, _expected(o, q, y, 1, None), LOW_RTOL, "z")


@pytest.mark.parametrize("targets_dtype", [torch.bool, torch.uint8, torch.int64])
def test_target_dtypes(targets_dtype):
    o, q, y = _inputs(3, 4, 9)
    expected = kernels.reconstruct_logits(o, q, y)
    torch.testing.assert_close(kernels.reconstruct_logits(o, q, y.to(targets_dtype)), expected)


def test_large_logits_and_no_gradient():
    o, q, y = _inputs(3, 4, 16)
    o = (o * 500).requires_grad_()
    q = (q * 500).requires_grad_()
    z = kernels.reconstruct_logits(o, q, y)
    assert not z.requires_grad
    assert_close_scaled(z, _expected(o.detach(), q.detach(), y, 2, None), FP32_RTOL, "z")


def test_noncontiguous_inputs():
    o = torch.randn(4, 12, 3, device=DEVICE).permute(0, 2, 1)  # (4, 3, 12)
    q = torch.randn(12, 4, device=DEVICE).t()
    y = (torch.rand(4, 12, device=DEVICE) < 0.3).float()
    z = kernels.reconstruct_logits(o, q, y, layers=2)
    assert_close_scaled(z, ref.reconstruct_logits(o.double(), q.double(), y, layers=2), FP32_RTOL, "z")


def test_bad_arguments():
    o, q, y = _inputs(2, 3, 4)
    with pytest.raises(ValueError, match="patch_logits"):
        kernels.reconstruct_logits(o[0], q, y)
    with pytest.raises(ValueError, match="logits"):
        kernels.reconstruct_logits(o, q[:, :3], y)
    with pytest.raises(ValueError, match="targets"):
        kernels.reconstruct_logits(o, q, y[:1])
    with pytest.raises(ValueError, match="layers"):
        kernels.reconstruct_logits(o, q, y, layers=-1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        kernels.reconstruct_logits(o, q, y, k=-1)
    with pytest.raises(TypeError, match="k must be"):
        kernels.reconstruct_logits(o, q, y, k=2.5)
    with pytest.raises(TypeError, match="k must be"):
        kernels.reconstruct_logits(o, q, y, k=torch.tensor(2.0))


@pytest.mark.parametrize("b,s,c", [(64, 4, 20), (128, 4, 80), (32, 16, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@cuda_only[0]
@cuda_only[1]
def test_training_shapes_cuda(b, s, c, dtype):
    o, q, y = _inputs(b, s, c, dtype=dtype, p=0.05)
    z = kernels.reconstruct_logits(o, q, y)
    assert_close_scaled(z, _expected(o, q, y, 2, None), FP32_RTOL if dtype == torch.float32 else LOW_RTOL, "z")
