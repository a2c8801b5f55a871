"""Public ops of Reconstruction-SD (SPEC 4): pseudo labels and reconstructed logits."""

from __future__ import annotations

import torch

from .. import reference
from .._validation import (
    check_float,
    check_int,
    check_nonempty,
    check_positive,
    check_rank,
    check_same_device,
    check_targets,
)
from ._backend import use_triton
from .relation import check_crop_logits

__all__ = ["pseudo_labels", "reconstruct_logits", "match_logit_scale"]


def _check_graph_inputs(patch_logits: torch.Tensor, logits: torch.Tensor) -> None:
    check_crop_logits("patch_logits", patch_logits)
    check_float("logits", logits)
    check_rank("logits", logits, 2, "(B, C)")
    b, _, c = patch_logits.shape
    if tuple(logits.shape) != (b, c):
        raise ValueError(
            f"logits must have shape (B, C) = ({b}, {c}) to match patch_logits {tuple(patch_logits.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    check_same_device(patch_logits=patch_logits, logits=logits)


def _check_k(k, n: int) -> None:
    if k is None:
        return
    if isinstance(k, torch.Tensor):
        if k.dim() != 0 or k.dtype.is_floating_point or k.dtype == torch.bool:
            raise TypeError(f"k must be an int or a 0-dim integer tensor, got {k.dtype} of shape {tuple(k.shape)}")
        return
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int or a 0-dim integer tensor, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0 (it is clamped to N = B*S*C = {n} from above), got {k}")


def pseudo_labels(patch_logits: torch.Tensor, logits: torch.Tensor, k) -> torch.Tensor:
    """Batch-wide pseudo labels ``u`` of SPEC 4 step 2: int8 ``(B, S, C)`` in {-1, 0, +1}.

    ``delta = patch_logits - logits[:, None, :]``; the ``k`` largest of all ``B*S*C`` deltas get
    ``+1``, the ``min(k, N-k)`` smallest of the rest ``-1``. ``k``: int or 0-dim integer tensor
    (a tensor avoids any host sync); ties go to the lower flat index.
    """
    _check_graph_inputs(patch_logits, logits)
    _check_k(k, patch_logits.numel())
    return reference.pseudo_labels(patch_logits, logits, k)


def reconstruct_logits(
    patch_logits: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    layers: int = 2,
    k=None,
    crop_temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Reconstructed teacher logits ``z (B, C)`` for R-SD (SPEC 4), without gradient.

    Args:
        patch_logits: ``o (B, S, C)`` teacher crop logits (graph nodes and values).
        logits: ``q (B, C)`` student logits (detached; only used for the pseudo labels).
        targets: ``(B, C)`` multi-hot labels; ``k`` defaults to ``S * targets.sum()``.
        layers: propagation steps (``>= 0``).
        k: number of ``+1`` (and ``-1``) pseudo labels over the batch, int or 0-dim tensor.
        crop_temperature: temperature of the softmax over crops (> 0); 1 is the paper's eq. 8, below 1
            sharpens the crop weights (a labelled departure, ``--rsd-crop-temperature``).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
    """
    _check_graph_inputs(patch_logits, logits)
    check_targets("targets", targets, "logits", logits)
    check_same_device(patch_logits=patch_logits, targets=targets)
    check_int("layers", layers, 0)
    _check_k(k, patch_logits.numel())
    check_positive("crop_temperature", crop_temperature)
    if use_triton(backend, patch_logits, logits, targets):
        from mskd_fast import kernels

        return kernels.reconstruct_logits(patch_logits, logits, targets, layers=layers, k=k,
                                          crop_temperature=crop_temperature)
    return reference.reconstruct_logits(patch_logits, logits, targets, layers=layers, k=k,
                                        crop_temperature=crop_temperature)


def match_logit_scale(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """R-SD teacher scale matching (SPEC 4 step 5): ``z`` re-scaled to the spread of ``q``, no gradient.

    Args:
        z: ``(B, C)`` reconstructed teacher logits.
        q: ``(B, C)`` student logits (detached).

    Returns:
        ``(B, C)`` in ``z.dtype``: per row ``mean_c(z) + (z - mean_c(z)) * std_c(q) / max(std_c(z), 1e-6)``
        (population std over the ``C`` classes). A few elementwise and row-reduction ops, no host sync.
    """
    check_float("z", z)
    check_rank("z", z, 2, "(B, C)")
    check_nonempty("z", z, "(B, C)")
    check_float("q", q)
    if q.shape != z.shape:
        raise ValueError(f"q must have the same shape as z {tuple(z.shape)}, got {tuple(q.shape)}")
    check_same_device(z=z, q=q)
    with torch.no_grad():
        return reference.match_logit_scale(z, q)
