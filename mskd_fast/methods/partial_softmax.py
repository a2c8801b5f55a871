"""UD-style "pick-all-labels" partial softmax (Song et al., ACM MM 2021, the calibration loss of UD).

For logits ``z (B, C)``, multi-hot ``y`` and ``x = z / T``, each positive ``t`` of row ``i`` is classified
against the row's negatives only::

    l_i = (1 / |M_i|) * sum_{t in M_i} -log( e^{x_t} / (e^{x_t} + sum_{k not in M_i} e^{x_k}) )

(0 for a row without positives; ``-log 1 = 0`` for every positive of a row without negatives), and the
loss is ``mean_i l_i`` over all ``B`` rows. It is SPEC 1's reformulated softmax used as a supervised
target: ``l_i = -mean_{t in M_i} (log rs_t + log |M_i|)``. In the accuracy study it is the *label-push
control*: with the teacher equal to the student, the paper-form MBD gradient points nearly the same way
as this loss (docs/ACCURACY.md), so ``BCE + c * l`` without any crop, teacher or self-distillation tells
whether MSKD's gain is that push.

``--method ud`` of the trainer trains ``BCE + c * l`` with ``c = --ud-weight`` (default 0.1, chosen on val
from {0.05, 0.1, 0.25} in the study) and ``T = --ud-temperature`` (default 4, MSKD's T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_float, check_nonnegative, check_positive, check_rank, check_targets

__all__ = ["PartialSoftmaxBCELoss", "partial_softmax_loss"]


def partial_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 4.0,
                         reduction: str = "mean") -> torch.Tensor:
    """The pick-all-labels partial-softmax cross-entropy (module docstring), computed in float32 or wider.

    ``logits (B, C)`` float, ``targets (B, C)`` 0/1 (any dtype); ``reduction`` ``"mean"`` (over the ``B`` rows),
    ``"sum"`` or ``"none"`` (``(B,)``). Finite for logits of +-1e4; differentiable in ``logits``.
    """
    check_float("logits", logits)
    check_rank("logits", logits, 2, "(B, C)")
    check_targets("targets", targets, "logits", logits)
    check_positive("temperature", temperature)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    x = logits.float() / temperature if logits.dtype in (torch.float16, torch.bfloat16) else logits / temperature
    pos = targets > 0.5
    neg_inf = torch.finfo(x.dtype).min
    lam = torch.logsumexp(torch.where(pos, neg_inf, x), dim=1, keepdim=True)  # over the negatives
    has_neg = (~pos).any(dim=1, keepdim=True)
    lam = torch.where(has_neg, lam, torch.full_like(lam, float("-inf")))
    per_pos = torch.logaddexp(x, lam) - x  # -log(e^x_t / (e^x_t + sum_neg e^x_k)) >= 0
    n_pos = pos.sum(dim=1)
    rows = torch.where(pos, per_pos, 0.0).sum(dim=1) / n_pos.clamp(min=1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


class PartialSoftmaxBCELoss(nn.Module):
    """``BCE + weight * partial_softmax_loss(q, y, temperature)``: the trainer's ``--method ud``.

    ``forward(q, r, o, q_prev, targets)`` has :class:`mskd_fast.losses.MSKDLoss`'s signature so the
    training step can call either; ``r``, ``o`` and ``q_prev`` must be ``None``. Returns ``(total, terms)``
    with the detached, unweighted terms ``"bce"`` and ``"ud"``.
    """

    def __init__(self, weight: float = 0.1, temperature: float = 4.0) -> None:
        super().__init__()
        check_nonnegative("weight", weight)
        check_positive("temperature", temperature)
        self.weight, self.temperature = weight, temperature

    diagnostic_terms = ("bce", "ud")

    def forward(self, q, r, o, q_prev, targets, return_parts: bool = False):
        if r is not None or o is not None or q_prev is not None:
            raise ValueError("the UD partial-softmax loss uses no crops and no previous logits: r, o, q_prev must "
                             "be None")
        bce = F.binary_cross_entropy_with_logits(q, targets.to(q.dtype))
        ud = partial_softmax_loss(q, targets, self.temperature)
        weighted = self.weight * ud
        total = bce + weighted
        terms = {"bce": bce.detach().float(), "ud": ud.detach().float()}
        return (total, terms, {"bce": bce, "ud": weighted}) if return_parts else (total, terms)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"
