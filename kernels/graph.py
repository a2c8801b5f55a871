"""Reconstructed teacher logits for R-SD (SPEC 4): pseudo labels, crop-graph propagation, crop softmax.

Pipeline (no host sync, ``k`` may be a device tensor):

1. ``_delta_kernel``: ``delta = o - q[:, None, :]`` in the dtype PyTorch would give (so ties and
   rounding equal the reference's) and, for the default ``k``, per-program counts of positive labels.
2. ``torch.sort(delta, descending=True, stable=True)`` over all ``N = B*S*C`` entries: ties go to
   the lower flat index, exactly as :func:`mskd_fast.reference.pseudo_labels`.
3. ``_sign_kernel``: sorted position ``p`` of entry ``e`` gives ``u[e] = +1`` for ``p < k``, ``-1``
   for ``p >= N - min(k, N - k)``, else ``0`` (``k`` clamped to ``[0, N]``).
4. ``_graph_kernel`` (one program per image): crop distances of ``o_i`` (``S x S``), ``A`` scaled by
   its maximum (all zero if that is 0), ``Atil = D^-1/2 (A + I) D^-1/2``, ``layers`` steps
   ``u <- Atil u`` per class block, softmax over crops, ``z_i = sum_s softmax_s * o_is``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils

__all__ = ["reconstruct_logits"]

_BLOCK = 1024  # elements per program of the element-wise kernels
_TILE = 2048  # elements of the (S, S, classes) tile of the graph kernel
_K_CONST, _K_TENSOR, _K_DEFAULT = 0, 1, 2


@triton.jit
def _delta_kernel(o_ptr, q_ptr, y_ptr, delta_ptr, count_ptr, B, S, C, o_sb, o_ss, q_sb, y_sb,
                  COUNT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sc = S * C
    ok = e < B * sc
    i = e // sc
    rem = e % sc
    s = rem // C
    c = rem % C
    o = tl.load(o_ptr + i * o_sb + s * o_ss + c, mask=ok, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + i * q_sb + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + e, (o - q).to(delta_ptr.dtype.element_ty), mask=ok)
    if COUNT:
        # Positive labels among targets entries [pid*BLOCK, (pid+1)*BLOCK) (B*C <= N, so all are covered).
        yok = e < B * C
        y = tl.load(y_ptr + (e // C) * y_sb + e % C, mask=yok, other=0).to(tl.float32)
        tl.store(count_ptr + pid, tl.sum((yok & (y > 0.5)).to(tl.int32), axis=0))


@triton.jit
def _sign_kernel(order_ptr, u_ptr, k_ptr, count_ptr, k_value, n_counts, S, N,
                 K_MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if K_MODE == 0:
        k = tl.cast(k_value, tl.int64)
    elif K_MODE == 1:
        k = tl.load(k_ptr).to(tl.int64)
    else:
        acc = tl.zeros([BLOCK], tl.int64)
        for c0 in range(0, n_counts, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            acc += tl.load(count_ptr + offs, mask=offs < n_counts, other=0).to(tl.int64)
        k = tl.sum(acc, axis=0) * S
    k = tl.minimum(tl.maximum(k, 0), N)
    k_neg = tl.minimum(k, N - k)
    p = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = p < N
    idx = tl.load(order_ptr + p, mask=ok, other=0)
    sign = tl.where(p < k, 1, tl.where(p >= N - k_neg, -1, 0))
    tl.store(u_ptr + idx, sign.to(tl.int8), mask=ok)


@triton.jit
def _graph_kernel(o_ptr, u_ptr, z_ptr, S, C, o_sb, o_ss, layers, inv_crop_temperature,
                  SP: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    s_idx = tl.arange(0, SP)
    s_ok = s_idx < S
    cols = tl.arange(0, BLOCK_C)
    o_base = o_ptr + i * o_sb + s_idx[:, None] * o_ss
    u_base = u_ptr + i * S * C + s_idx[:, None] * C

    d2 = tl.zeros([SP, SP], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        m = s_ok[:, None] & (cc < C)[None, :]
        ot = tl.load(o_base + cc[None, :], mask=m, other=0.0).to(tl.float32)
        diff = ot[:, None, :] - ot[None, :, :]
        d2 += tl.sum(diff * diff, axis=2)
    pair_ok = s_ok[:, None] & s_ok[None, :]
    a = tl.where(pair_ok, tl.sqrt(d2), 0.0)
    a_max = tl.max(tl.max(a, axis=1), axis=0)
    a = tl.where(a_max > 0.0, a / tl.where(a_max > 0.0, a_max, 1.0), 0.0)
    a_hat = a + tl.where(pair_ok & (s_idx[:, None] == s_idx[None, :]), 1.0, 0.0)
    deg = tl.sum(a_hat, axis=1)
    d_is = tl.where(s_ok, 1.0 / tl.sqrt(tl.where(s_ok, deg, 1.0)), 0.0)
    a_til = d_is[:, None] * a_hat * d_is[None, :]

    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        c_ok = cc < C
        m = s_ok[:, None] & c_ok[None, :]
        v = tl.load(u_base + cc[None, :], mask=m, other=0).to(tl.float32)
        for _ in range(0, layers):
            v = tl.sum(a_til[:, :, None] * v[None, :, :], axis=1)
        v = tl.where(s_ok[:, None], v * inv_crop_temperature, float("-inf"))
        w = tl.exp(v - tl.max(v, axis=0)[None, :])
        w = w / tl.sum(w, axis=0)[None, :]
        ot = tl.load(o_base + cc[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.sum(w * ot, axis=0)
        tl.store(z_ptr + i * C + cc, z.to(z_ptr.dtype.element_ty), mask=c_ok)


@_utils.register_op("mskd::reconstruct_logits")
def _reconstruct_logits(
    patch_logits: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    layers: int,
    k_mode: int,
    k_value: int,
    k_tensor: torch.Tensor,
    crop_temperature: float,
) -> torch.Tensor:
    """``z (B, C)`` in ``patch_logits.dtype``; ``k_mode`` 0: ``k_value``, 1: ``k_tensor``, 2: ``S * sum(y)``."""
    b, s, c = patch_logits.shape
    o = _utils.rowwise(patch_logits)
    q = _utils.rowwise(logits)
    y = _utils.as_label_tensor(targets)
    dev = o.device
    n = b * s * c
    n_blocks = triton.cdiv(n, _BLOCK)
    delta = _utils.new_output((n,), torch.result_type(patch_logits, logits), dev)
    counts = _utils.new_output((n_blocks,), torch.int32, dev)
    _utils.launch(
        _delta_kernel, (n_blocks,),
        o, q, y, delta, counts, b, s, c, o.stride(0), o.stride(1), q.stride(0), y.stride(0),
        COUNT=k_mode == _K_DEFAULT, BLOCK=_BLOCK, num_warps=4,
    )
    order = torch.sort(delta, descending=True, stable=True).indices
    u = _utils.new_output((b, s, c), torch.int8, dev)
    _utils.launch(
        _sign_kernel, (n_blocks,),
        order, u, k_tensor, counts, k_value, n_blocks, s, n, K_MODE=k_mode, BLOCK=_BLOCK, num_warps=4,
    )
    z = _utils.new_output((b, c), patch_logits.dtype, dev)
    sp = max(2, _utils.next_pow2(s))
    block_c = min(_utils.next_pow2(c), max(16, _TILE // (sp * sp)))
    _utils.launch(
        _graph_kernel, (b,),
        o, u, z, s, c, o.stride(0), o.stride(1), layers, 1.0 / crop_temperature, SP=sp, BLOCK_C=block_c,
        num_warps=_utils.warps_for(sp * sp * block_c),
    )
    return z


def _k_tensor(k: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``k`` as an int64 tensor on ``device``, the kernel's input.

    A ``k`` on another device (typically a CPU tensor with CUDA inputs) is copied with
    ``non_blocking=True``: the copy is queued on the current stream and the host does not wait for
    the GPU (a blocking copy would synchronise every call). ``k`` is only read by the kernel.
    """
    k = k.detach()
    if k.device != device:
        return k.to(device=device, dtype=torch.int64, non_blocking=True)
    return k.to(dtype=torch.int64)


