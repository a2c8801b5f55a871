"""Crop boxes of MSKD's L-SD/R-SD crops (SPEC 6): random-resized-crop boxes or the four corner crops."""

from __future__ import annotations

import math

import torch

__all__ = ["CROP_MODES", "RANDOM_AREA", "check_area", "sample_boxes"]

CROP_MODES = ("random", "corners")
RANDOM_AREA = (0.2, 0.3)
RANDOM_RATIO = (2.0 / 5.0, 5.0 / 3.0)
_CORNER_BOXES: dict[tuple, torch.Tensor] = {}  # (batch, H, W, device) -> (B, 4, 4) boxes, never written to


def check_area(area, name: str = "crop_area") -> tuple[float, float]:
    """``area`` as a ``(lo, hi)`` tuple of floats with ``0 < lo <= hi <= 1``; else ``ValueError`` naming ``name``."""
    try:
        lo, hi = (float(a) for a in area)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi <= 1, got {area!r}") from None
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi <= 1, got {area!r}")
    return lo, hi


def sample_boxes(
    batch: int,
    crops: int,
    height: int,
    width: int,
    mode: str = "random",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    area: tuple[float, float] = RANDOM_AREA,
) -> torch.Tensor:
    """Crop boxes ``(B,S,4)`` float32 ``(x1,y1,x2,y2)`` in continuous input-pixel coordinates (SPEC 6).

    ``mode="random"``: random-resized-crop boxes, area fraction ~ U(``area``) of ``H*W`` (SPEC: U(0.2, 0.3)),
    aspect ratio ``w/h`` log-uniform in (2/5, 5/3), position uniform inside the image (a side longer than the image,
    possible only for very elongated inputs, is clipped to it). Drawn with ``generator`` on ``device``
    in one ``torch.rand`` call (no host sync). ``mode="corners"``: the four ``H/2 x W/2`` corner crops in
    the order top-left, top-right, bottom-left, bottom-right (needs ``S == 4``; no randomness); the same
    cached tensor is returned for the same shape and device, so it must not be modified in place.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    area = check_area(area, "area")
    if batch < 1 or crops < 1 or height < 1 or width < 1:
        raise ValueError(f"batch, crops, height, width must be >= 1, got {(batch, crops, height, width)}")
    if mode == "corners":
        if crops != 4:
            raise ValueError(f"crop mode 'corners' needs exactly 4 crops, got {crops}")
        key = (batch, height, width, str(torch.device(device)))
        cached = _CORNER_BOXES.get(key)
        if cached is None:  # built on the host and uploaded once: a copy per step would block on CUDA
            h2, w2 = height / 2.0, width / 2.0
            corners = torch.tensor(
                [[0.0, 0.0, w2, h2], [w2, 0.0, width, h2], [0.0, h2, w2, height], [w2, h2, width, height]],
                dtype=torch.float32,
            )
            cached = _CORNER_BOXES[key] = corners.unsqueeze(0).expand(batch, 4, 4).contiguous().to(device)
        return cached
    u = torch.rand(batch, crops, 4, generator=generator, device=device, dtype=torch.float32)
    area = (area[0] + (area[1] - area[0]) * u[..., 0]) * (height * width)
    log_lo, log_hi = math.log(RANDOM_RATIO[0]), math.log(RANDOM_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(area * ratio).clamp(max=float(width))
    h = torch.sqrt(area / ratio).clamp(max=float(height))
    x1 = u[..., 2] * (width - w)
    y1 = u[..., 3] * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)
