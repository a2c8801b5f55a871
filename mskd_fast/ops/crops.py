"""Batched crop-resize and ROI pooling (SPEC 6), backed by the C++/CUDA extension ``mskd_fast._C``.

The extension defines four operators in the ``mskd`` namespace (schemas in ``csrc/ops.cpp``):
``crop_resize``, ``crop_resize_backward``, ``roi_pool`` and ``roi_pool_backward``. This module
registers their fake (meta) kernels and autograd formulas, so ``torch.compile(fullgraph=True)``
traces them without a graph break, and exposes the public functions :func:`crop_resize` and
:func:`roi_pool`.

When the extension cannot be imported, or was built without kernels for the tensors' device (for
example CUDA tensors with a CPU-only build), both functions run the torchvision-based reference
(:func:`mskd_fast.reference.crop_resize` / :func:`mskd_fast.reference.roi_pool`) and warn once.
:func:`extension_status` reports which path is active (``mskd_fast.info()`` shows it).

Value checks of ``boxes`` (finite, ``x2 >= x1``, ``y2 >= y1``) and of ``std`` (non-zero) read the
tensors' values. The operators do them for CPU tensors. For CUDA tensors they would need a host
synchronisation, so they run only when ``MSKD_FAST_STRICT=1``; without it a crop whose box is
invalid comes out as NaN (visible downstream, never silently wrong). ``MSKD_FAST_POISON=1`` makes
the operators fill their outputs with NaN before the kernels write them (used by the tests).
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from .. import reference
from .._validation import check_bool, check_tensor

__all__ = ["crop_resize", "roi_pool", "extension_status"]

_IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS = ("crop_resize", "crop_resize_backward", "roi_pool", "roi_pool_backward")
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


# ------------------------------------------------------------------------------- extension loading


def _load_extension() -> dict:
    status = {"available": False, "path": None, "devices": [], "error": None}
    try:
        from .. import _C
    except (ImportError, OSError) as exc:
        status["error"] = f"{type(exc).__name__}: {exc}"
        return status
    status["path"] = getattr(_C, "__file__", None)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    try:
        status["devices"] = [
            dev for dev, key in _DEVICE_KEYS.items() if all(has(f"mskd::{op}", key) for op in _OPS)
        ]
    except RuntimeError as exc:  # the library loaded but does not define the operators
        status["error"] = f"mskd_fast._C does not define the mskd:: crop operators: {exc}"
        return status
    status["available"] = bool(status["devices"])
    if not status["available"]:
        status["error"] = "mskd_fast._C registers no CPU or CUDA kernels for the mskd:: crop operators"
    return status


_STATUS = _load_extension()
_WARNED: set = set()


def extension_status() -> dict:
    """Which implementation :func:`crop_resize` / :func:`roi_pool` use.

    Returns a dict with ``available`` (the extension imported and has kernels), ``devices``
    (device types with compiled kernels, e.g. ``["cpu", "cuda"]``), ``path`` (the loaded library),
    ``error`` (why it is unavailable, else ``None``), ``backend`` (``"extension"`` or
    ``"reference"`` for CPU tensors) and the debug switches ``poison`` / ``strict``
    (``MSKD_FAST_POISON`` / ``MSKD_FAST_STRICT``).
    """
    import os

    flag = lambda name: os.environ.get(name, "0") not in ("", "0")
    return {
        **{k: (list(v) if isinstance(v, list) else v) for k, v in _STATUS.items()},
        "backend": "extension" if "cpu" in _STATUS["devices"] else "reference",
        "poison": flag("MSKD_FAST_POISON"),
        "strict": flag("MSKD_FAST_STRICT"),
    }


def _use_extension(device: torch.device) -> bool:
    if device.type in _STATUS["devices"]:
        return True
    key = device.type
    if key not in _WARNED:
        _WARNED.add(key)
        reason = _STATUS["error"] or f"it was built without {device.type} kernels"
        warnings.warn(
            f"mskd_fast._C is not usable for {device.type} tensors ({reason}); crop_resize/roi_pool fall back "
            "to the slower torchvision reference (mskd_fast.reference)",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


# --------------------------------------------------------------------------- fake kernels, autograd


def _channels_last(t: torch.Tensor) -> bool:
    """Layout rule shared with csrc/ops.cpp: channels-last but not also plain contiguous."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _register() -> None:
    lib = "mskd::"

    @torch.library.register_fake(lib + "crop_resize")
    def _crop_resize_fake(images, boxes, out_h, out_w, out_dtype, channels_last, mean, std):
        shape = (boxes.shape[0] * boxes.shape[1], images.shape[1], out_h, out_w)
        return torch.empty(shape, dtype=out_dtype, device=images.device, memory_format=_format(channels_last))

    @torch.library.register_fake(lib + "crop_resize_backward")
    def _crop_resize_backward_fake(grad, boxes, B, C, H, W, dtype, channels_last, std):
        return torch.empty((B, C, H, W), dtype=dtype, device=grad.device, memory_format=_format(channels_last))

    @torch.library.register_fake(lib + "roi_pool")
    def _roi_pool_fake(features, boxes, spatial_scale, out_h, out_w, mode):
        shape = (boxes.shape[0] * boxes.shape[1], features.shape[1], out_h, out_w)
        fmt = _format(_channels_last(features))
        out = torch.empty(shape, dtype=features.dtype, device=features.device, memory_format=fmt)
        if mode == "max":
            argmax = torch.empty(shape, dtype=torch.int32, device=features.device, memory_format=fmt)
        else:
            argmax = torch.empty((0,), dtype=torch.int32, device=features.device)
        return out, argmax

    @torch.library.register_fake(lib + "roi_pool_backward")
    def _roi_pool_backward_fake(grad, boxes, argmax, spatial_scale, B, D, H, W, mode, channels_last):
        return torch.empty((B, D, H, W), dtype=grad.dtype, device=grad.device, memory_format=_format(channels_last))

    def crop_setup(ctx, inputs, output):
        images, boxes, _, _, _, _, _, std = inputs
        ctx.save_for_backward(boxes, std)
        ctx.image_shape = tuple(images.shape)
        ctx.image_dtype = images.dtype
        ctx.image_cl = _channels_last(images)

    def crop_backward(ctx, grad):
        boxes, std = ctx.saved_tensors
        grad_images = None
        if ctx.needs_input_grad[0]:
            grad_images = torch.ops.mskd.crop_resize_backward(
                grad, boxes, *ctx.image_shape, ctx.image_dtype, ctx.image_cl, std
            )
        return grad_images, None, None, None, None, None, None, None

    torch.library.register_autograd(lib + "crop_resize", crop_backward, setup_context=crop_setup)

    def pool_setup(ctx, inputs, output):
        features, boxes, spatial_scale, _, _, mode = inputs
        ctx.save_for_backward(boxes, output[1])
        ctx.spatial_scale = spatial_scale
        ctx.mode = mode
        ctx.feature_shape = tuple(features.shape)
        ctx.feature_cl = _channels_last(features)

    def pool_backward(ctx, grad, _grad_argmax):
        boxes, argmax = ctx.saved_tensors
        grad_features = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.ops.mskd.roi_pool_backward(
                grad, boxes, argmax, ctx.spatial_scale, *ctx.feature_shape, ctx.mode, ctx.feature_cl
            )
        return grad_features, None, None, None, None, None

    torch.library.register_autograd(lib + "roi_pool", pool_backward, setup_context=pool_setup)


