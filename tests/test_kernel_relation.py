"""Fused Triton relation loss of L-SD (kernels/relation.py) against the PyTorch reference (SPEC 3).

The reference runs in float64 on the same (upcast) inputs; kernel outputs and internal buffers
are poisoned with NaN before the kernels write them.
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


def _run(fn, student, teacher, grad_out, **kwargs):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher, **kwargs)
    (grad,) = torch.autograd.grad(loss, s, grad_out.to(loss.dtype))
    return loss, grad


def _compare(student, teacher, rtol, delta=1.0):
    grad_out = torch.randn((), dtype=torch.float64, device=DEVICE)
    loss, grad = _run(kernels.relation_loss, student, teacher, grad_out, delta=delta)
    ref_loss, ref_grad = _run(ref.relation_loss, student.double(), teacher.double(), grad_out, delta=delta)
    assert loss.dtype == student.dtype and loss.shape == () and grad.dtype == student.dtype
    assert_close_scaled(loss, ref_loss, rtol, "loss")
    assert_close_scaled(grad, ref_grad, rtol, "grad")


def _crops(b, s, c, scale=2.0, dtype=torch.float32):
    r = torch.randn(b, s, c, device=DEVICE) * scale
    o = torch.randn(b, s, c, device=DEVICE) * scale
    if s > 1:
        r[0, 1] = r[0, 0]  # coincident crops: distance sqrt(1e-12), W = 2G/a is huge
        o[0, 1] = o[0, 0]
    if b > 2:
        r[2] = r[1]  # coincident images: batch distance sqrt(1e-12)
    return r.to(dtype), o.to(dtype)


@pytest.mark.parametrize("case_index", [0, 1])
def test_spec_vectors(case_index):
    case = spec_cases()[case_index]
    r = as_tensor(case, "r").requires_grad_()
    loss = kernels.relation_loss(r, as_tensor(case, "o"))
    (grad,) = torch.autograd.grad(loss, r)
    assert loss.item() == pytest.approx(case["relation_loss(r, o)"], rel=FP32_RTOL)
    assert_close_scaled(grad, torch.tensor(case["d_r"], dtype=torch.float64), FP32_RTOL, "grad")


@pytest.mark.parametrize("b,s,c", [
    (1, 1, 20),  # both terms empty: loss 0, gradient 0
    (1, 4, 20),  # no batch term
    (3, 1, 81),  # no crop term
    (3, 4, 1),
    (3, 7, 81),
    pytest.param(64, 4, 20, marks=pytest.mark.slow),
    (3, 4, 1000),
    pytest.param(7, 7, 1000, marks=pytest.mark.slow),
])
def test_matches_reference_fp32(b, s, c):
    r, o = _crops(b, s, c)
    _compare(r, o, FP32_RTOL)


@pytest.mark.parametrize("delta", [0.05, 0.5, 3.0])
def test_huber_delta(delta):
    r, o = _crops(5, 4, 24)
    _compare(r * 3, o, FP32_RTOL, delta=delta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    r, o = _crops(6, 4, 40, dtype=dtype)
    _compare(r, o, LOW_RTOL)


def test_mixed_dtypes_give_the_reference_dtype():
    r, o = _crops(3, 4, 10)
    r = r.to(torch.bfloat16)
    assert kernels.relation_loss(r, o).dtype == ref.relation_loss(r, o).dtype == torch.bfloat16


def test_large_logits():
    r, o = _crops(4, 4, 20, scale=1e3)
    _compare(r, o, FP32_RTOL)


def test_identical_rows_are_finite():
    """All crops and images identical: every distance is sqrt(1e-12); loss and gradient finite."""
    r = torch.ones(3, 4, 10, device=DEVICE, requires_grad=True)
    o = torch.randn(3, 4, 10, device=DEVICE)
    loss = kernels.relation_loss(r, o)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(r.grad).all()
    expected = ref.relation_loss(r.detach().double(), o.double())
    assert loss.item() == pytest.approx(expected.item(), rel=FP32_RTOL)


def test_degenerate_shapes_give_zero():
    r = torch.randn(1, 1, 5, device=DEVICE, requires_grad=True)
    loss = kernels.relation_loss(r, torch.randn(1, 1, 5, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(r.grad, torch.zeros_like(r))


def test_loss_inside_a_larger_graph():
    b, s, c = 4, 3, 9
    x = torch.randn(b, s, c, device=DEVICE, dtype=torch.float64)
    teacher = torch.randn(b, s, c, device=DEVICE, requires_grad=True)

    def objective(fn, dtype):
        leaf = x.detach().clone().requires_grad_()
        student = (torch.sin(leaf) * 3 + leaf).to(dtype)
        loss = fn(student, teacher.to(dtype) if fn is kernels.relation_loss else teacher.detach().to(dtype))
        total = torch.exp(2 * loss) + (student**2).mean()
        return total, torch.autograd.grad(total, leaf)[0]

    total, grad = objective(kernels.relation_loss, torch.float32)
    ref_total, ref_grad = objective(ref.relation_loss, torch.float64)
    assert_close_scaled(total, ref_total, FP32_RTOL, "total")
    assert_close_scaled(grad, ref_grad, FP32_RTOL, "grad")


def test_teacher_never_gets_a_gradient_and_noncontiguous_inputs():
    r = torch.randn(5, 9, 3, device=DEVICE).permute(0, 2, 1).requires_grad_()  # (5, 3, 9), non-contiguous
    o = torch.randn(5, 3, 18, device=DEVICE)[..., ::2].requires_grad_()
    loss = kernels.relation_loss(r, o)
    loss.backward()
    assert o.grad is None
    expected = ref.relation_loss(r.detach().double(), o.detach().double())
    assert loss.item() == pytest.approx(expected.item(), rel=FP32_RTOL)


def test_bad_arguments():
    r = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="student"):
        kernels.relation_loss(r[0], r[0])
    with pytest.raises(ValueError, match="teacher"):
        kernels.relation_loss(r, r[:, :2])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kernels.relation_loss(r.double(), r.double())
    with pytest.raises(ValueError, match="delta"):
        kernels.relation_loss(r, r, delta=0.0)


@pytest.mark.parametrize("b,s,c", [(64, 4, 20), (128, 4, 80), (32, 16, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@cuda_only[0]
@cuda_only[1]
def test_training_shapes_cuda(b, s, c, dtype):
    r, o = _crops(b, s, c, dtype=dtype)
    _compare(r, o, FP32_RTOL if dtype == torch.float32 else LOW_RTOL)
