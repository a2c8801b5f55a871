"""Pieces shared by the comparison methods: the per-class Bernoulli KL and the second augmented view.

Notation (docs/METHODS.md): ``z`` logits, ``s = sigmoid(z)``, ``y`` multi-hot targets,
``bkl(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))`` per class (a Bernoulli KL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mskd_fast import ops

__all__ = ["VIEW_AREA", "VIEW_FLIP", "VIEW_RATIO", "bernoulli_kl", "distorted_view", "sample_view"]

# The second view of DDGSD and MulSupCon (the loader delivers one augmented view per image): a random-resized
# crop of the loader's image with this area fraction and aspect-ratio range, resized back, then a horizontal
# flip with probability VIEW_FLIP.
VIEW_AREA = (0.6, 1.0)
VIEW_RATIO = (3.0 / 4.0, 4.0 / 3.0)
VIEW_FLIP = 0.5


def bernoulli_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Elementwise ``bkl(sigmoid(t/T) || sigmoid(z/T))`` of same-shape logits ``t`` (teacher) and ``z`` (student).

    Computed with ``logsigmoid`` (finite for any finite logits); differentiable w.r.t. both (detach the teacher
    where it is a target). Returns a tensor of the inputs' shape; callers reduce it.
    """
    t = teacher_logits / temperature
    z = student_logits / temperature
    p = torch.sigmoid(t)
    return p * (F.logsigmoid(t) - F.logsigmoid(z)) + (1.0 - p) * (F.logsigmoid(-t) - F.logsigmoid(-z))


def sample_view(batch: int, height: int, width: int, generator: torch.Generator | None,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random parameters of the second view: boxes ``(B, 1, 4)`` float32 (x1, y1, x2, y2) and flips ``(B,)`` bool.

    Area fraction ~ U(VIEW_AREA), aspect ratio ``w/h`` log-uniform in VIEW_RATIO (a side is clipped to the image),
    position uniform inside the image; one ``torch.rand`` call on ``device`` with ``generator`` (no host sync).
    """
    u = torch.rand(batch, 5, generator=generator, device=device, dtype=torch.float32)
    area = (VIEW_AREA[0] + (VIEW_AREA[1] - VIEW_AREA[0]) * u[:, 0]) * (height * width)
    log_lo, log_hi = math.log(VIEW_RATIO[0]), math.log(VIEW_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=float(width))
    h = torch.sqrt(area / ratio).clamp(max=float(height))
    x1 = u[:, 2] * (width - w)
    y1 = u[:, 3] * (height - h)
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], dim=-1).unsqueeze(1)
    return boxes, u[:, 4] < VIEW_FLIP


def distorted_view(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``images (B,3,H,W)`` cropped to ``boxes (B,1,4)``, resized back to ``H x W`` (bilinear) and flipped where
    ``flips (B,)``; same dtype and memory format as ``images``. Not differentiated w.r.t. the boxes."""
    size = (images.shape[-2], images.shape[-1])
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    view = ops.crop_resize(images, boxes, size, channels_last=channels_last)
    return torch.where(flips.view(-1, 1, 1, 1), view.flip(-1), view)
