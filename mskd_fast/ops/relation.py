"""Public relation loss of Locality-SD (SPEC 3)."""

from __future__ import annotations

import torch

from .. import reference
from .._validation import (
    check_choice,
    check_float,
    check_nonempty,
    check_positive,
    check_rank,
    check_same_device,
    check_same_shape,
)
from ._backend import use_triton

__all__ = ["relation_loss", "check_crop_logits"]


def check_crop_logits(name: str, value: torch.Tensor) -> None:
    check_float(name, value)
    check_rank(name, value, 3, "(B, S, C)")
    check_nonempty(name, value, "(B, S, C) with B, S, C > 0")


def relation_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, delta: float = 1.0, terms: str = "both", backend: str = "auto"
) -> torch.Tensor:
    """Relation distillation between crop logits (L-SD), SPEC 3.

    Args:
        student: ``r (B, S, C)``, the student's ROI-branch crop logits (receives the gradient).
        teacher: ``o (B, S, C)``, the teacher's crop logits (no gradient).
        delta: Huber threshold (> 0).
        terms: ``"both"`` (SPEC 3) or ``"patch"``: the within-image term only (the authors' code; the
            ``official`` recipe's ``--lsd-terms patch``).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        Scalar: Huber of the normalised within-image crop distances (mean over ``B*S*S``) plus
        (``terms="both"``) Huber of the normalised distances between per-image crop means (mean over ``B*B``).
    """
    check_crop_logits("student", student)
    check_crop_logits("teacher", teacher)
    check_same_shape("teacher", teacher, "student", student)
    check_same_device(student=student, teacher=teacher)
    check_positive("delta", delta)
    check_choice("terms", terms, reference.LSD_TERMS)
    if use_triton(backend, student, teacher):
        from mskd_fast import kernels

        return kernels.relation_loss(student, teacher, delta=delta, terms=terms)
    return reference.relation_loss(student, teacher, delta=delta, terms=terms)
