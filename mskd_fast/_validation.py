"""Argument checks shared by the public ops and losses.

Each check raises ``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape, value or
device) with a message naming the argument and the expected form. Checks never read tensor
values on an accelerator (no host sync); value-range checks of targets run on CPU tensors only,
and not while ``torch.compile`` traces (a data-dependent branch would break the graph).
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "reference", "triton")


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value: torch.Tensor) -> None:
    check_tensor(name, value)
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {value.dtype}")


def check_rank(name: str, value: torch.Tensor, rank: int, layout: str) -> None:
    if value.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(value.shape)}")


def check_nonempty(name: str, value: torch.Tensor, layout: str) -> None:
    if value.numel() == 0:
        raise ValueError(f"{name} must be non-empty with shape {layout}, got {tuple(value.shape)}")


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_targets(name: str, targets: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Targets: same shape as ``like``, bool/integer/floating dtype, values in {0, 1} (checked on CPU)."""
    check_tensor(name, targets)
    check_same_shape(name, targets, like_name, like)
    if targets.dtype.is_complex:
        raise TypeError(f"{name} must hold 0/1 labels (bool, integer or float), got {targets.dtype}")
    checkable = targets.device.type == "cpu" and not torch.compiler.is_compiling()
    if checkable and targets.dtype != torch.bool and targets.numel() > 0:
        bad = (targets != 0) & (targets != 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must contain only 0 and 1, found {targets[bad].flatten()[0].item()!r}")


def check_positive(name: str, value: float) -> None:
    if not (value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (value >= 0):
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_logits_pair(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None,
    student_name: str = "student", teacher_name: str = "teacher",
) -> None:
    """Two ``(B, C)`` logit tensors (and optional ``(B, C)`` targets) on one device."""
    check_float(student_name, student)
    check_float(teacher_name, teacher)
    check_rank(student_name, student, 2, "(B, C)")
    check_nonempty(student_name, student, "(B, C)")
    check_same_shape(teacher_name, teacher, student_name, student)
    if targets is not None:
        check_targets("targets", targets, student_name, student)
    check_same_device(**{student_name: student, teacher_name: teacher, "targets": targets})
