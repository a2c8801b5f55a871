"""Crop boxes of MSKD's L-SD/R-SD crops (SPEC 6): random-resized-crop boxes or the four corner crops; and, as a
study instrument only, crops placed on the annotated objects (:func:`object_boxes`, ``--crop-mode boxes`` of
``bench/rsd_teacher_probe.py``: an oracle that needs ground-truth boxes, never a recipe)."""

from __future__ import annotations

import math

import torch

__all__ = ["CROP_MODES", "RANDOM_AREA", "check_area", "object_boxes", "sample_boxes"]

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


def object_boxes(
    objects: list,
    crops: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    area: tuple[float, float] = RANDOM_AREA,
) -> torch.Tensor:
    """Crop boxes ``(B,S,4)`` float32 ``(x1,y1,x2,y2)`` placed on annotated objects (the R-SD oracle, issue 24).

    ``objects`` holds one ``(n_i, 4)`` array or tensor per image: the image's object boxes ``(x1,y1,x2,y2)`` in
    the pixel coordinates of the ``height x width`` input the crops are cut from. Crop ``s`` of image ``i`` is
    object ``perm_i[s % n_i]`` (``perm_i`` a random order of the image's objects; objects are reused when
    ``n_i < S``) grown about its centre, at its own aspect ratio, to an area fraction ~ U(``area``) of the image,
    or the object box itself when it is already larger; a side longer than the image is clipped to it and the
    box is shifted inside the image. An image without objects gets random-resized-crop boxes
    (:func:`sample_boxes`). Drawn with ``generator`` on the CPU (a host loop: a probe instrument, not a
    training path). Raises ``ValueError`` when ``objects`` is ``None`` (data without boxes) or malformed.
    """
    if objects is None:
        raise ValueError("crop mode 'boxes' needs the dataset's object boxes (a dataset with boxes, e.g. "
                         "fashion-multi, VOC or COCO); this data has none")
    lo, hi = check_area(area, "area")
    if crops < 1 or height < 1 or width < 1:
        raise ValueError(f"crops, height, width must be >= 1, got {(crops, height, width)}")
    out = torch.empty(len(objects), crops, 4, dtype=torch.float32)
    for i, obj in enumerate(objects):
        obj = torch.as_tensor(obj, dtype=torch.float32).reshape(-1, 4) if obj is not None else torch.empty(0, 4)
        if obj.numel() and not bool(((obj[:, 2] >= obj[:, 0]) & (obj[:, 3] >= obj[:, 1])).all()):
            raise ValueError(f"objects[{i}] must hold (x1, y1, x2, y2) boxes with x2 >= x1 and y2 >= y1")
        if obj.shape[0] == 0:
            out[i] = sample_boxes(1, crops, height, width, generator=generator, area=(lo, hi))[0]
            continue
        perm = torch.randperm(obj.shape[0], generator=generator)
        pick = obj[perm[torch.arange(crops) % obj.shape[0]]]
        target = (lo + (hi - lo) * torch.rand(crops, generator=generator)) * (height * width)
        w, h = (pick[:, 2] - pick[:, 0]).clamp(min=1.0), (pick[:, 3] - pick[:, 1]).clamp(min=1.0)
        grow = torch.sqrt(target / (w * h)).clamp(min=1.0)
        w, h = (w * grow).clamp(max=float(width)), (h * grow).clamp(max=float(height))
        cx, cy = (pick[:, 0] + pick[:, 2]) / 2, (pick[:, 1] + pick[:, 3]) / 2
        x1 = (cx - w / 2).clamp(min=0.0)
        y1 = (cy - h / 2).clamp(min=0.0)
        x1 = torch.minimum(x1, width - w)
        y1 = torch.minimum(y1, height - h)
        out[i] = torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)
    return out
