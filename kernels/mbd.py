"""Fused MBD loss (SPEC 1-2): reformulated softmax of teacher and student, weighted KL, student gradient.

One program handles ``ROWS`` rows of ``C`` classes. Rows up to ``C = 4096`` live in registers
(one load of each input); wider rows are processed in column blocks over four passes (online
logsumexp). All math is float32 whatever the input dtype. The forward writes the loss *and*
the gradient with respect to the student (already scaled by ``T`` and ``1/B`` for ``mean``), so
the backward is a single multiply by ``grad_output``.

Per row, with ``x = student / T``, ``M`` the positives, ``lam = logsumexp_{k not in M} x_k`` and
``L_t = logaddexp(x_t, lam) = x_t + softplus(lam - x_t)``:
``log Q_t = -softplus(lam - x_t) - log|M|`` (positive), ``log Q_k = x_k + logsumexp_t(-L_t) - log|M|``
(negative); rows without a positive use ``log_softmax``; rows where every class is positive
give ``log Q = -log C`` exactly, hence zero loss and zero gradient. The gradient follows the
SPEC 2 formulas with ``g = dl/dlog Q``; ``weight_grad=True`` only adds the derivative of the
weights ``(a*a + 1e-12)**(gamma/2)`` to ``g``.

``form`` (a compile-time flag ``DIVERGENCE``) picks the per-element term: ``"paper"`` (eq. 14)
``w P (log P - log Q)`` with ``g = -w P``; ``"divergence"`` (the weighted generalized KL, default)
``w (P (log P - log Q) - P + Q)`` with ``g = w (Q - P)``. With ``weight_grad`` the weight derivative
multiplies the form's bracket.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mskd_fast.reference import MBD_FORMS

from . import _utils

__all__ = ["mbd_loss"]

# Widest row kept entirely in registers: ptxas -v (sm_90) reports spills for 4096 < C <= 8192
# (56 B, 140 B with weight_grad), none at 4096 with 16 warps; tests/test_kernel_codegen.py checks.
_MAX_SINGLE_BLOCK = 4096
_MULTI_BLOCK = 2048  # column block of the looping path (16 warps: 4096 spilled 4 B with Triton 3.6)
_TILE = 1024  # elements per program in the single-block path (rows * BLOCK_C), for BLOCK_C <= _TILE
_VALUES_PER_THREAD = 4  # tile elements per thread (see _launch_config)
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
FORMS = MBD_FORMS
_WEIGHT_EPS = 1e-12


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _lse_merge(m, s, v):
    """Online logsumexp along axis 1: fold tile ``v`` (-inf where excluded) into ``(m, s)``."""
    m_new = tl.maximum(m, tl.max(v, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(v - m_ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def _lse_final(m, s):
    return tl.where(s > 0.0, m + tl.log(tl.maximum(s, 1e-30)), float("-inf"))


@triton.jit
def _load_tile(s_ptr, t_ptr, y_ptr, rows, cols, B, C, stride_s, stride_t, stride_y, temperature):
    valid = (rows[:, None] < B) & (cols[None, :] < C)
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    x = tl.load(s_ptr + r64 * stride_s + c, mask=valid, other=0.0).to(tl.float32) / temperature
    t = tl.load(t_ptr + r64 * stride_t + c, mask=valid, other=0.0).to(tl.float32) / temperature
    y = tl.load(y_ptr + r64 * stride_y + c, mask=valid, other=0).to(tl.float32)
    pos = (y > 0.5) & valid
    return x, t, pos, valid


@triton.jit
def _pass_negatives(x, t, pos, valid, mx, sx, mt, st, npos):
    """Pass 1: logsumexp over the negatives of student and teacher, number of positives."""
    neg = valid & (pos == 0)
    mx, sx = _lse_merge(mx, sx, tl.where(neg, x, float("-inf")))
    mt, st = _lse_merge(mt, st, tl.where(neg, t, float("-inf")))
    npos += tl.sum(pos.to(tl.int32), axis=1)
    return mx, sx, mt, st, npos


@triton.jit
def _pass_positives(x, t, pos, lam_x, lam_t, mx, sx, mt, st):
    """Pass 2: logsumexp over the positives of ``-L_t`` for student and teacher."""
    neg_lx = -(x + _softplus(lam_x[:, None] - x))
    neg_lt = -(t + _softplus(lam_t[:, None] - t))
    mx, sx = _lse_merge(mx, sx, tl.where(pos, neg_lx, float("-inf")))
    mt, st = _lse_merge(mt, st, tl.where(pos, neg_lt, float("-inf")))
    return mx, sx, mt, st


@triton.jit
def _log_rs(v, pos, lam, neg_offset, log_m):
    """``log RS`` of a tile given its row statistics; also returns ``softplus(lam - v)``."""
    sp = _softplus(lam[:, None] - v)
    out = tl.where(pos, -sp - log_m[:, None], v + neg_offset[:, None])
    return out, sp


@triton.jit
def _loss_and_g(x, t, pos, valid, lam_x, lam_t, off_x, off_t, log_m, omega, gamma_pos, gamma_neg,
                WEIGHT_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr):
    """Per-element loss contribution and ``g = d loss / d log Q`` (before the softmax Jacobian)."""
    lq, spx = _log_rs(x, pos, lam_x, off_x, log_m)
    lp, _ = _log_rs(t, pos, lam_t, off_t, log_m)
    p = tl.exp(lp)
    q = tl.exp(lq)
    gap = tl.where(pos, (1.0 - omega) + omega * p - q, omega * p - q)
    gam = tl.where(pos, gamma_pos, gamma_neg)
    if DIVERGENCE:
        bracket = p * (lp - lq) - p + q
        g_const = q - p  # d bracket / d log Q
    else:
        bracket = p * (lp - lq)
        g_const = -p
    if WEIGHT_GRAD:
        # d w / d log Q = -q * gam * gap * w / sq (gap falls by q), times the form's bracket.
        sq = gap * gap + 1e-12
        w = tl.exp(0.5 * gam * tl.log(sq))
        g = w * g_const - bracket * q * gam * gap * w / sq
    else:
        w = tl.where(gam == 0.0, 1.0, tl.exp(gam * tl.log(tl.abs(gap))))
        g = w * g_const
    contrib = tl.where(valid, w * bracket, 0.0)
    g = tl.where(valid, g, 0.0)
    return contrib, g, spx


@triton.jit
def _jacobian_terms(x, pos, lam_x, big_lam_x, spx):
    """``sigma_t``, ``1 - sigma_t`` and ``rho_t`` of SPEC 2 (meaningful on positives only)."""
    sig = tl.exp(-spx)
    one_m_sig = tl.exp(-_softplus(x - lam_x[:, None]))
    rho = tl.exp(-(x + spx) - big_lam_x[:, None])
    return sig, one_m_sig, rho


@triton.jit
def _mbd_fwd_kernel(
    s_ptr, t_ptr, y_ptr, g_ptr, out_ptr,
    B, C, stride_s, stride_t, stride_y, stride_g,
    temperature, out_scale, grad_scale, omega, gamma_pos, gamma_neg,
    WEIGHT_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, PER_ROW: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols0 = tl.arange(0, BLOCK_C)
    row_ok = rows < B

    mx = tl.full([ROWS], float("-inf"), tl.float32)
    sx = tl.zeros([ROWS], tl.float32)
    mt = tl.full([ROWS], float("-inf"), tl.float32)
    st = tl.zeros([ROWS], tl.float32)
    npos = tl.zeros([ROWS], tl.int32)
    if SINGLE:
        x, t, pos, valid = _load_tile(s_ptr, t_ptr, y_ptr, rows, cols0, B, C, stride_s, stride_t, stride_y,
                                      temperature)
        mx, sx, mt, st, npos = _pass_negatives(x, t, pos, valid, mx, sx, mt, st, npos)
    else:
        for c0 in range(0, C, BLOCK_C):
            x, t, pos, valid = _load_tile(s_ptr, t_ptr, y_ptr, rows, c0 + cols0, B, C, stride_s, stride_t,
                                          stride_y, temperature)
            mx, sx, mt, st, npos = _pass_negatives(x, t, pos, valid, mx, sx, mt, st, npos)
    lam_x = _lse_final(mx, sx)
    lam_t = _lse_final(mt, st)

    mx = tl.full([ROWS], float("-inf"), tl.float32)
    sx = tl.zeros([ROWS], tl.float32)
    mt = tl.full([ROWS], float("-inf"), tl.float32)
    st = tl.zeros([ROWS], tl.float32)
    if SINGLE:
        mx, sx, mt, st = _pass_positives(x, t, pos, lam_x, lam_t, mx, sx, mt, st)
    else:
        for c0 in range(0, C, BLOCK_C):
            x, t, pos, valid = _load_tile(s_ptr, t_ptr, y_ptr, rows, c0 + cols0, B, C, stride_s, stride_t,
                                          stride_y, temperature)
            mx, sx, mt, st = _pass_positives(x, t, pos, lam_x, lam_t, mx, sx, mt, st)
    big_lam_x = _lse_final(mx, sx)
    big_lam_t = _lse_final(mt, st)

    has_pos = npos > 0
    log_m = tl.log(tl.maximum(npos, 1).to(tl.float32))
    # Offset of log RS on negatives: logsumexp_t(-L_t) - log|M|, or -lam (plain log_softmax) without positives.
    off_x = tl.where(has_pos, big_lam_x - log_m, -lam_x)
    off_t = tl.where(has_pos, big_lam_t - log_m, -lam_t)

    row_loss = tl.zeros([ROWS], tl.float32)
    g_neg = tl.zeros([ROWS], tl.float32)
    a1 = tl.zeros([ROWS], tl.float32)
    a2 = tl.zeros([ROWS], tl.float32)
    if SINGLE:
        contrib, g, spx = _loss_and_g(x, t, pos, valid, lam_x, lam_t, off_x, off_t, log_m, omega, gamma_pos,
                                      gamma_neg, WEIGHT_GRAD, DIVERGENCE)
        row_loss += tl.sum(contrib, axis=1)
        if COMPUTE_GRAD:
            neg = valid & (pos == 0)
            sig, one_m_sig, rho = _jacobian_terms(x, pos, lam_x, big_lam_x, spx)
            g_neg += tl.sum(tl.where(neg, g, 0.0), axis=1)
            a1 += tl.sum(tl.where(pos, g * one_m_sig, 0.0), axis=1)
            a2 += tl.sum(tl.where(pos, rho * one_m_sig, 0.0), axis=1)
    else:
        for c0 in range(0, C, BLOCK_C):
            x, t, pos, valid = _load_tile(s_ptr, t_ptr, y_ptr, rows, c0 + cols0, B, C, stride_s, stride_t,
                                          stride_y, temperature)
            contrib, g, spx = _loss_and_g(x, t, pos, valid, lam_x, lam_t, off_x, off_t, log_m, omega,
                                          gamma_pos, gamma_neg, WEIGHT_GRAD, DIVERGENCE)
            row_loss += tl.sum(contrib, axis=1)
            if COMPUTE_GRAD:
                neg = valid & (pos == 0)
                sig, one_m_sig, rho = _jacobian_terms(x, pos, lam_x, big_lam_x, spx)
                g_neg += tl.sum(tl.where(neg, g, 0.0), axis=1)
                a1 += tl.sum(tl.where(pos, g * one_m_sig, 0.0), axis=1)
                a2 += tl.sum(tl.where(pos, rho * one_m_sig, 0.0), axis=1)

    row_loss = tl.where(row_ok, row_loss * out_scale, 0.0)
    if PER_ROW:
        tl.store(out_ptr + rows, row_loss.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(out_ptr + pid, tl.sum(row_loss, axis=0).to(out_ptr.dtype.element_ty))

    if COMPUTE_GRAD:
        # d lam: through L_t of every positive and through logsumexp_t(-L_t); -sum(g) for a plain softmax.
        dlam = tl.where(has_pos, -a1 - g_neg * a2, -g_neg)
        if SINGLE:
            pi = tl.exp(x - lam_x[:, None])
            dx = tl.where(pos, g * one_m_sig - g_neg[:, None] * rho * sig, g + dlam[:, None] * pi)
            r64 = rows.to(tl.int64)[:, None]
            tl.store(g_ptr + r64 * stride_g + cols0[None, :], (dx * grad_scale).to(g_ptr.dtype.element_ty),
                     mask=valid)
        else:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                x, t, pos, valid = _load_tile(s_ptr, t_ptr, y_ptr, rows, cols, B, C, stride_s, stride_t,
                                              stride_y, temperature)
                contrib, g, spx = _loss_and_g(x, t, pos, valid, lam_x, lam_t, off_x, off_t, log_m, omega,
                                              gamma_pos, gamma_neg, WEIGHT_GRAD, DIVERGENCE)
                sig, one_m_sig, rho = _jacobian_terms(x, pos, lam_x, big_lam_x, spx)
                pi = tl.exp(x - lam_x[:, None])
                dx = tl.where(pos, g * one_m_sig - g_neg[:, None] * rho * sig, g + dlam[:, None] * pi)
                r64 = rows.to(tl.int64)[:, None]
                tl.store(g_ptr + r64 * stride_g + cols[None, :], (dx * grad_scale).to(g_ptr.dtype.element_ty),
                         mask=valid)


def _launch_config(b: int, c: int) -> tuple[int, int, bool, int]:
    """``(ROWS, BLOCK_C, SINGLE, num_warps)`` for a ``(b, c)`` problem; depends on ``c`` only.

    Register budget (``ptxas -v``, sm_90): every row a thread holds costs about 20 registers of row
    statistics, and Triton lays rows narrower than the CTA out one column per thread, so a thread
    holds ``ROWS * BLOCK_C / (32 * num_warps)`` rows. At 8 per thread, 16 x 128 tiles spilled
    (182 registers, 24 B) and multi-row 4096-element tiles at 16 warps spilled (e.g. 64 x 64: 84 B);
    at 4 per thread (1024-element tiles, 8 warps) every configuration stays under 100 registers.
    Rows of 2048 and 4096 columns are one row per program (16 warps); wider rows loop over blocks
    of 2048 columns (16 warps). A batch of at most ``ROWS`` rows is one program.
    tests/test_kernel_codegen.py compiles every configuration (Triton 3.6 and 3.8) and checks.
    """
    if c > _MAX_SINGLE_BLOCK:
        return 1, _MULTI_BLOCK, False, 16
    block_c = _utils.next_pow2(c)
    rows = max(1, _TILE // block_c)
    return rows, block_c, True, max(1, min(16, rows * block_c // (32 * _VALUES_PER_THREAD)))


def launch_configs() -> list[tuple[int, int, bool, int]]:
    """Every configuration :func:`_launch_config` can return (the set the codegen test compiles)."""
    widths = [2**j for j in range(_MAX_SINGLE_BLOCK.bit_length())] + [_MAX_SINGLE_BLOCK + 1]
    return sorted({_launch_config(1, c) for c in widths})


@_utils.register_op("mskd::mbd_loss_fwd")
def _mbd_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    omega: float,
    gamma_pos: float,
    gamma_neg: float,
    weight_grad: bool,
    form: str,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (scalar or ``(B,)``) and ``d loss / d student`` (student dtype) for ``grad_output = 1``."""
    b, c = student.shape
    student = _utils.rowwise(student)
    teacher = _utils.rowwise(teacher)
    targets = _utils.as_label_tensor(targets)
    rows, block_c, single, num_warps = _launch_config(b, c)
    grid = triton.cdiv(b, rows)
    per_row = reduction == "none"
    loss_dtype = torch.promote_types(student.dtype, teacher.dtype)
    if per_row:
        out = _utils.new_output((b,), loss_dtype, student.device)
    else:
        out = _utils.new_output((grid,), loss_dtype if grid == 1 else torch.float32, student.device)
    if compute_grad:
        grad = _utils.new_output((b, c), student.dtype, student.device)
    else:
        grad = student.new_empty((0, c))
    scale = temperature * temperature / (b if reduction == "mean" else 1)
    _utils.launch(
        _mbd_fwd_kernel, (grid,),
        student, teacher, targets, grad, out,
        b, c, student.stride(0), teacher.stride(0), targets.stride(0), grad.stride(0) if compute_grad else c,
        float(temperature), float(scale), float(scale / temperature), float(omega), float(gamma_pos),
        float(gamma_neg),
        WEIGHT_GRAD=bool(weight_grad), DIVERGENCE=form == "divergence", PER_ROW=per_row,
        COMPUTE_GRAD=bool(compute_grad),
        ROWS=rows, BLOCK_C=block_c, SINGLE=single, num_warps=num_warps,
    )
    if per_row:
        loss = out
    elif grid == 1:
        loss = out.view(())
    else:
        loss = out.sum().to(loss_dtype)
    return loss, grad


