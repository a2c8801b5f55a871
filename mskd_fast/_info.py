"""``mskd_fast.info()``: versions and which backends are active on this machine."""

from __future__ import annotations

import importlib
import platform


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a missing or broken optional package is reported as None
        return None


def info() -> dict:
    """Return a dict describing the installation.

    Keys: ``mskd_fast``, ``python``, ``torch``, ``torchvision``, ``triton``, ``timm``, ``dali``
    (versions, ``None`` when missing), ``cuda_available``, ``device`` (GPU name or ``"cpu"``),
    ``triton_kernels`` (whether the fused kernels import), ``loss_backend`` (what
    ``backend="auto"`` uses for tensors on the default device) and ``extension`` (status of
    ``mskd_fast._C`` for ``crop_resize``/``roi_pool``).
    """
    import torch

    from . import __version__
    from .ops import _backend

    cuda = torch.cuda.is_available()
    triton_ok = _backend.triton_kernels_available()
    try:
        from .ops.crops import extension_status

        extension = extension_status()
    except ImportError as exc:  # the extension front end itself missing is reported, not hidden
        extension = {"available": False, "error": str(exc)}
    return {
        "mskd_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "timm": _version("timm"),
        "dali": _version("nvidia.dali"),
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "triton_kernels": triton_ok,
        "loss_backend": "triton" if (cuda and triton_ok) else "reference",
        "extension": extension,
    }
