"""The evaluation resize, in torch, identical to DALI's ``fn.resize(antialias=True)`` (linear filter).

DALI resamples with a triangle filter whose half-width is ``max(in/out, 1)`` input pixels, samples
outside the image clamped to the border pixel and the weights of each output pixel normalised to 1.
torchvision's antialiased resize uses the same filter but drops (rather than clamps) taps outside
the image, and rounds uint8 results; their outputs differ by up to several grey levels near the
borders when downscaling. Both loaders therefore resize evaluation images with this filter in float
(DALI with ``dtype=FLOAT``, the torch loader with :func:`resize_image`), so they feed the network
the same pixels up to float rounding (``tests/test_data_eval_preprocessing.py``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["resize_image", "resize_matrix", "resize_taps"]


@functools.lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize sizes must be >= 1, got {n_in} -> {n_out}")
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    first = torch.floor(centres - support).long()
    positions = first[:, None] + torch.arange(math.ceil(2 * support) + 2)[None, :]
    weights = (1 - (positions.double() - centres[:, None]).abs() / support).clamp_min(0)
    return positions, weights / weights.sum(dim=1, keepdim=True)


def resize_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, weights)``, both ``(n_out, K)``: output pixel ``i`` is ``sum_k weights[i,k] * in[indices[i,k]]``.

    Indices are clamped to ``[0, n_in - 1]``; each row of ``weights`` (float32) sums to 1.
    """
    positions, weights = _taps(n_in, n_out)
    return positions.clamp(0, n_in - 1), weights.float()


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The ``(n_out, n_in)`` float32 matrix of :func:`resize_taps` (clamped taps summed)."""
    indices, weights = resize_taps(n_in, n_out)
    return torch.zeros(n_out, n_in).scatter_add_(1, indices, weights)


@functools.lru_cache(maxsize=64)
def _edge_outputs(n_in: int, n_out: int) -> torch.Tensor:
    """Output indices with a non-zero tap outside the input (where clamping and truncation differ)."""
    positions, weights = _taps(n_in, n_out)
    outside = ((positions < 0) | (positions > n_in - 1)) & (weights > 0)
    return outside.any(dim=1).nonzero().flatten()


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image (C, H, W)`` (uint8 or float) resized to ``(C, size, size)`` float32, values on the input's scale.

    The interior comes from torch's antialiased bilinear interpolation (the same triangle filter);
    the few output rows and columns whose filter reaches past the border are recomputed with the
    clamped taps of :func:`resize_matrix`.
    """
    if image.dim() != 3:
        raise ValueError(f"image must have shape (C, H, W), got {tuple(image.shape)}")
    x = image.float()
    out = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    height, width = x.shape[1], x.shape[2]
    rows, cols = resize_matrix(height, size), resize_matrix(width, size)
    edge_rows, edge_cols = _edge_outputs(height, size), _edge_outputs(width, size)
    if edge_rows.numel():
        out[:, edge_rows, :] = rows[edge_rows] @ x @ cols.T
    if edge_cols.numel():
        out[:, :, edge_cols] = rows @ (x @ cols[edge_cols].T)
    return out
