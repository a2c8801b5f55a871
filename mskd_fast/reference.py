"""Pure-PyTorch reference of every MSKD operation (the oracle the fast kernels are tested against).

Written for clarity, not speed: every function follows ``SPEC.md`` line by line, works in any
floating dtype (float64 included) and is differentiable where the specification says so.
Inputs are assumed valid; argument checking lives in :mod:`mskd_fast.ops`.

Shapes: ``B`` batch, ``S`` crops per image, ``C`` classes. Per-crop tensors are image-major:
row ``i*S + s`` of a ``(B*S, ...)`` tensor is crop ``s`` of image ``i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "log_reformulated_softmax",
    "reformulated_softmax",
    "mbd_loss",
    "kd_loss",
    "relation_loss",
    "pairwise_distances",
    "default_k",
    "pseudo_labels",
    "propagate",
    "reconstruct_logits",
    "match_logit_scale",
    "crop_resize",
    "roi_pool",
    "boxes_to_rois",
]

_WEIGHT_EPS = 1e-12  # |a|**g := (a*a + eps)**(g/2) when weights are differentiated (SPEC 2)
_DIST_EPS = 1e-12  # sqrt(. + eps) in the relation distances (SPEC 3)
_NORM_EPS = 1e-12  # clamp of the relation normalisers (SPEC 3)
_STD_EPS = 1e-6  # floor of the teacher's row std in match_logit_scale (SPEC 4 step 5)
MBD_FORMS = ("divergence", "paper")
LSD_TERMS = ("both", "patch")  # L-SD: SPEC 3's two terms, or the within-image term only (official recipe)


def _masked_logsumexp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the entries of the last axis where ``mask`` is true, keepdim.

    Rows without any selected entry give ``-inf``; their gradient is zero (never NaN).
    """
    has_any = mask.any(dim=-1, keepdim=True)
    masked = values.masked_fill(~mask, float("-inf"))
    # An all -inf row would give a NaN gradient inside logsumexp: feed it zeros, then discard.
    masked = torch.where(has_any, masked, torch.zeros_like(values))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    return torch.where(has_any, lse, torch.full_like(lse, float("-inf")))


