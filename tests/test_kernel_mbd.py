"""Fused Triton MBD loss (kernels/mbd.py) against the PyTorch reference (SPEC 1-2).

The reference runs in float64 on the same (upcast) inputs, so the comparison measures the
kernel's float32 arithmetic only. Every kernel output is poisoned with NaN before it is written.
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
    targets_with_edge_rows,
)

from mskd_fast import kernels
from mskd_fast import reference as ref

pytestmark = [pytest.mark.usefixtures("poisoned_outputs"), ignore_interpreter_nan_warnings]

FP32_RTOL = fp32_rtol(1e-5)
LOW_RTOL = 1e-2


def _run(fn, student, teacher, targets, grad_out=None, **kwargs):
    """Loss and d loss / d student for upstream gradient ``grad_out`` (random when None)."""
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher, targets, **kwargs)
    if grad_out is None:
        grad_out = torch.randn(loss.shape, dtype=torch.float64, device=loss.device)
    (grad,) = torch.autograd.grad(loss, s, grad_out.to(loss.dtype))
    return loss, grad, grad_out


def _loss_mass(student, teacher, targets, temperature=4.0, omega=0.5, gamma_pos=0.25, gamma_neg=1.0,
               weight_grad=False, reduction="mean", form="divergence"):
    """``T**2 * reduce_i sum_j w P (|log P| + |log Q|)`` (``+ w (P + Q)`` for the divergence form).

    The size of the terms the loss sums: ``log P - log Q`` is a difference of float32
    log-probabilities (and the divergence adds ``-P + Q``), so the loss, which can cancel to nearly
    0, carries an absolute rounding error proportional to this mass, not to its own value.
    """
    pos = targets > 0.5
    log_p = ref.log_reformulated_softmax(teacher.double() / temperature, targets)
    log_q = ref.log_reformulated_softmax(student.double() / temperature, targets)
    p, q = log_p.exp(), log_q.exp()
    gap = torch.where(pos, (1 - omega) + omega * p - q, omega * p - q).abs()
    w = gap ** torch.where(pos, torch.full_like(p, gamma_pos), torch.full_like(p, gamma_neg))
    terms = p * (log_p.abs() + log_q.abs())
    if form == "divergence":
        terms = terms + p + q
    per_row = (w * terms).sum(-1) * temperature**2
    return {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]


def _compare(student, teacher, targets, rtol, **kwargs):
    loss, grad, grad_out = _run(kernels.mbd_loss, student, teacher, targets, **kwargs)
    ref_loss, ref_grad, _ = _run(ref.mbd_loss, student.double(), teacher.double(), targets, grad_out, **kwargs)
    assert loss.dtype == student.dtype and grad.dtype == student.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    mass = _loss_mass(student, teacher, targets, **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=fp32_rtol(1e-7) * mass.max().item() + 1e-12)
    assert_close_scaled(grad, ref_grad, rtol, "grad")


# (form, weight_grad) -> (loss key, gradient key) in the spec vectors; keys naming no form are "paper".
_SPEC_KEYS = {
    ("paper", False): ("mbd_loss(student, teacher, targets)", "d_student"),
    ("paper", True): ("mbd_loss(..., weight_grad=True)", "d_student_weight_grad"),
    ("divergence", False): ("mbd_loss(..., form='divergence')", "d_student_divergence"),
    ("divergence", True): ("mbd_loss(..., form='divergence', weight_grad=True)", "d_student_divergence_weight_grad"),
}


@pytest.mark.parametrize("case_index", [0, 1])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("form", ["paper", "divergence"])
def test_spec_vectors(case_index, weight_grad, form):
    case = spec_cases()[case_index]
    student = as_tensor(case, "student").requires_grad_()
    loss = kernels.mbd_loss(student, as_tensor(case, "teacher"), as_tensor(case, "targets"), weight_grad=weight_grad,
                            form=form)
    (grad,) = torch.autograd.grad(loss, student)
    loss_key, grad_key = _SPEC_KEYS[form, weight_grad]
    assert loss.item() == pytest.approx(case[loss_key], rel=FP32_RTOL)
    expected = torch.tensor(case[grad_key], dtype=torch.float64)
    assert_close_scaled(grad, expected, FP32_RTOL, "grad")


def test_default_form_is_divergence():
    case = spec_cases()[0]
    args = (as_tensor(case, "student"), as_tensor(case, "teacher"), as_tensor(case, "targets"))
    assert kernels.mbd_loss(*args).item() == kernels.mbd_loss(*args, form="divergence").item()


_SMALL_SHAPES = [(1, 1), (3, 1), (1, 20), (3, 20), (64, 81), (3, 1000)]
_CASES = [(b, c, red, wg) for b, c in _SMALL_SHAPES for red in ("mean", "sum", "none") for wg in (False, True)]
_CASES += [(64, 1000, "mean", False), (64, 1000, "none", True)]  # the widest rows: not the full cross product


FORMS = pytest.mark.parametrize("form", ["divergence", "paper"])


@FORMS
@pytest.mark.parametrize("b,c,reduction,weight_grad", _CASES)
def test_matches_reference_fp32(b, c, reduction, weight_grad, form):
    student = torch.randn(b, c, device=DEVICE) * 3
    teacher = torch.randn(b, c, device=DEVICE) * 3
    _compare(student, teacher, targets_with_edge_rows(b, c), FP32_RTOL, reduction=reduction, weight_grad=weight_grad,
             form=form)


@pytest.mark.parametrize("hyper", [
    dict(temperature=1.0, omega=0.0, gamma_pos=0.0, gamma_neg=0.0),
    dict(temperature=2.5, omega=1.0, gamma_pos=2.0, gamma_neg=0.5),
    dict(temperature=7.0, omega=0.3, gamma_pos=1.0, gamma_neg=3.0, weight_grad=True),
])
@FORMS
def test_hyperparameters(hyper, form):
    b, c = 5, 33
    student, teacher = torch.randn(b, c, device=DEVICE), torch.randn(b, c, device=DEVICE)
    _compare(student, teacher, targets_with_edge_rows(b, c), FP32_RTOL, form=form, **hyper)


@FORMS
@pytest.mark.parametrize("c", [4096, 4097, 9000])
def test_wide_rows_loop_over_column_blocks(c, form):
    """C > 4096 takes the multi-pass path (online logsumexp over column blocks); 4096 is the widest register row."""
    from mskd_fast.kernels import mbd

    b = 3
    assert mbd._launch_config(b, c)[2] == (c <= 4096)
    student, teacher = torch.randn(b, c, device=DEVICE) * 4, torch.randn(b, c, device=DEVICE) * 4
    for weight_grad in (False, True):
        _compare(student, teacher, targets_with_edge_rows(b, c, p=0.01), FP32_RTOL, weight_grad=weight_grad,
                 reduction="none", form=form)


@FORMS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,c", [(3, 20), (64, 81), (4, 1000)])
def test_half_precision_inputs(dtype, b, c, form):
    student = (torch.randn(b, c, device=DEVICE) * 3).to(dtype)
    teacher = (torch.randn(b, c, device=DEVICE) * 3).to(dtype)
    _compare(student, teacher, targets_with_edge_rows(b, c), LOW_RTOL, reduction="sum", form=form)


def test_mixed_dtypes_promote_like_the_reference():
    b, c = 4, 30
    student = torch.randn(b, c, device=DEVICE).to(torch.bfloat16).requires_grad_()
    teacher = torch.randn(b, c, device=DEVICE)
    y = targets_with_edge_rows(b, c)
    loss = kernels.mbd_loss(student, teacher, y)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.dtype == ref.mbd_loss(student, teacher, y).dtype == torch.float32
    assert grad.dtype == torch.bfloat16
    ref_loss = ref.mbd_loss(student.double(), teacher.double(), y)
    (ref_grad,) = torch.autograd.grad(ref_loss, student)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=FP32_RTOL, abs=fp32_rtol(1e-7))
    assert_close_scaled(grad, ref_grad, LOW_RTOL, "grad")


@FORMS
@pytest.mark.parametrize("magnitude", [1e3, 1e4])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_extreme_logits_stay_finite(magnitude, weight_grad, form):
    b, c = 6, 20
    student = torch.randn(b, c, device=DEVICE).sign() * magnitude
    teacher = torch.randn(b, c, device=DEVICE) * magnitude
    student[2, :3] = -magnitude  # positives far below the negatives and the reverse
    student[3] = magnitude
    y = targets_with_edge_rows(b, c)
    loss, grad, grad_out = _run(kernels.mbd_loss, student, teacher, y, weight_grad=weight_grad, reduction="none",
                                form=form)
    ref_loss, ref_grad, _ = _run(ref.mbd_loss, student.double(), teacher.double(), y, grad_out,
                                 weight_grad=weight_grad, reduction="none", form=form)
    # Log-probabilities reach -1e4/T * 2 here; float32 (and the float32 reference) resolve them to ~5e-4.
    assert_close_scaled(loss, ref_loss, fp32_rtol(2e-3), "loss")
    assert_close_scaled(grad, ref_grad, fp32_rtol(2e-3), "grad")


@FORMS
def test_edge_rows_exact(form):
    """No positive: plain softmax KD; all positive: RS = 1/C, zero loss and zero gradient.

    Without weights the divergence form equals the paper form (``sum_j (Q_j - P_j) = 0``), so both are KD.
    """
    b, c = 3, 7
    student, teacher = torch.randn(b, c, device=DEVICE), torch.randn(b, c, device=DEVICE)
    y = torch.zeros(b, c, device=DEVICE)
    y[1] = 1
    y[2, 3] = 1
    loss, grad, _ = _run(kernels.mbd_loss, student, teacher, y, torch.ones(b, dtype=torch.float64, device=DEVICE),
                         reduction="none", gamma_pos=0.0, gamma_neg=0.0, form=form)
    assert loss[1].item() == 0.0
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    kd = ref.kd_loss(student[:1].double(), teacher[:1].double(), reduction="none")
    assert loss[0].item() == pytest.approx(kd.item(), rel=FP32_RTOL)


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("b,c", [(6, 20), (3, 4096), (3, 9000)])
def test_divergence_zero_gradient_at_student_equals_teacher(b, c, weight_grad):
    """SPEC 2: the divergence form has loss 0 and gradient exactly 0 where ``student == teacher``.

    Random rows plus the edge rows (row 0 no positive, row 1 all positive), both kernel paths.
    """
    student = torch.randn(b, c, device=DEVICE) * 3
    y = targets_with_edge_rows(b, c, p=0.1)
    loss, grad, _ = _run(kernels.mbd_loss, student, student.clone(), y, weight_grad=weight_grad, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    assert torch.equal(grad, torch.zeros_like(grad)), grad.abs().max()
    # The paper form is not stationary there (its gradient is -w P through the Jacobian).
    _, paper_grad, _ = _run(kernels.mbd_loss, student, student.clone(), y, weight_grad=weight_grad,
                            reduction="none", form="paper")
    assert paper_grad.abs().max() > 1e-4 / c


@pytest.mark.parametrize("weight_grad", [False, True])
def test_divergence_is_nonnegative(weight_grad):
    """Every term ``w (P log(P/Q) - P + Q)`` is >= 0; per row only float32 rounding (<< mass) may go below."""
    b, c = 64, 81
    student, teacher = torch.randn(b, c, device=DEVICE) * 3, torch.randn(b, c, device=DEVICE) * 3
    teacher[2:8] = student[2:8] + 1e-3 * torch.randn(6, c, device=DEVICE)  # rows close to 0
    y = targets_with_edge_rows(b, c)
    loss = kernels.mbd_loss(student, teacher, y, weight_grad=weight_grad, reduction="none")
    mass = _loss_mass(student, teacher, y, weight_grad=weight_grad, reduction="none")
    assert (loss.double() >= -fp32_rtol(1e-6) * mass).all(), loss.min()
    paper = kernels.mbd_loss(student, teacher, y, weight_grad=weight_grad, reduction="none", form="paper")
    assert (paper < 0).any()  # the paper form is no divergence: the same rows go negative


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float64])
def test_target_dtypes(dtype):
    b, c = 4, 10
    student, teacher = torch.randn(b, c, device=DEVICE), torch.randn(b, c, device=DEVICE)
    y = targets_with_edge_rows(b, c)
    expected = kernels.mbd_loss(student, teacher, y, reduction="none")
    torch.testing.assert_close(kernels.mbd_loss(student, teacher, y.to(dtype), reduction="none"), expected)


def test_loss_inside_a_larger_graph():
    """Gradient flows through ops before and after the loss; the teacher gets none."""
    b, c = 5, 12
    y = targets_with_edge_rows(b, c)
    x = torch.randn(b, c, device=DEVICE, dtype=torch.float64)
    teacher_in = torch.randn(b, c, device=DEVICE, requires_grad=True)

    def objective(fn, x, teacher, dtype):
        x = x.detach().clone().requires_grad_()
        student = (torch.tanh(x) * 4 + x).to(dtype)
        loss = fn(student, teacher.to(dtype), y, reduction="none")
        total = (loss * torch.arange(1, b + 1, device=DEVICE)).sum() ** 2 + 0.1 * (student**2).sum()
        return total, torch.autograd.grad(total, x)[0]

    total, grad = objective(kernels.mbd_loss, x, teacher_in, torch.float32)
    ref_total, ref_grad = objective(ref.mbd_loss, x, teacher_in.detach(), torch.float64)
    assert_close_scaled(total, ref_total, FP32_RTOL, "total")
    assert_close_scaled(grad, ref_grad, FP32_RTOL, "grad")
    loss = kernels.mbd_loss(x.float(), teacher_in, y)
    assert not loss.requires_grad  # only the teacher requires grad, and it never gets a gradient


def test_teacher_never_gets_a_gradient():
    b, c = 3, 5
    student = torch.randn(b, c, device=DEVICE, requires_grad=True)
    teacher = torch.randn(b, c, device=DEVICE, requires_grad=True)
    kernels.mbd_loss(student, teacher, targets_with_edge_rows(b, c)).backward()
    assert teacher.grad is None and student.grad is not None


def test_no_grad_forward_and_noncontiguous_inputs():
    b, c = 6, 40
    student = torch.randn(c, b, device=DEVICE).t()  # column-major view
    teacher = torch.randn(b, 2 * c, device=DEVICE)[:, ::2]  # strided columns
    y = targets_with_edge_rows(b, c)
    with torch.no_grad():
        loss = kernels.mbd_loss(student, teacher, y, reduction="none")
    expected = ref.mbd_loss(student.double(), teacher.double(), y, reduction="none")
    assert_close_scaled(loss, expected, FP32_RTOL, "loss")


def test_bad_arguments():
    s = torch.randn(3, 4, device=DEVICE)
    y = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="student"):
        kernels.mbd_loss(s[0], s[0], y[0])
    with pytest.raises(ValueError, match="teacher"):
        kernels.mbd_loss(s, s[:, :3], y)
    with pytest.raises(ValueError, match="targets"):
        kernels.mbd_loss(s, s, y[:2])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kernels.mbd_loss(s.double(), s.double(), y)
    with pytest.raises(ValueError, match="reduction"):
        kernels.mbd_loss(s, s, y, reduction="batchmean")
    with pytest.raises(ValueError, match="temperature"):
        kernels.mbd_loss(s, s, y, temperature=0.0)
    with pytest.raises(ValueError, match="form"):
        kernels.mbd_loss(s, s, y, form="kl")


def test_poisoned_outputs_are_nan():
    """The poison switch really fills outputs (so the tests above would see unwritten elements)."""
    from mskd_fast.kernels import _utils

    assert torch.isnan(_utils.new_output((4,), torch.float32, DEVICE)).all()
    assert (_utils.new_output((4,), torch.int8, DEVICE) == 127).all()


@FORMS
@pytest.mark.parametrize("b,c", [(64, 20), (128, 80), (4096, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
@cuda_only[0]
@cuda_only[1]
def test_training_shapes_cuda(b, c, dtype, weight_grad, form):
    student = (torch.randn(b, c, device=DEVICE) * 3).to(dtype)
    teacher = (torch.randn(b, c, device=DEVICE) * 3).to(dtype)
    rtol = FP32_RTOL if dtype == torch.float32 else LOW_RTOL
    _compare(student, teacher, targets_with_edge_rows(b, c, p=0.05), rtol, weight_grad=weight_grad, form=form)
