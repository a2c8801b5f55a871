"""Argument checks shared by the public ops and losses.

Each check raises ``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape, value or
device) with a message naming the argument and the expected form. Checks never read tensor
values on an accelerator (no host sync); value-range checks of targets run on CPU tensors only,
and not while ``torch.compile`` traces (a data-dependent branch would break the graph).
"""

from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "reference", "triton")
_NUMBER_TYPES = (numbers.Real, torch.SymInt, torch.SymFloat)


def check_tensor(name: str, value) -> torch.Tensor:
    """``value`` is a ``torch.Tensor``; returns it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value: torch.Tensor) -> None:
    """A tensor of a floating dtype (float16/bfloat16/float32/float64)."""
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
    """All non-``None`` tensors given (by name) live on one device."""
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


def check_number(name: str, value) -> None:
    """A real number (``int``/``float``, not ``bool``; symbolic ints/floats under ``torch.compile`` pass)."""
    if isinstance(value, bool) or not isinstance(value, _NUMBER_TYPES):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")


def _finite(value) -> bool:
    return not isinstance(value, numbers.Real) or math.isfinite(value)


def check_positive(name: str, value) -> None:
    """A finite real number ``> 0``."""
    check_number(name, value)
    if not (_finite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 (and finite), got {value!r}")


def check_nonnegative(name: str, value) -> None:
    """A finite real number ``>= 0``."""
    check_number(name, value)
    if not (_finite(value) and value >= 0):
        raise ValueError(f"{name} must be >= 0 (and finite), got {value!r}")


def check_unit_interval(name: str, value) -> None:
    """A real number in ``[0, 1]``."""
    check_number(name, value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_int(name: str, value, minimum: int = 0) -> None:
    """An ``int`` (not ``bool``) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if not (value >= minimum):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def check_choice(name: str, value: str, choices) -> None:
    """``value`` is one of ``choices`` (compared with ``==``; unhashable values are fine)."""
    if not isinstance(value, str) or value not in choices:
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
