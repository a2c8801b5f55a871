"""Which implementation an op runs: the fused Triton kernels or the PyTorch reference.

``backend="auto"`` picks Triton for CUDA tensors of float16/bfloat16/float32 when the kernels
import, the reference otherwise (float64 included: the kernels compute in float32). The decision
only looks at tensor devices and dtypes, so under ``torch.compile`` it is resolved at trace time
and never causes a graph break. ``backend="triton"`` forces the kernels; on CPU tensors that only
works under the Triton interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import os

import torch

from .._validation import BACKENDS, check_choice

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS_IMPORT: list[bool] = []  # filled once; a plain list keeps dynamo from tracing a cache wrapper


def triton_kernels_available() -> bool:
    """True when ``mskd_fast.kernels`` (and so Triton) imports on this machine."""
    if not _KERNELS_IMPORT:
        try:
            import mskd_fast.kernels  # noqa: F401

            _KERNELS_IMPORT.append(True)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _KERNELS_IMPORT.append(False)
    return _KERNELS_IMPORT[0]


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend`` for an op whose inputs are ``tensors``.

    Raises ``ValueError`` for an unknown backend and ``RuntimeError`` when ``"triton"`` is
    forced but cannot run (Triton missing, or CPU tensors without the interpreter).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    if backend == "auto":
        kernel_dtypes = all(t.dtype in _KERNEL_DTYPES for t in present if t.is_floating_point())
        return on_cuda and kernel_dtypes and triton_kernels_available()
    if not triton_kernels_available():
        raise RuntimeError("backend='triton' was requested but Triton / mskd_fast.kernels cannot be imported")
    if not on_cuda and not triton_interpreter_enabled():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        )
    return True
