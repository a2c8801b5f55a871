"""Fused relation loss of L-SD (SPEC 3): crop and batch distance matrices, Huber, student gradient.

Three launches, no host sync:

1. ``_distances_kernel``: programs ``0..B-1`` compute the within-image distances ``Dp (S, S)`` of
   student and teacher crops, the student's crop means and their row sums; the remaining programs
   each compute a ``BJ x BJ`` tile of the batch distances ``Db`` between crop means (recomputing
   the means they need) and the tile's sums.
2. ``_finalize_kernel`` (one program): global off-diagonal means from the partial sums, the two
   Huber terms (the loss) and the scalars the gradient needs.
3. ``_backward_kernel`` (backward pass, one program per image): ``d loss / d r`` scaled by
   ``grad_output``.

Gradient: with ``n = a / mu``, ``mu = sum(a) / N`` and ``e = huber'(n_r - n_o) / count``,
``d loss / d a = e / mu - sum(e * a) / (mu**2 N)`` (the second term vanishes when ``mu`` is
clamped), and a distance ``a_jk = sqrt(|v_j - v_k|^2 + 1e-12)`` passes it on as
``d v_j = sum_k W_jk (v_j - v_k)`` with ``W = 2 (d loss / d a) / a`` (zero on the diagonal). The
batch term reaches every crop of image ``j`` divided by ``S`` (the crop mean).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils

__all__ = ["relation_loss"]

_TILE = 2048  # elements of the 3-D difference tiles per program
_MAX_BJ = 16  # side of a batch-distance tile
_DIST_EPS = 1e-12
_NORM_EPS = 1e-12
_NUM_COEF = 6  # mu_p(r), mu_p(o), b_p, mu_b(r), mu_b(o), b_b


@triton.jit
def _image_distances(r_ptr, o_ptr, dpr_ptr, dpo_ptr, mean_ptr, part_ptr, i, S, C, r_sb, r_ss, o_sb, o_ss,
                     SP: tl.constexpr, BLOCK_C: tl.constexpr):
    s_idx = tl.arange(0, SP)
    s_ok = s_idx < S
    cols = tl.arange(0, BLOCK_C)
    i64 = i.to(tl.int64)
    d2r = tl.zeros([SP, SP], tl.float32)
    d2o = tl.zeros([SP, SP], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        m = s_ok[:, None] & (cc < C)[None, :]
        rt = tl.load(r_ptr + i64 * r_sb + s_idx[:, None] * r_ss + cc[None, :], mask=m, other=0.0).to(tl.float32)
        ot = tl.load(o_ptr + i64 * o_sb + s_idx[:, None] * o_ss + cc[None, :], mask=m, other=0.0).to(tl.float32)
        dr = rt[:, None, :] - rt[None, :, :]
        do = ot[:, None, :] - ot[None, :, :]
        d2r += tl.sum(dr * dr, axis=2)
        d2o += tl.sum(do * do, axis=2)
        tl.store(mean_ptr + i64 * C + cc, tl.sum(rt, axis=0) / S, mask=cc < C)
    pair_ok = s_ok[:, None] & s_ok[None, :]
    offdiag = pair_ok & (s_idx[:, None] != s_idx[None, :])
    dpr = tl.where(offdiag, tl.sqrt(d2r + 1e-12), 0.0)
    dpo = tl.where(offdiag, tl.sqrt(d2o + 1e-12), 0.0)
    offs = i64 * S * S + s_idx[:, None] * S + s_idx[None, :]
    tl.store(dpr_ptr + offs, dpr, mask=pair_ok)
    tl.store(dpo_ptr + offs, dpo, mask=pair_ok)
    tl.store(part_ptr + i64 * 2, tl.sum(tl.sum(dpr, axis=1), axis=0))
    tl.store(part_ptr + i64 * 2 + 1, tl.sum(tl.sum(dpo, axis=1), axis=0))


@triton.jit
def _crop_means(ptr, sb, ss, img, img_ok, cc, S, C):
    """``(BJ, BLOCK)`` crop means of images ``img`` over columns ``cc`` (float32)."""
    m = img_ok[:, None] & (cc < C)[None, :]
    base = ptr + img.to(tl.int64)[:, None] * sb + cc[None, :]
    acc = tl.zeros(m.shape, tl.float32)
    for s in range(0, S):
        acc += tl.load(base + s * ss, mask=m, other=0.0).to(tl.float32)
    return acc / S


@triton.jit
def _batch_distances(r_ptr, o_ptr, dbr_ptr, dbo_ptr, part_ptr, pid, tile, n_tiles, B, S, C, r_sb, r_ss, o_sb,
                     o_ss, BJ: tl.constexpr, BLOCK_CB: tl.constexpr):
    tj = tile // n_tiles
    tk = tile % n_tiles
    j = tj * BJ + tl.arange(0, BJ)
    k = tk * BJ + tl.arange(0, BJ)
    j_ok = j < B
    k_ok = k < B
    cols = tl.arange(0, BLOCK_CB)
    d2r = tl.zeros([BJ, BJ], tl.float32)
    d2o = tl.zeros([BJ, BJ], tl.float32)
    for c0 in range(0, C, BLOCK_CB):
        cc = c0 + cols
        rj = _crop_means(r_ptr, r_sb, r_ss, j, j_ok, cc, S, C)
        rk = _crop_means(r_ptr, r_sb, r_ss, k, k_ok, cc, S, C)
        oj = _crop_means(o_ptr, o_sb, o_ss, j, j_ok, cc, S, C)
        ok = _crop_means(o_ptr, o_sb, o_ss, k, k_ok, cc, S, C)
        dr = rj[:, None, :] - rk[None, :, :]
        do = oj[:, None, :] - ok[None, :, :]
        d2r += tl.sum(dr * dr, axis=2)
        d2o += tl.sum(do * do, axis=2)
    pair_ok = j_ok[:, None] & k_ok[None, :]
    offdiag = pair_ok & (j[:, None] != k[None, :])
    dbr = tl.where(offdiag, tl.sqrt(d2r + 1e-12), 0.0)
    dbo = tl.where(offdiag, tl.sqrt(d2o + 1e-12), 0.0)
    offs = j.to(tl.int64)[:, None] * B + k[None, :]
    tl.store(dbr_ptr + offs, dbr, mask=pair_ok)
    tl.store(dbo_ptr + offs, dbo, mask=pair_ok)
    p64 = pid.to(tl.int64)
    tl.store(part_ptr + p64 * 2, tl.sum(tl.sum(dbr, axis=1), axis=0))
    tl.store(part_ptr + p64 * 2 + 1, tl.sum(tl.sum(dbo, axis=1), axis=0))


@triton.jit
def _distances_kernel(r_ptr, o_ptr, dpr_ptr, dpo_ptr, dbr_ptr, dbo_ptr, mean_ptr, part_ptr,
                      B, S, C, r_sb, r_ss, o_sb, o_ss, n_tiles,
                      SP: tl.constexpr, BLOCK_C: tl.constexpr, BJ: tl.constexpr, BLOCK_CB: tl.constexpr):
    pid = tl.program_id(0)
    if pid < B:
        _image_distances(r_ptr, o_ptr, dpr_ptr, dpo_ptr, mean_ptr, part_ptr, pid, S, C, r_sb, r_ss, o_sb, o_ss,
                         SP, BLOCK_C)
    else:
        _batch_distances(r_ptr, o_ptr, dbr_ptr, dbo_ptr, part_ptr, pid, pid - B, n_tiles, B, S, C, r_sb, r_ss,
                         o_sb, o_ss, BJ, BLOCK_CB)


@triton.jit
def _huber(x, delta):
    ax = tl.abs(x)
    return tl.where(ax < delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


@triton.jit
def _huber_term(dr_ptr, do_ptr, part_ptr, part_lo, part_hi, n_entries, n_pairs, delta,
                BLOCK: tl.constexpr):
    """Huber mean over ``n_entries`` distances normalised by their off-diagonal means.

    Returns ``(loss, mu_r, mu_o, b)`` with ``b = sum(e * a) / (mu_r**2 * n_pairs)`` (0 when clamped).
    """
    offs = tl.arange(0, BLOCK)
    acc_r = tl.zeros([BLOCK], tl.float32)
    acc_o = tl.zeros([BLOCK], tl.float32)
    for p0 in range(part_lo, part_hi, BLOCK):
        p = p0 + offs
        m = p < part_hi
        acc_r += tl.load(part_ptr + p.to(tl.int64) * 2, mask=m, other=0.0)
        acc_o += tl.load(part_ptr + p.to(tl.int64) * 2 + 1, mask=m, other=0.0)
    mean_r = tl.sum(acc_r, axis=0) / n_pairs
    mean_o = tl.sum(acc_o, axis=0) / n_pairs
    mu_r = tl.maximum(mean_r, 1e-12)
    mu_o = tl.maximum(mean_o, 1e-12)
    loss_acc = tl.zeros([BLOCK], tl.float32)
    ea_acc = tl.zeros([BLOCK], tl.float32)
    for q0 in range(0, n_entries, BLOCK):
        q = q0 + offs
        m = q < n_entries
        a = tl.load(dr_ptr + q, mask=m, other=0.0)
        x = a / mu_r - tl.load(do_ptr + q, mask=m, other=0.0) / mu_o
        loss_acc += _huber(x, delta)
        ea_acc += tl.minimum(tl.maximum(x, -delta), delta) * a
    loss = tl.sum(loss_acc, axis=0) / n_entries
    b = tl.where(mean_r > 1e-12, tl.sum(ea_acc, axis=0) / n_entries / (mu_r * mu_r * n_pairs), 0.0)
    return loss, mu_r, mu_o, b


@triton.jit
def _finalize_kernel(dpr_ptr, dpo_ptr, dbr_ptr, dbo_ptr, part_ptr, loss_ptr, coef_ptr, B, S, n_parts, delta,
                     HAS_P: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    loss = 0.0
    if HAS_P:
        lp, mu_r, mu_o, b = _huber_term(dpr_ptr, dpo_ptr, part_ptr, 0, B, B * S * S, (B * S * (S - 1)).to(tl.float32),
                                        delta, BLOCK)
        loss += lp
        tl.store(coef_ptr + 0, mu_r)
        tl.store(coef_ptr + 1, mu_o)
        tl.store(coef_ptr + 2, b)
    else:
        tl.store(coef_ptr + 0, 1.0)
        tl.store(coef_ptr + 1, 1.0)
        tl.store(coef_ptr + 2, 0.0)
    if HAS_B:
        lb, mu_r, mu_o, b = _huber_term(dbr_ptr, dbo_ptr, part_ptr, B, n_parts, B * B, (B * (B - 1)).to(tl.float32),
                                        delta, BLOCK)
        loss += lb
        tl.store(coef_ptr + 3, mu_r)
        tl.store(coef_ptr + 4, mu_o)
        tl.store(coef_ptr + 5, b)
    else:
        tl.store(coef_ptr + 3, 1.0)
        tl.store(coef_ptr + 4, 1.0)
        tl.store(coef_ptr + 5, 0.0)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _edge_weights(a, o, ok, mu_r, mu_o, b, delta, inv_count):
    """``W = 2 (d loss / d a) / a`` for distances ``a`` (student) and ``o`` (teacher); 0 where not ``ok``."""
    x = a / mu_r - o / mu_o
    e = tl.minimum(tl.maximum(x, -delta), delta) * inv_count
    return tl.where(ok, 2.0 * (e / mu_r - b) / tl.where(ok, a, 1.0), 0.0)


@triton.jit
def _backward_kernel(grad_ptr, r_ptr, dr_ptr, dpr_ptr, dpo_ptr, dbr_ptr, dbo_ptr, mean_ptr, coef_ptr,
                     B, S, C, r_sb, r_ss, d_sb, d_ss, delta, inv_count_p, inv_count_b,
                     HAS_P: tl.constexpr, HAS_B: tl.constexpr, SP: tl.constexpr, BLOCK_C: tl.constexpr,
                     BK: tl.constexpr):
    i = tl.program_id(0)
    i64 = i.to(tl.int64)
    g = tl.load(grad_ptr).to(tl.float32)
    s_idx = tl.arange(0, SP)
    s_ok = s_idx < S
    cols = tl.arange(0, BLOCK_C)
    if HAS_P:
        pair_ok = s_ok[:, None] & s_ok[None, :]
        offdiag = pair_ok & (s_idx[:, None] != s_idx[None, :])
        offs = i64 * S * S + s_idx[:, None] * S + s_idx[None, :]
        a = tl.load(dpr_ptr + offs, mask=pair_ok, other=1.0)
        o = tl.load(dpo_ptr + offs, mask=pair_ok, other=1.0)
        w = _edge_weights(a, o, offdiag, tl.load(coef_ptr + 0), tl.load(coef_ptr + 1), tl.load(coef_ptr + 2),
                          delta, inv_count_p)
    if HAS_B:
        mu_br = tl.load(coef_ptr + 3)
        mu_bo = tl.load(coef_ptr + 4)
        b_b = tl.load(coef_ptr + 5)
        k_idx = tl.arange(0, BK)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        c_ok = cc < C
        m = s_ok[:, None] & c_ok[None, :]
        acc = tl.zeros([SP, BLOCK_C], tl.float32)
        if HAS_P:
            rt = tl.load(r_ptr + i64 * r_sb + s_idx[:, None] * r_ss + cc[None, :], mask=m, other=0.0)
            rt = rt.to(tl.float32)
            # sum_k W_jk (r_j - r_k) on explicit differences: W reaches 1e6 for coincident crops.
            acc += tl.sum(w[:, :, None] * (rt[:, None, :] - rt[None, :, :]), axis=1)
        if HAS_B:
            mi = tl.load(mean_ptr + i64 * C + cc, mask=c_ok, other=0.0)
            bacc = tl.zeros([BLOCK_C], tl.float32)
            for k0 in range(0, B, BK):
                kk = k0 + k_idx
                k_ok = kk < B
                row = i64 * B + kk
                ab = tl.load(dbr_ptr + row, mask=k_ok, other=1.0)
                ob = tl.load(dbo_ptr + row, mask=k_ok, other=1.0)
                wb = _edge_weights(ab, ob, k_ok & (kk != i), mu_br, mu_bo, b_b, delta, inv_count_b)
                mk = tl.load(mean_ptr + kk.to(tl.int64)[:, None] * C + cc[None, :],
                             mask=k_ok[:, None] & c_ok[None, :], other=0.0)
                bacc += tl.sum(wb[:, None] * (mi[None, :] - mk), axis=0)
            acc += bacc[None, :] / S
        tl.store(dr_ptr + i64 * d_sb + s_idx[:, None] * d_ss + cc[None, :], (g * acc).to(dr_ptr.dtype.element_ty),
                 mask=m)


def _image_blocks(s: int, c: int) -> tuple[int, int]:
    sp = max(2, _utils.next_pow2(s))
    return sp, min(_utils.next_pow2(c), max(8, _TILE // (sp * sp)))


def _batch_blocks(b: int, c: int) -> tuple[int, int]:
    bj = min(_MAX_BJ, max(2, _utils.next_pow2(b)))
    return bj, min(_utils.next_pow2(c), max(8, _TILE // (bj * bj)))


@_utils.register_op("mskd::relation_loss_fwd")
def _relation_loss_fwd(
    student: torch.Tensor, teacher: torch.Tensor, delta: float, batch_term: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and the buffers its backward reads: ``Dp`` of r and o, ``Db`` of r and o, crop means, scalars.

    ``batch_term=False`` leaves out the batch term (``terms="patch"``): ``Db`` is empty and never computed.
    """
    b, s, c = student.shape
    student = _utils.rowwise(student)
    teacher = _utils.rowwise(teacher)
    dev = student.device
    has_p, has_b = s > 1, b > 1 and batch_term
    sp, block_c = _image_blocks(s, c)
    bj, block_cb = _batch_blocks(b, c)
    n_tiles = triton.cdiv(b, bj) if has_b else 0
    n_parts = b + n_tiles * n_tiles
    dp_r = _utils.new_output((b, s, s), torch.float32, dev)
    dp_o = _utils.new_output((b, s, s), torch.float32, dev)
    db_r = _utils.new_output((b, b) if has_b else (0,), torch.float32, dev)
    db_o = _utils.new_output((b, b) if has_b else (0,), torch.float32, dev)
    means = _utils.new_output((b, c), torch.float32, dev)
    parts = _utils.new_output((n_parts, 2), torch.float32, dev)
    coef = _utils.new_output((_NUM_COEF,), torch.float32, dev)
    loss = _utils.new_output((), student.dtype, dev)
    warps = _utils.warps_for(max(sp * sp * block_c, bj * bj * block_cb))
    _utils.launch(
        _distances_kernel, (n_parts,),
        student, teacher, dp_r, dp_o, db_r, db_o, means, parts,
        b, s, c, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), n_tiles,
        SP=sp, BLOCK_C=block_c, BJ=bj, BLOCK_CB=block_cb, num_warps=warps,
    )
    _utils.launch(
        _finalize_kernel, (1,),
        dp_r, dp_o, db_r, db_o, parts, loss, coef, b, s, n_parts, float(delta),
        HAS_P=has_p, HAS_B=has_b, BLOCK=1024, num_warps=4,
    )
    return loss, dp_r, dp_o, db_r, db_o, means, coef


