"""DDGSD, data-distortion guided self-distillation, for multi-label training.

Source: Xu, Liu, "Data-Distortion Guided Self-Distillation for Deep Neural Networks", AAAI 2019 (no official code
is public). Original: two distorted versions of each image go through the network; each is trained with
cross-entropy, their posteriors are pulled together by a symmetric KL, and their batch feature distributions by a
maximum mean discrepancy (MMD) on the pooled features.

Multi-label adaptation (as implemented): view 1 is the loader's augmented image, view 2 a device-side distortion of
it (``_common.distorted_view``: random-resized crop of area 0.6-1 and aspect 3/4-4/3, resized back, horizontal flip
with p 0.5, drawn from the trainer's generator); both go through one forward of ``2B`` images; ``f`` are the pooled
features the head reads::

    loss = BCE(z1, y) + BCE(z2, y)
         + w_kl * mean_{i,c} [ bkl(sg(s2_T) || s1_T) + bkl(sg(s1_T) || s2_T) ]      (s_T = sigmoid(z / T))
         + w_mmd * || mean_i f1_i - mean_i f2_i ||^2                                 (linear-kernel MMD)

``T = 4``, ``w_mmd = 5e-4`` (the values of the MSKD authors' DDGSD branch, ``assets/MSKD.py`` 502-518), ``w_kl = 1``
(the issue's formula; the MSKD authors' code scaled KL and MMD together by 0.1, i.e. ``--ddgsd-kl-weight 0.1
--ddgsd-mmd-weight 5e-5``). Each partner is detached in its own KL direction, so each view is pulled towards the
other's current prediction. Differences (docs/METHODS.md): per-class Bernoulli KL instead of softmax KL; the second
view is derived from the first on the device (the loader yields one view per image); the DDGSD paper's own loss
weights could not be checked here.
State: none (the view draws come from the trainer's generator, which the checkpoint restores).
"""

from __future__ import annotations

import torch

from mskd_fast._validation import check_nonnegative, check_positive
from mskd_fast.methods._common import bernoulli_kl, distorted_view, sample_view
from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod, bce_term

__all__ = ["DDGSD", "ddgsd_loss"]


def ddgsd_loss(logits1: torch.Tensor, logits2: torch.Tensor, features1: torch.Tensor, features2: torch.Tensor,
               targets: torch.Tensor, *, kl_weight: float = 1.0, temperature: float = 4.0,
               mmd_weight: float = 5e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDGSD for two views; returns ``(loss, {"bce", "bce2", "kl", "mmd"})``.

    ``logits1/2 (B, C)``, pooled ``features1/2 (B, D)`` (any float dtype; the MMD is computed in float32 or wider),
    0/1 ``targets (B, C)``. ``loss = bce + bce2 + kl_weight * kl + mmd_weight * mmd`` (module docstring).
    """
    check_nonnegative("kl_weight", kl_weight)
    check_positive("temperature", temperature)
    check_nonnegative("mmd_weight", mmd_weight)
    if logits1.shape != logits2.shape or features1.shape != features2.shape:
        raise ValueError(f"the two views must have equal shapes, got logits {tuple(logits1.shape)} / "
                         f"{tuple(logits2.shape)} and features {tuple(features1.shape)} / {tuple(features2.shape)}")
    bce1, bce2 = bce_term(logits1, targets), bce_term(logits2, targets)
    kl = (bernoulli_kl(logits2.detach(), logits1, temperature).mean()
          + bernoulli_kl(logits1.detach(), logits2, temperature).mean())
    wide = torch.promote_types(features1.dtype, torch.float32)
    gap = features1.to(wide).mean(dim=0) - features2.to(wide).mean(dim=0)
    mmd = gap.square().sum()
    loss = bce1 + bce2 + kl_weight * kl + mmd_weight * mmd
    return loss, {"bce": bce1, "bce2": bce2, "kl": kl, "mmd": mmd}


class DDGSD(SelfDistillationMethod):
    """``--method ddgsd``: one forward of ``2B`` images (the loader's view and a device-distorted one)."""

    name = "ddgsd"
    title = "DDGSD"
    terms = ("bce", "bce2", "kl", "mmd")
    diagnostic_terms = ("bce", "bce2", "kl", "mmd")
    flags = (
        MethodFlag("--ddgsd-kl-weight", "kl_weight", float, 1.0, "weight of the symmetric Bernoulli KL"),
        MethodFlag("--ddgsd-temperature", "temperature", float, 4.0, "T of the symmetric KL", "positive"),
        MethodFlag("--ddgsd-mmd-weight", "mmd_weight", float, 5e-4,
                   "weight of the squared distance of the views' mean pooled features"),
    )
    context = ("generator",)

    def __init__(self, model, *, generator: torch.Generator | None, kl_weight: float = 1.0, temperature: float = 4.0,
                 mmd_weight: float = 5e-4):
        super().__init__(model)
        check_nonnegative("kl_weight", kl_weight)
        check_positive("temperature", temperature)
        check_nonnegative("mmd_weight", mmd_weight)
        self.generator = generator
        self.kl_weight, self.temperature, self.mmd_weight = kl_weight, temperature, mmd_weight

    def prepare(self, images, targets, sample_ids, epoch: int) -> dict:
        boxes, flips = sample_view(images.shape[0], images.shape[-2], images.shape[-1], self.generator, images.device)
        return {"images": images, "targets": targets, "boxes": boxes, "flips": flips}

    def compute(self, images, targets, boxes, flips):
        batch = images.shape[0]
        view2 = distorted_view(images, boxes, flips)
        logits, features = self.student(torch.cat([images, view2]), with_features=True)
        loss, terms = ddgsd_loss(logits[:batch], logits[batch:], features[:batch], features[batch:], targets,
                                 kl_weight=self.kl_weight, temperature=self.temperature, mmd_weight=self.mmd_weight)
        parts = {"bce": terms["bce"], "bce2": terms["bce2"], "kl": self.kl_weight * terms["kl"],
                 "mmd": self.mmd_weight * terms["mmd"]}
        return self.terms_out(loss, logits[:batch], parts, **terms)

    def extra_repr(self) -> str:
        return f"kl_weight={self.kl_weight}, T={self.temperature}, mmd_weight={self.mmd_weight}, second view on device"
