"""Helpers shared by the Triton kernels: op registration, launching, sizing, input checks, outputs.

``POISON_OUTPUTS`` (module-level switch, also set by the environment variable
``MSKD_FAST_POISON_OUTPUTS=1``) makes every kernel output start as NaN (floating) or an
out-of-range sentinel (integer) instead of uninitialised memory, so a test catches any element
a kernel forgot to write. It is read when an op runs (or is traced), never in the hot path of
the kernels themselves.
"""

from __future__ import annotations

import os

import torch
import triton
from torch.library import triton_op, wrap_triton

POISON_OUTPUTS: bool = os.environ.get("MSKD_FAST_POISON_OUTPUTS", "0") not in ("", "0")

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Decided once, at import: it also decides how the ops are registered (see register_op).
_INTERPRETED = interpreter_enabled()


def register_op(name: str):
    """Decorator registering ``fn`` as the ``torch.library`` op ``name`` (``"mskd::..."``).

    Normally a ``triton_op``: ``torch.compile`` decomposes it into its Triton kernels (via
    ``wrap_triton``), so Inductor sees and schedules them with no graph break. Under the Triton
    interpreter the kernels are Python functions that ``wrap_triton`` cannot capture, so the op is
    registered as an opaque ``custom_op`` instead, with ``fn`` itself as its fake implementation
    (``launch`` skips kernels on fake tensors). That keeps ``torch.compile`` of the kernels usable
    on a CPU-only machine: the compiled graph calls the op, which runs the interpreted kernels.
    """

    def decorate(fn):
        if _INTERPRETED:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fn)
            return op
        return triton_op(name, mutates_args=())(fn)

    return decorate


def _is_fake(t: torch.Tensor) -> bool:
    return torch._subclasses.fake_tensor.is_fake(t)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` on the device of its tensor arguments.

    Compiled (GPU) Triton: through ``wrap_triton`` so that ``torch.compile`` captures the launch.
    Under the interpreter the kernel is called directly (no-op on fake tensors): the op is opaque
    there, and torch 2.11's ``wrap_triton`` (torch/_library/triton.py) raises for anything that
    is not a ``JITFunction``/``Autotuner``, which the interpreter's ``InterpretedFunction`` is not
    (torch 2.14 passes those through). The GPU path of 2.11 is unaffected: without the interpreter
    ``@triton.jit`` returns a ``JITFunction``, which 2.11 wraps as 2.14 does. On real
    CUDA tensors the launch runs under ``torch.cuda.device(<their device>)`` (Triton otherwise
    launches on the *current* device and stream, which need not be the tensors').
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if _INTERPRETED:
        if any(_is_fake(t) for t in tensors):
            return
        kernel[grid](*args, **kwargs)
        return
    runner = wrap_triton(kernel)[grid]
    device = launch_device(tensors)
    if device is None:
        runner(*args, **kwargs)
    else:
        with torch.cuda.device(device):
            runner(*args, **kwargs)


def launch_device(tensors) -> torch.device | None:
    """The CUDA device to launch on for ``tensors``, or None (no real CUDA tensor: tracing, CPU).

    Fake/functional tensors (``torch.compile`` tracing) get None: Inductor's generated code
    guards the device itself. Mixed CUDA devices raise ``ValueError``.
    """
    devices = {t.device for t in tensors if t.is_cuda and not _is_fake(t)}
    if not devices:
        return None
    if len(devices) > 1:
        raise ValueError(f"kernel tensors must be on one CUDA device, got {sorted(str(d) for d in devices)}")
    return next(iter(devices))


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output tensor, or a poisoned one (NaN / 127) when ``POISON_OUTPUTS`` is on."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else 127
    return torch.full(shape, fill, dtype=dtype, device=device)


def check_kernel_tensor(name: str, value: torch.Tensor, rank: int, layout: str, floating: bool = True) -> None:
    """Type/rank/device checks for a kernel input (messages name the argument and the expectation)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} must be non-empty with shape {layout}, got {tuple(value.shape)}")
    if floating and value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 for the Triton kernels, got {value.dtype} "
            "(use backend='reference' for other dtypes)"
        )
    if not value.is_cuda and not interpreter_enabled():
        raise ValueError(
            f"{name} must be a CUDA tensor for the Triton kernels (got device {value.device}); "
            "CPU tensors only run under TRITON_INTERPRET=1"
        )


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_targets_dtype(name: str, targets: torch.Tensor) -> None:
    if targets.dtype.is_complex:
        raise TypeError(f"{name} must hold 0/1 labels (bool, integer or float), got {targets.dtype}")


def as_label_tensor(targets: torch.Tensor) -> torch.Tensor:
    """Targets with a unit-stride last axis; ``bool`` is reinterpreted as ``uint8`` (no copy)."""
    if targets.dtype == torch.bool:
        targets = targets.view(torch.uint8)
    return rowwise(targets)


def rowwise(value: torch.Tensor) -> torch.Tensor:
    """``value`` itself when its last axis has unit stride, otherwise a contiguous copy."""
    return value if value.stride(-1) == 1 else value.contiguous()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def warps_for(elements: int) -> int:
    """``num_warps`` giving about 8 values per thread for a tile of ``elements`` (1 to 32 warps).

    Checked with ``ptxas -v`` for sm_90: at 8 values per thread the fused loss kernels fit in
    registers; 16 per thread spills.
    """
    return max(1, min(32, next_pow2(elements) // 256))