if _STATUS["available"]:
    _register()


# ------------------------------------------------------------------------------------- validation


def _check_map(name: str, value, dtypes, layout: str) -> None:
    check_tensor(name, value)
    if value.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {value.dtype}")
    if value.dim() != 4:
        raise ValueError(f"{name} must have shape {layout} (4 dims), got {tuple(value.shape)}")
    if min(value.shape[1:]) < 1:
        raise ValueError(f"{name} must have at least one channel, row and column, got {tuple(value.shape)}")


def _check_boxes(boxes, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor("boxes", boxes)
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be a floating tensor of (x1, y1, x2, y2), got {boxes.dtype}")
    if boxes.dim() != 3 or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape (B, S, 4), got {tuple(boxes.shape)}")
    if boxes.shape[0] != ref.shape[0]:
        raise ValueError(
            f"boxes must hold one row of boxes per image: boxes.shape[0] = {boxes.shape[0]} but {ref_name} "
            f"has batch size {ref.shape[0]}"
        )
    if boxes.device != ref.device:
        raise ValueError(f"boxes must be on the same device as {ref_name} ({ref.device}), got {boxes.device}")


def _size_pair(name: str, size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    try:
        out_h, out_w = pair
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints (out_h, out_w), got {size!r}") from None
    for v in (out_h, out_w):
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{name} must be an int or a pair of ints (out_h, out_w), got {size!r}")
    if isinstance(out_h, numbers.Integral) and isinstance(out_w, numbers.Integral) and min(out_h, out_w) < 1:
        raise ValueError(f"{name} must be >= 1, got {size!r}")
    return out_h, out_w


def _check_values_for_fallback(boxes: torch.Tensor, std: torch.Tensor | None) -> None:
    """The value checks the operators do, for the reference path (CPU tensors, or strict mode)."""
    import os

    if boxes.device.type != "cpu" and os.environ.get("MSKD_FAST_STRICT", "0") in ("", "0"):
        return
    flat = boxes.detach().reshape(-1, 4).double().cpu()
    bad = ~torch.isfinite(flat).all(1)
    what = "be finite"
    if not bool(bad.any()):
        bad = (flat[:, 2] < flat[:, 0]) | (flat[:, 3] < flat[:, 1])
        what = "satisfy x2 >= x1 and y2 >= y1"
    if bool(bad.any()):
        n = int(bad.nonzero()[0, 0])
        s = boxes.shape[1]
        raise ValueError(f"boxes must {what}, boxes[{n // s}, {n % s}] = {tuple(flat[n].tolist())}")
    if std is not None and bool((std == 0).any()):
        raise ValueError(f"std must be non-zero, got {std.tolist()}")


_CHANNEL_CACHE: dict = {}


def _channel_values(name: str, value, channels: int, device: torch.device) -> torch.Tensor | None:
    """``mean``/``std`` as a ``(C,)`` tensor on ``device``: a number, a sequence or a tensor of 1 or C values."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.dim() > 1 or value.numel() not in (1, channels):
            raise ValueError(f"{name} must hold 1 or C = {channels} values, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on the images' device ({device}), got {value.device}")
        return value.reshape(-1).expand(channels)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = (float(value),) * channels
    else:
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got {value!r}") from None
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise ValueError(f"{name} must hold 1 or C = {channels} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    if name == "std" and any(v == 0 for v in values):
        raise ValueError(f"std must be non-zero, got {values}")
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    key = (values, str(device))
    cached = _CHANNEL_CACHE.get(key)
    if cached is None:  # upload once: a fresh host-to-device copy each step would synchronise
        cached = _CHANNEL_CACHE[key] = torch.tensor(values, dtype=torch.float32).to(device)
    return cached


# ------------------------------------------------------------------------------------- public ops


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size,
    *,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    mean=None,
    std=None,
) -> torch.Tensor:
    """Crop every box out of its image and resize it bilinearly (SPEC 6), optionally normalised.

    Args:
        images: ``(B, C, H, W)`` uint8, float16, bfloat16, float32 or float64; contiguous or
            channels-last (read in place).
        boxes: ``(B, S, 4)`` floating ``(x1, y1, x2, y2)`` in continuous input-pixel coordinates;
            boxes may extend past the image (torchvision's rules: samples beyond one pixel outside
            read 0, samples within it clamp to the border). Not differentiated.
        size: ``out_h`` or ``(out_h, out_w)``.
        out_dtype: floating output dtype; default: ``images.dtype`` if floating, else float32.
        channels_last: return the crops in channels-last memory format.
        mean, std: optional per-channel normalisation constants (a number, ``C`` numbers or a
            tensor of 1 or ``C`` values on the images' device): the output is ``(v - mean) / std``,
            computed in float32 before the cast, so uint8 images become normalised bfloat16 network
            input in one pass. Not differentiated.

    Returns:
        ``(B*S, C, out_h, out_w)``, image-major (row ``i*S + s`` is crop ``s`` of image ``i``). Values
        equal ``torchvision.ops.roi_align(images.float(), rois, size, 1.0, sampling_ratio=1,
        aligned=True)`` (float64 images are computed in float64). Differentiable w.r.t. floating
        ``images``.
    """
    _check_map("images", images, _IMAGE_DTYPES, "(B, C, H, W)")
    _check_boxes(boxes, "images", images)
    out_h, out_w = _size_pair("size", size)
    if out_dtype is None:
        out_dtype = images.dtype if images.is_floating_point() else torch.float32
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a floating dtype (float16/bfloat16/float32/float64), got {out_dtype!r}")
    check_bool("channels_last", channels_last)
    channels = images.shape[1]
    mean_t = _channel_values("mean", mean, channels, images.device)
    std_t = _channel_values("std", std, channels, images.device)
    if not _use_extension(images.device):
        _check_values_for_fallback(boxes, std_t)
        return reference.crop_resize(
            images, boxes, (out_h, out_w), out_dtype=out_dtype, channels_last=channels_last, mean=mean_t, std=std_t
        )
    return torch.ops.mskd.crop_resize(images, boxes, out_h, out_w, out_dtype, channels_last, mean_t, std_t)


def roi_pool(
    features: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, output_size=1, mode: str = "max"
) -> torch.Tensor:
    """Pool every box of a feature map (SPEC 6).

    Args:
        features: ``(B, D, h, w)`` float16, bfloat16, float32 or float64; contiguous or
            channels-last (read in place; the output then is channels-last too).
        boxes: ``(B, S, 4)`` floating ``(x1, y1, x2, y2)`` in input-image pixels. Not differentiated.
        spatial_scale: feature-map pixels per input pixel (``h / H``), finite and > 0.
        output_size: ``oh`` or ``(oh, ow)``.
        mode: ``"max"`` equals ``torchvision.ops.roi_pool``; ``"avg"`` equals
            ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)`` (adaptive sampling).

    Returns:
        ``(B*S, D, oh, ow)`` in ``features.dtype``, image-major; half-precision features are pooled
        in float32. Differentiable w.r.t. ``features``.
    """
    _check_map("features", features, _FLOAT_DTYPES, "(B, D, h, w)")
    _check_boxes(boxes, "features", features)
    out_h, out_w = _size_pair("output_size", output_size)
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"spatial_scale must be a float, got {type(spatial_scale).__name__}")
    if isinstance(spatial_scale, numbers.Real):
        if not (math.isfinite(spatial_scale) and spatial_scale > 0):
            raise ValueError(f"spatial_scale must be finite and > 0, got {spatial_scale!r}")
        spatial_scale = float(spatial_scale)
    if not _use_extension(features.device):
        _check_values_for_fallback(boxes, None)
        return reference.roi_pool(features, boxes, spatial_scale, (out_h, out_w), mode=mode)
    return torch.ops.mskd.roi_pool(features, boxes, spatial_scale, out_h, out_w, mode)[0]