def log_reformulated_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log of the reformulated softmax RS (SPEC 1, paper eq. 13), row-wise over the last axis.

    Args:
        logits: ``(B, C)`` floating logits (already divided by any temperature).
        targets: ``(B, C)`` multi-hot labels in {0, 1} (any dtype); ``M_i = {j: y_ij = 1}``.

    Returns:
        ``(B, C)`` log-probabilities in ``logits.dtype``; each row of ``exp`` sums to 1.
        Positive ``j``: ``x_j - L_j - log|M|``; negative ``j``: ``x_j + logsumexp_t(-L_t) - log|M|``
        with ``lam = logsumexp`` over negatives and ``L_t = logaddexp(x_t, lam)``. Rows with no
        positive are ``log_softmax(x)``; rows where every class is positive are ``-log C``
        (constant, zero gradient).
    """
    pos = targets > 0.5
    neg = ~pos
    num_pos = pos.sum(dim=-1, keepdim=True)
    num_classes = logits.shape[-1]

    lam = _masked_logsumexp(logits, neg)
    big_l = torch.logaddexp(logits, lam)
    log_m = torch.log(num_pos.clamp(min=1).to(logits.dtype))
    pos_part = logits - big_l - log_m
    neg_part = logits + _masked_logsumexp(-big_l, pos) - log_m
    out = torch.where(pos, pos_part, neg_part)

    out = torch.where(num_pos == 0, torch.log_softmax(logits, dim=-1), out)
    uniform = torch.full_like(out, -math.log(num_classes))
    return torch.where(num_pos == num_classes, uniform, out)


def reformulated_softmax(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, log: bool = False
) -> torch.Tensor:
    """RS of ``logits / temperature`` (``(B, C)``); ``log=True`` returns its logarithm."""
    out = log_reformulated_softmax(logits / temperature, targets)
    return out if log else out.exp()


def _mbd_weights(
    p: torch.Tensor, q: torch.Tensor, pos: torch.Tensor, omega: float, gamma_pos: float, gamma_neg: float,
    weight_grad: bool,
) -> torch.Tensor:
    gap = torch.where(pos, (1.0 - omega) + omega * p - q, omega * p - q)
    gamma = torch.where(pos, torch.full_like(p, gamma_pos), torch.full_like(p, gamma_neg))
    if weight_grad:
        return (gap * gap + _WEIGHT_EPS) ** (gamma / 2)
    return gap.detach().abs() ** gamma


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def mbd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    omega: float = 0.5,
    gamma_pos: float = 0.25,
    gamma_neg: float = 1.0,
    weight_grad: bool = False,
    reduction: str = "mean",
    form: str = "divergence",
) -> torch.Tensor:
    """Multi-label balanced distillation loss (SPEC 2, paper eqs. 14-16).

    Args:
        student, teacher: ``(B, C)`` logits; the teacher never receives a gradient.
        targets: ``(B, C)`` multi-hot labels in {0, 1}.
        form: ``"divergence"`` (default): per element ``w (P (log P - log Q) - P + Q)``, the
            weighted generalized KL (>= 0, zero gradient at ``student == teacher``);
            ``"paper"``: ``w P (log P - log Q)`` (eq. 14 as written; may be negative).

    Returns:
        ``T**2 * reduce_i sum_j (per-element term)`` with ``P = RS(teacher/T)``,
        ``Q = RS(student/T)``; a scalar for ``mean``/``sum``, ``(B,)`` for ``none``.
    """
    if form not in MBD_FORMS:
        raise ValueError(f"form must be 'divergence' or 'paper', got {form!r}")
    pos = targets > 0.5
    log_p = log_reformulated_softmax(teacher.detach() / temperature, targets)
    log_q = log_reformulated_softmax(student / temperature, targets)
    p, q = log_p.exp(), log_q.exp()
    w = _mbd_weights(p, q, pos, omega, gamma_pos, gamma_neg, weight_grad)
    bracket = p * (log_p - log_q)
    if form == "divergence":
        bracket = bracket - p + q
    per_row = (w * bracket).sum(dim=-1)
    return temperature**2 * _reduce(per_row, reduction)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, reduction: str = "batchmean"
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` (the "MBD off" ablation, SPEC 2).

    ``student``/``teacher``: ``(B, C)``. ``reduction``: ``batchmean`` (default), ``sum``, ``none`` (``(B,)``).
    """
    log_p = torch.log_softmax(teacher.detach() / temperature, dim=-1)
    log_q = torch.log_softmax(student / temperature, dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if reduction == "batchmean":
        return temperature**2 * per_row.mean()
    if reduction in ("sum", "none"):
        return temperature**2 * _reduce(per_row, reduction)
    raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")


def pairwise_distances(points: torch.Tensor) -> torch.Tensor:
    """``(..., N, C) -> (..., N, N)``: ``sqrt(||a_j - a_k||^2 + 1e-12)`` off the diagonal, 0 on it."""
    diff = points.unsqueeze(-2) - points.unsqueeze(-3)
    dist = torch.sqrt((diff * diff).sum(dim=-1) + _DIST_EPS)
    n = points.shape[-2]
    eye = torch.eye(n, dtype=torch.bool, device=points.device)
    return dist.masked_fill(eye, 0.0)


def _normalised(dist: torch.Tensor, count: int) -> torch.Tensor:
    return dist / (dist.sum() / count).clamp(min=_NORM_EPS)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, delta: float = 1.0,
                  terms: str = "both") -> torch.Tensor:
    """Locality relation loss L-SD (SPEC 3, paper eqs. 3-4).

    Args:
        student: ``r (B, S, C)`` crop logits of the student (ROI branch).
        teacher: ``o (B, S, C)`` crop logits of the teacher; receives no gradient.
        delta: Huber threshold.
        terms: ``"both"`` (SPEC 3) or ``"patch"`` (the within-image term only, as the authors' code
            uses it: the ``official`` recipe).

    Returns:
        Scalar: Huber between normalised within-image crop distances (mean over ``B*S*S``
        entries) plus, with ``terms="both"``, Huber between normalised distances of the per-image
        crop means (mean over ``B*B`` entries). A term whose off-diagonal is empty (``S=1`` or
        ``B=1``) is 0.
    """
    if terms not in LSD_TERMS:
        raise ValueError(f"terms must be one of {LSD_TERMS}, got {terms!r}")
    teacher = teacher.detach()
    b, s, _ = student.shape
    total = (student * 0).sum()
    if s > 1:
        count = b * s * (s - 1)
        dp_s = _normalised(pairwise_distances(student), count)
        dp_t = _normalised(pairwise_distances(teacher), count)
        total = total + F.huber_loss(dp_s, dp_t, delta=delta, reduction="mean")
    if b > 1 and terms == "both":
        count = b * (b - 1)
        db_s = _normalised(pairwise_distances(student.mean(dim=1)), count)
        db_t = _normalised(pairwise_distances(teacher.mean(dim=1)), count)
        total = total + F.huber_loss(db_s, db_t, delta=delta, reduction="mean")
    return total


