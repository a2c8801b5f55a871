"""DLB, self-distillation from the last mini-batch, for multi-label training.

Source: Shen, Xu, Wang, Lin, Chen, Zhang, "Self-Distillation from the Last Mini-Batch for Consistency
Regularization", CVPR 2022; official code ``Meta-knowledge-Lab/DLB``, ``dlb.py`` (run with ``--T 3 --alpha 1``).

Original: half of each mini-batch is the other half of the previous one; the previous step's logits of those
samples, detached and softened at ``T``, are soft targets for their logits now (``T^2``-scaled softmax KL),
added to the cross-entropy of the whole batch.

Multi-label adaptation (as implemented): the loader delivers ``B`` new images per step; the method keeps the
last ``h = B // 2`` of them (the augmented tensors, so the same augmentation) and their logits, and forwards them
again with the next batch (one forward of ``B + h`` images)::

    loss = BCE(z_new, y_new) + alpha * T^2 * mean_{j,c} bkl(sigmoid(sg(z_stored)/T) || sigmoid(z_carried/T))

``T = 3``, ``alpha = 1`` (the code's settings). Differences from the original (docs/METHODS.md): the BCE covers
the ``B`` new images only (each image's BCE counts once per epoch, as in every other method here; DLB's batch of
``B`` counts the carried half twice and has half as many new images per step), and the carried half keeps its
augmentation (the paper's scheme; DLB's public code re-forwards a second augmentation of the previous batch).
The first step of a run has no carried half (term 0, an eager ``B``-image forward); a step after a skipped
(non-finite) step has its term masked to 0 (the stored logits of a skipped step are not trusted).

State (per process, checkpoint ``step_state["method_per_rank"]``): the stored images ``(h,3,H,W)``, their logits
``(h,C)`` and the validity flag; a resume continues exactly.
"""

from __future__ import annotations

import torch

from mskd_fast._validation import check_nonnegative, check_positive
from mskd_fast.methods._common import bernoulli_kl
from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod, bce_term

__all__ = ["DLB", "dlb_loss"]


def dlb_loss(logits: torch.Tensor, targets: torch.Tensor, carried_logits: torch.Tensor | None,
             stored_logits: torch.Tensor | None, *, alpha: float = 1.0, temperature: float = 3.0,
             valid=1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DLB for multi-label logits; returns ``(loss, {"bce", "kd"})`` with ``loss = bce + alpha * T^2 * kd``.

    ``logits (B, C)`` of the new images and their 0/1 ``targets``; ``carried_logits (h, C)`` of the carried
    images now and ``stored_logits (h, C)`` of the same images at the previous step (a target: detached here);
    both ``None`` at the first step (``kd = 0``). ``valid``: a 0/1 float or 0-dim tensor multiplying ``kd``.
    """
    check_nonnegative("alpha", alpha)
    check_positive("temperature", temperature)
    bce = bce_term(logits, targets)
    if carried_logits is None:
        kd = bce.new_zeros(())
    else:
        if carried_logits.shape != stored_logits.shape:
            raise ValueError(f"carried_logits {tuple(carried_logits.shape)} and stored_logits "
                             f"{tuple(stored_logits.shape)} must have the same shape")
        kd = bernoulli_kl(stored_logits.detach().to(carried_logits.dtype), carried_logits, temperature).mean() * valid
    return bce + alpha * temperature**2 * kd, {"bce": bce, "kd": kd}


class DLB(SelfDistillationMethod):
    """``--method dlb``: one forward of ``B + B//2`` images per step; per-process stored half batch."""

    name = "dlb"
    title = "DLB"
    terms = ("bce", "kd")
    diagnostic_terms = ("bce", "kd")
    flags = (
        MethodFlag("--dlb-alpha", "alpha", float, 1.0, "weight of the T^2-scaled Bernoulli KL on the carried half"),
        MethodFlag("--dlb-temperature", "temperature", float, 3.0, "T of the last-mini-batch KL", "positive"),
    )

    def __init__(self, model, *, alpha: float = 1.0, temperature: float = 3.0):
        super().__init__(model)
        check_nonnegative("alpha", alpha)
        check_positive("temperature", temperature)
        self.alpha, self.temperature = alpha, temperature
        self.stored_images: torch.Tensor | None = None
        self.stored_logits: torch.Tensor | None = None
        self.stored_valid: torch.Tensor | None = None

    @classmethod
    def check_args(cls, args) -> None:
        if args.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 with --method dlb (half of each batch is carried into the "
                             f"next), got {args.batch_size}")

    def check_inputs(self, images, targets, sample_ids) -> None:
        super().check_inputs(images, targets, sample_ids)
        if images.shape[0] < 2:
            raise ValueError(f"DLB carries half of each batch into the next: batch size must be >= 2, "
                             f"got {images.shape[0]}")

    def use_compiled(self) -> bool:
        return self.stored_images is not None  # the first step (no carried half) has other shapes: eager

    def prepare(self, images, targets, sample_ids, epoch: int) -> dict:
        inputs = {"images": images, "targets": targets}
        if self.stored_images is not None:
            inputs.update(stored_images=self.stored_images, stored_logits=self.stored_logits,
                          stored_valid=self.stored_valid)
        return inputs

    def compute(self, images, targets, stored_images=None, stored_logits=None, stored_valid=None):
        batch = images.shape[0]
        if stored_images is None:
            logits, carried = self.student(images), None
        else:
            both = self.student(torch.cat([images, stored_images]))
            logits, carried = both[:batch], both[batch:]
        loss, terms = dlb_loss(logits, targets, carried, stored_logits, alpha=self.alpha,
                               temperature=self.temperature, valid=1.0 if stored_valid is None else stored_valid)
        parts = {"bce": terms["bce"], "kd": self.alpha * self.temperature**2 * terms["kd"]}
        out = self.terms_out(loss, logits, parts, **terms)
        half = batch // 2
        out["_images"] = images[batch - half:]
        out["_logits"] = logits[batch - half:].detach().float()
        return out

    @torch.no_grad()
    def after_step(self, skipped: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        images, logits = pending["_images"], pending["_logits"]
        bad = skipped != 0
        if self.stored_images is None or self.stored_images.shape != images.shape:
            self.stored_images = images.clone()  # clone keeps the memory format; loaders may reuse their buffers
            self.stored_logits = torch.zeros_like(logits)
            self.stored_valid = torch.zeros((), device=logits.device)
        else:
            self.stored_images.copy_(images)
        torch.where(bad, torch.zeros_like(logits), logits, out=self.stored_logits)
        self.stored_valid.copy_((~bad).float())

    def rank_state_dict(self) -> dict:
        if self.stored_images is None:
            return {}
        return {"images": self.stored_images.cpu(), "logits": self.stored_logits.cpu(),
                "valid": self.stored_valid.cpu()}

    def load_rank_state_dict(self, state: dict) -> None:
        if not state:
            self.stored_images = self.stored_logits = self.stored_valid = None
            return
        device = next(self.core.parameters()).device
        self.stored_images = state["images"].to(device)
        self.stored_logits = state["logits"].to(device)
        self.stored_valid = state["valid"].to(device)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, T={self.temperature}, carried half batch"