_REDUCTION_ARG, _COMPUTE_GRAD_ARG = 9, 10  # positions in the op's schema


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.per_row = inputs[_REDUCTION_ARG] == "none"
    ctx.compute_grad = inputs[_COMPUTE_GRAD_ARG]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _backward(ctx, grad_loss, _unused):
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("mskd::mbd_loss_fwd was run without its gradient (compute_grad=False)")
    scale = grad_loss[:, None] if ctx.per_row else grad_loss
    return ((scale * grad).to(grad.dtype),) + (None,) * _COMPUTE_GRAD_ARG


torch.library.register_autograd("mskd::mbd_loss_fwd", _backward, setup_context=_setup_context)


def mbd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 4.0,
    omega: float = 0.5,
    gamma_pos: float = 0.25,
    gamma_neg: float = 1.0,
    weight_grad: bool = False,
    reduction: str = "mean",
    form: str = "divergence",
) -> torch.Tensor:
    """Fused MBD loss of SPEC 2 (see :func:`mskd_fast.reference.mbd_loss` for the definition).

    Args:
        student: ``(B, C)`` float32/bfloat16/float16 logits; the only input that gets a gradient.
        teacher: ``(B, C)`` logits, treated as a constant (never receives a gradient).
        targets: ``(B, C)`` 0/1 labels (float, integer or bool); positive means ``> 0.5``.
        temperature, omega, gamma_pos, gamma_neg, weight_grad: SPEC 2 hyper-parameters.
        reduction: ``"mean"``, ``"sum"`` (scalar) or ``"none"`` (``(B,)``).
        form: ``"divergence"`` (default, ``w (P log(P/Q) - P + Q)`` per element: >= 0, zero
            gradient at ``student == teacher``) or ``"paper"`` (``w P log(P/Q)``, eq. 14).

    Returns:
        The loss in the promoted dtype of ``student`` and ``teacher`` (as the reference), computed
        in float32. Its gradient is computed in the forward pass; backward multiplies it by
        ``grad_output``.
    """
    _utils.check_kernel_tensor("student", student, 2, "(B, C)")
    _utils.check_kernel_tensor("teacher", teacher, 2, "(B, C)")
    _utils.check_same_shape("teacher", teacher, "student", student)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    _utils.check_same_shape("targets", targets, "student", student)
    _utils.check_targets_dtype("targets", targets)
    _utils.check_same_device(student=student, teacher=teacher, targets=targets)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if form not in FORMS:
        raise ValueError(f"form must be 'divergence' or 'paper', got {form!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.mskd.mbd_loss_fwd(
        student, teacher.detach(), targets.detach(), float(temperature), float(omega), float(gamma_pos),
        float(gamma_neg), bool(weight_grad), form, reduction, compute_grad,
    )
    return loss