def default_k(targets: torch.Tensor, num_crops: int) -> torch.Tensor:
    """SPEC 4 default ``k = S * sum(y)`` as a 0-dim int64 tensor on ``targets.device`` (no host sync)."""
    return (targets > 0.5).sum().to(torch.int64) * num_crops


def pseudo_labels(
    patch_logits: torch.Tensor, logits: torch.Tensor, k: int | torch.Tensor
) -> torch.Tensor:
    """Batch-wide pseudo labels ``u`` (SPEC 4 step 2) as int8 ``(B, S, C)``.

    ``delta = o - q[:, None, :]``; over all ``N = B*S*C`` entries the ``k`` largest get ``+1`` and
    the ``min(k, N-k)`` smallest of the rest get ``-1`` (``k`` clamped to ``[0, N]``). Ties are
    broken by flat index (the earlier entry ranks higher), via a stable sort, so the result is
    deterministic on every device. ``k`` may be a Python int or a 0-dim integer tensor.
    """
    delta = (patch_logits - logits.detach().unsqueeze(1)).detach().flatten()
    n = delta.numel()
    k_t = torch.as_tensor(k, device=delta.device).to(torch.int64).clamp(0, n)
    k_neg = torch.minimum(k_t, n - k_t)
    order = torch.sort(delta, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=delta.device)
    u = (rank < k_t).to(torch.int8) - (rank >= n - k_neg).to(torch.int8)
    return u.view(patch_logits.shape)


def crop_adjacency(patch_logits: torch.Tensor) -> torch.Tensor:
    """Normalised per-image crop graph ``Atil (B, S, S)`` of SPEC 4 step 3."""
    o = patch_logits
    diff = o.unsqueeze(-2) - o.unsqueeze(-3)
    a = torch.sqrt((diff * diff).sum(dim=-1))
    a_max = a.amax(dim=(-2, -1), keepdim=True)
    a = torch.where(a_max > 0, a / torch.where(a_max > 0, a_max, torch.ones_like(a_max)), torch.zeros_like(a))
    a_hat = a + torch.eye(o.shape[1], dtype=o.dtype, device=o.device)
    d_inv_sqrt = a_hat.sum(dim=-1).rsqrt()
    return d_inv_sqrt.unsqueeze(-1) * a_hat * d_inv_sqrt.unsqueeze(-2)


def propagate(patch_logits: torch.Tensor, u: torch.Tensor, layers: int = 2) -> torch.Tensor:
    """``layers`` steps of ``u_i <- Atil_i @ u_i`` (SPEC 4 step 3). ``u``: ``(B, S, C)``; returns float."""
    a_til = crop_adjacency(patch_logits)
    u = u.to(patch_logits.dtype)
    for _ in range(layers):
        u = a_til @ u
    return u


@torch.no_grad()
def reconstruct_logits(
    patch_logits: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    layers: int = 2,
    k: int | torch.Tensor | None = None,
    crop_temperature: float = 1.0,
) -> torch.Tensor:
    """Reconstructed teacher logits ``z (B, C)`` for R-SD (SPEC 4), without gradient.

    ``o = patch_logits (B, S, C)``, ``q = logits (B, C)``, ``targets (B, C)``; ``k`` defaults to
    ``S * sum(targets)``. ``z_i = sum_s softmax_s(propagate(u) / crop_temperature)[s] * o_is``;
    ``crop_temperature = 1`` is the paper (eq. 8); below 1 the crop weights are sharper (a departure
    from the paper, an option of the accuracy study).
    """
    o = patch_logits.detach()
    if k is None:
        k = default_k(targets, o.shape[1])
    u = pseudo_labels(o, logits, k)
    weights = torch.softmax(propagate(o, u, layers) / crop_temperature, dim=1)
    return (weights * o).sum(dim=1)