def reconstruct_logits(
    patch_logits: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    layers: int = 2,
    k: int | torch.Tensor | None = None,
    crop_temperature: float = 1.0,
) -> torch.Tensor:
    """Reconstructed logits ``z (B, C)`` of SPEC 4 (see :func:`mskd_fast.reference.reconstruct_logits`).

    Args:
        patch_logits: ``o (B, S, C)`` float32/bfloat16/float16 teacher crop logits.
        logits: ``q (B, C)`` student logits (only used for the pseudo labels; never differentiated).
        targets: ``(B, C)`` 0/1 labels; the default ``k`` is ``S * #(targets > 0.5)``.
        layers: propagation steps (``>= 0``).
        k: ``+1`` labels over the batch (int or 0-dim integer tensor), clamped to ``[0, B*S*C]``.
            A tensor on another device than the inputs (e.g. CPU) is copied without a host sync.
        crop_temperature: the crop softmax is taken of ``propagated / crop_temperature`` (> 0; 1 = paper).

    Returns:
        ``z`` in ``patch_logits.dtype`` (float32 math), without gradient.
    """
    _utils.check_kernel_tensor("patch_logits", patch_logits, 3, "(B, S, C)")
    _utils.check_kernel_tensor("logits", logits, 2, "(B, C)")
    b, _, c = patch_logits.shape
    if tuple(logits.shape) != (b, c):
        raise ValueError(f"logits must have shape (B, C) = ({b}, {c}), got {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    _utils.check_same_shape("targets", targets, "logits", logits)
    _utils.check_targets_dtype("targets", targets)
    _utils.check_same_device(patch_logits=patch_logits, logits=logits, targets=targets)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(f"layers must be an int >= 0, got {layers!r}")
    if not (isinstance(crop_temperature, (int, float)) and 0 < crop_temperature < float("inf")):
        raise ValueError(f"crop_temperature must be a finite number > 0, got {crop_temperature!r}")
    empty = torch.empty(0, dtype=torch.int64, device=patch_logits.device)
    if k is None:
        mode, value, k_tensor = _K_DEFAULT, 0, empty
    elif isinstance(k, torch.Tensor):
        if k.numel() != 1 or k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
            raise TypeError(f"k must be an int or a 0-dim integer tensor, got {k.dtype} of shape {tuple(k.shape)}")
        mode, value, k_tensor = _K_TENSOR, 0, _k_tensor(k, patch_logits.device)
    elif isinstance(k, int) and not isinstance(k, bool):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        mode, value, k_tensor = _K_CONST, min(k, patch_logits.numel()), empty
    else:
        raise TypeError(f"k must be an int, a 0-dim integer tensor or None, got {type(k).__name__}")
    return torch.ops.mskd.reconstruct_logits(
        patch_logits.detach(), logits.detach(), targets.detach(), layers, mode, value, k_tensor.reshape(-1),
        float(crop_temperature),
    )