@_utils.register_op("mskd::relation_loss_bwd")
def _relation_loss_bwd(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    dp_r: torch.Tensor,
    dp_o: torch.Tensor,
    db_r: torch.Tensor,
    db_o: torch.Tensor,
    means: torch.Tensor,
    coef: torch.Tensor,
    delta: float,
    batch_term: bool,
) -> torch.Tensor:
    """``grad_loss * d loss / d student`` (``(B, S, C)``, student dtype) from the forward's buffers."""
    b, s, c = student.shape
    student = _utils.rowwise(student)
    grad = _utils.new_output((b, s, c), student.dtype, student.device)
    has_p, has_b = s > 1, b > 1 and batch_term
    sp, block_c = _image_blocks(s, c)
    bk = min(max(2, _utils.next_pow2(b)), max(2, _TILE // block_c))
    _utils.launch(
        _backward_kernel, (b,),
        grad_loss, student, grad, dp_r, dp_o, db_r, db_o, means, coef,
        b, s, c, student.stride(0), student.stride(1), grad.stride(0), grad.stride(1), float(delta),
        1.0 / (b * s * s), 1.0 / (b * b),
        HAS_P=has_p, HAS_B=has_b, SP=sp, BLOCK_C=block_c, BK=bk,
        num_warps=_utils.warps_for(max(sp * sp * block_c, bk * block_c)),
    )
    return grad


def _setup_context(ctx, inputs, output):
    student, _, delta, batch_term = inputs
    _, dp_r, dp_o, db_r, db_o, means, coef = output
    ctx.delta, ctx.batch_term = delta, batch_term
    ctx.save_for_backward(student, dp_r, dp_o, db_r, db_o, means, coef)
    ctx.mark_non_differentiable(dp_r, dp_o, db_r, db_o, means, coef)


def _backward(ctx, grad_loss, *_unused):
    student, dp_r, dp_o, db_r, db_o, means, coef = ctx.saved_tensors
    grad = torch.ops.mskd.relation_loss_bwd(grad_loss, student, dp_r, dp_o, db_r, db_o, means, coef, ctx.delta,
                                            ctx.batch_term)
    return grad, None, None, None


torch.library.register_autograd("mskd::relation_loss_fwd", _backward, setup_context=_setup_context)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, *, delta: float = 1.0,
                  terms: str = "both") -> torch.Tensor:
    """Fused L-SD relation loss of SPEC 3 (see :func:`mskd_fast.reference.relation_loss`).

    Args:
        student: ``r (B, S, C)`` float32/bfloat16/float16 crop logits (gets the gradient).
        teacher: ``o (B, S, C)`` crop logits (constant).
        delta: Huber threshold (> 0).
        terms: ``"both"`` or ``"patch"`` (within-image term only; the batch term is not computed).

    Returns:
        0-dim loss in ``student.dtype`` (as the reference; float32 math): Huber of normalised
        within-image crop distances (mean over ``B*S*S``) plus Huber of normalised distances between
        per-image crop means (mean over ``B*B``); a term is 0 when ``S = 1`` or ``B = 1``.
    """
    _utils.check_kernel_tensor("student", student, 3, "(B, S, C)")
    _utils.check_kernel_tensor("teacher", teacher, 3, "(B, S, C)")
    _utils.check_same_shape("teacher", teacher, "student", student)
    _utils.check_same_device(student=student, teacher=teacher)
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta!r}")
    if terms not in ("both", "patch"):
        raise ValueError(f"terms must be 'both' or 'patch', got {terms!r}")
    loss, *_ = torch.ops.mskd.relation_loss_fwd(student, teacher.detach(), float(delta), terms == "both")
    return loss