def match_logit_scale(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Give each teacher row the student row's spread (SPEC 4 step 5), without gradient.

    ``z (B, C)`` teacher logits, ``q (B, C)`` student logits (detached). Returns
    ``mean_c(z) + (z - mean_c(z)) * std_c(q) / max(std_c(z), 1e-6)`` per row, population std over
    the ``C`` classes, in ``teacher.dtype``. ``C = 1`` rows (std 0) come back unchanged.
    """
    z = z.detach()
    q = q.detach().to(z.dtype)
    mean_z = z.mean(dim=-1, keepdim=True)
    std_z = z.std(dim=-1, correction=0, keepdim=True)
    std_q = q.std(dim=-1, correction=0, keepdim=True)
    return mean_z + (z - mean_z) * (std_q / std_z.clamp(min=_STD_EPS))


def boxes_to_rois(boxes: torch.Tensor) -> torch.Tensor:
    """``(B, S, 4)`` boxes -> ``(B*S, 5)`` torchvision ROIs ``(batch_index, x1, y1, x2, y2)``, image-major."""
    b, s, _ = boxes.shape
    index = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat_interleave(s)
    return torch.cat([index.unsqueeze(1), boxes.reshape(b * s, 4)], dim=1)


def _as_pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    out_h, out_w = size
    return int(out_h), int(out_w)


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    mean=None,
    std=None,
) -> torch.Tensor:
    """Crop every box and resize it bilinearly: ``(B,Cin,H,W)``, ``(B,S,4)`` -> ``(B*S,Cin,oh,ow)``.

    Equals ``torchvision.ops.roi_align(images.float(), rois, size, 1.0, sampling_ratio=1,
    aligned=True)`` (float64 kept as float64), then ``(v - mean) / std`` per channel when given,
    cast to ``out_dtype`` (default: the input dtype if floating, else float32), and converted to
    channels-last memory format when asked.
    """
    from torchvision.ops import roi_align

    out_h, out_w = _as_pair(size)
    work = images if images.dtype == torch.float64 else images.float()
    rois = boxes_to_rois(boxes.to(work.dtype))
    out = roi_align(work, rois, (out_h, out_w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    if mean is not None or std is not None:
        cin = images.shape[1]
        mean_t = torch.as_tensor(0.0 if mean is None else mean, dtype=out.dtype, device=out.device)
        std_t = torch.as_tensor(1.0 if std is None else std, dtype=out.dtype, device=out.device)
        out = (out - mean_t.expand(cin).view(1, cin, 1, 1)) / std_t.expand(cin).view(1, cin, 1, 1)
    if out_dtype is None:
        out_dtype = images.dtype if images.is_floating_point() else torch.float32
    out = out.to(out_dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def roi_pool(
    features: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, output_size=1, mode: str = "max"
) -> torch.Tensor:
    """Pool every box of a feature map: ``(B,D,h,w)``, ``(B,S,4)`` -> ``(B*S,D,oh,ow)``, image-major.

    ``mode="max"`` is ``torchvision.ops.roi_pool``; ``mode="avg"`` is ``torchvision.ops.roi_align``
    with ``aligned=True`` and adaptive sampling. Boxes are in input-image pixels; ``spatial_scale``
    maps them onto the feature map (``h / H``). Half-precision inputs are pooled in float32 and
    cast back.
    """
    from torchvision.ops import roi_align
    from torchvision.ops import roi_pool as tv_roi_pool

    out_size = _as_pair(output_size)
    work = features if features.dtype in (torch.float32, torch.float64) else features.float()
    rois = boxes_to_rois(boxes.to(work.dtype))
    if mode == "max":
        out = tv_roi_pool(work, rois, out_size, spatial_scale)
    elif mode == "avg":
        out = roi_align(work, rois, out_size, spatial_scale, sampling_ratio=-1, aligned=True)
    else:
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    return out.to(features.dtype)
