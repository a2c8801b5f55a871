"""Public distillation ops: reformulated softmax, MBD loss (SPEC 1-2) and the plain KD ablation."""

from __future__ import annotations

import torch

from .. import reference
from .._validation import (
    check_bool,
    check_choice,
    check_float,
    check_logits_pair,
    check_nonempty,
    check_nonnegative,
    check_positive,
    check_rank,
    check_same_device,
    check_targets,
    check_unit_interval,
)
from ._backend import use_triton

__all__ = ["reformulated_softmax", "mbd_loss", "kd_loss"]


def reformulated_softmax(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, log: bool = False
) -> torch.Tensor:
    """Reformulated softmax RS (SPEC 1) of ``logits / temperature``.

    Args:
        logits: ``(B, C)`` floating logits.
        targets: ``(B, C)`` multi-hot labels in {0, 1}.
        temperature: ``T > 0``.
        log: return ``log RS`` instead of ``RS``.

    Returns:
        ``(B, C)`` in ``logits.dtype``; rows sum to 1 ("each positive against all negatives").
    """
    check_float("logits", logits)
    check_rank("logits", logits, 2, "(B, C)")
    check_nonempty("logits", logits, "(B, C)")
    check_targets("targets", targets, "logits", logits)
    check_same_device(logits=logits, targets=targets)
    check_positive("temperature", temperature)
    check_bool("log", log)
    return reference.reformulated_softmax(logits, targets, temperature=temperature, log=log)


def check_mbd_args(temperature, omega, gamma_pos, gamma_neg, weight_grad, reduction, form) -> None:
    """The hyper-parameters of :func:`mbd_loss` (shared with ``MBDLoss`` / ``MSKDLoss`` constructors)."""
    check_positive("temperature", temperature)
    check_unit_interval("omega", omega)
    check_bool("weight_grad", weight_grad)
    check_nonnegative("gamma_pos", gamma_pos)
    check_nonnegative("gamma_neg", gamma_neg)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_choice("form", form, reference.MBD_FORMS)


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
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-label balanced distillation (MBD) loss, SPEC 2.

    Args:
        student: ``(B, C)`` student logits (receives the gradient).
        teacher: ``(B, C)`` teacher logits (constant: never receives a gradient).
        targets: ``(B, C)`` multi-hot labels in {0, 1}.
        temperature, omega, gamma_pos, gamma_neg: SPEC 2 hyper-parameters.
        weight_grad: differentiate the modulating weights too (default: treat them as constants).
        reduction: ``"mean"`` (over rows), ``"sum"`` or ``"none"`` (``(B,)``).
        form: ``"divergence"`` (default): the weighted generalized KL
            ``sum_j w_j (P_j log(P_j/Q_j) - P_j + Q_j)``, >= 0 with zero gradient at
            ``student == teacher``; ``"paper"``: eq. 14 as written, ``sum_j w_j P_j log(P_j/Q_j)``
            (not a divergence: it can be negative and self-distillation with it sharpens without bound).
        backend: ``"auto"`` (fused Triton kernel for CUDA tensors), ``"reference"`` or ``"triton"``.

    Returns:
        The loss, ``T**2`` times the reduced per-row sum of the form's weighted terms.
    """
    check_logits_pair(student, teacher, targets)
    check_mbd_args(temperature, omega, gamma_pos, gamma_neg, weight_grad, reduction, form)
    kwargs = dict(
        temperature=temperature, omega=omega, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
        weight_grad=weight_grad, reduction=reduction, form=form,
    )
    if use_triton(backend, student, teacher, targets):
        from mskd_fast import kernels

        return kernels.mbd_loss(student, teacher, targets, **kwargs)
    return reference.mbd_loss(student, teacher, targets, **kwargs)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0, reduction: str = "batchmean"
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))``: the "MBD off" ablation (paper Table 3).

    ``student``/``teacher``: ``(B, C)``; ``reduction``: ``"batchmean"``, ``"sum"`` or ``"none"`` (``(B,)``).
    """
    check_logits_pair(student, teacher, None)
    check_positive("temperature", temperature)
    check_choice("reduction", reduction, ("batchmean", "sum", "none"))
    return reference.kd_loss(student, teacher, temperature=temperature, reduction=reduction)
