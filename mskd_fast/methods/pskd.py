"""PS-KD, progressive self-knowledge distillation, for multi-label training.

Source: Kim, Ji, Yoon, Hwang, "Self-Knowledge Distillation with Progressive Refinement of Targets", ICCV 2021;
official code ``lgcnsai/PS-KD-Pytorch``, ``main.py`` (``alpha_t = alpha_T * (epoch + 1) / end_epoch``, the
per-sample ``all_predictions`` bank, set to the one-hot targets in epoch 0 and overwritten by each sample's
latest softmax output) and ``loss/pskd_loss.py`` (cross-entropy against the soft target).

Multi-label adaptation (as implemented): the bank holds, per training sample, the sigmoid ``s`` of its logits
the last time it was trained on (i.e. the previous epoch; ``N x C`` float32); the soft target and the loss are::

    s_prev = bank[id] if the sample was seen, else y
    target = (1 - alpha_t) * y + alpha_t * s_prev
    loss   = BCE(z, target)                 # mean over B*C, the soft BCE; "bce" reports BCE(z, y)
    alpha_t = alpha_T * (e + 1) / E         # e = 0-based epoch, E = --epochs: alpha_T at the last epoch

``alpha_T = 0.8`` (paper and code). The paper's ``alpha_t = alpha_T * t / T`` counts epochs from 1; the issue's
``0.8 * epoch / epochs`` is read the same way. The authors' MSKD code fed these probabilities as logits into a
softmax KL (a no-op); here the soft target enters the BCE directly, as PS-KD's cross-entropy does.

State (checkpoint ``step_state["method"]``, exact on resume): the bank and its ``seen`` mask. After the optimizer
step the batch's rows are overwritten with ``sigmoid(z).detach()`` unless the step was skipped as non-finite;
under DDP the rows of every process are gathered first, so every process holds the same bank.
"""

from __future__ import annotations

import torch

from mskd_fast._validation import check_int, check_unit_interval
from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod, bce_term, distributed_world

__all__ = ["PSKD", "pskd_alpha", "pskd_loss"]


def pskd_alpha(epoch: int, epochs: int, alpha_T: float = 0.8) -> float:
    """``alpha_T * (epoch + 1) / epochs`` for the 0-based ``epoch`` (``alpha_T`` at the last epoch)."""
    check_int("epochs", epochs, 1)
    check_int("epoch", epoch, 0)
    check_unit_interval("alpha_T", alpha_T)
    return alpha_T * min(epoch + 1, epochs) / epochs


def pskd_loss(logits: torch.Tensor, targets: torch.Tensor, previous: torch.Tensor, alpha_t,
              seen: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PS-KD's soft-target BCE; returns ``(loss, {"bce", "soft_bce"})`` with ``loss = soft_bce``.

    ``logits (B, C)``, 0/1 ``targets (B, C)``, ``previous (B, C)`` the samples' sigmoid outputs of the previous
    epoch, ``alpha_t`` a float or 0-dim tensor in [0, 1], ``seen (B,)`` bool (rows not seen yet use ``targets``
    as their previous prediction; ``None``: all seen).
    """
    if previous.shape != logits.shape:
        raise ValueError(f"previous must have the logits' shape {tuple(logits.shape)}, got {tuple(previous.shape)}")
    y = targets.to(logits.dtype)
    prev = previous.to(logits.dtype)
    if seen is not None:
        prev = torch.where(seen.view(-1, 1), prev, y)
    soft = (1.0 - alpha_t) * y + alpha_t * prev
    soft_bce = bce_term(logits, soft)
    return soft_bce, {"bce": bce_term(logits, y), "soft_bce": soft_bce}


class PSKD(SelfDistillationMethod):
    """``--method pskd``: one forward; a per-sample bank of last epoch's predictions (needs sample ids)."""

    name = "pskd"
    title = "PS-KD"
    terms = ("bce", "soft_bce")
    diagnostic_terms = ("bce", "pskd")  # pskd = soft_bce - bce: what the soft target changes
    needs_sample_ids = True
    flags = (MethodFlag("--pskd-alpha", "alpha_T", float, 0.8,
                        "alpha_T: weight of last epoch's prediction in the soft target at the last epoch", "unit"),)
    context = ("num_samples", "epochs")

    def __init__(self, model, *, num_samples: int, epochs: int, alpha_T: float = 0.8):
        super().__init__(model)
        check_int("num_samples", num_samples, 1)
        pskd_alpha(0, epochs, alpha_T)  # validates epochs and alpha_T
        self.num_samples, self.epochs, self.alpha_T = num_samples, epochs, alpha_T
        device = next(self.core.parameters()).device
        self.register_buffer("bank", torch.zeros(num_samples, self.core.num_classes, device=device))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool, device=device))
        self.register_buffer("alpha_t", torch.zeros((), device=device), persistent=False)
        self._alpha_epoch: int | None = None

    def check_inputs(self, images, targets, sample_ids) -> None:
        super().check_inputs(images, targets, sample_ids)
        if sample_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = int(sample_ids.min()), int(sample_ids.max())
            if low < 0 or high >= self.num_samples:
                raise ValueError(f"sample_ids must lie in [0, {self.num_samples}) (the training set's rows), "
                                 f"got values in [{low}, {high}]")

    def prepare(self, images, targets, sample_ids, epoch: int) -> dict:
        if epoch != self._alpha_epoch:  # a device fill only when the epoch changes (no host sync)
            self.alpha_t.fill_(pskd_alpha(epoch, self.epochs, self.alpha_T))
            self._alpha_epoch = epoch
        return {"images": images, "targets": targets, "sample_ids": sample_ids}

    def compute(self, images, targets, sample_ids):
        logits = self.student(images)
        loss, terms = pskd_loss(logits, targets, self.bank[sample_ids], self.alpha_t, self.seen[sample_ids])
        parts = {"bce": terms["bce"], "pskd": terms["soft_bce"] - terms["bce"]}
        out = self.terms_out(loss, logits, parts, **terms)
        out["_probs"] = torch.sigmoid(logits.detach()).float()
        out["_ids"] = sample_ids
        return out

    @torch.no_grad()
    def after_step(self, skipped: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        probs, ids = pending["_probs"], pending["_ids"]
        keep = (skipped == 0).expand(ids.shape[0])
        if distributed_world() > 1:
            probs, ids, keep = _gather_rows(probs, ids, keep)
        self.bank[ids] = torch.where(keep.view(-1, 1), probs, self.bank[ids])
        self.seen[ids] = self.seen[ids] | keep

    def extra_repr(self) -> str:
        return f"alpha_T={self.alpha_T}, epochs={self.epochs}, bank={self.num_samples}x{self.core.num_classes}"


def _gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Concatenate each tensor's rows over all processes (rank order)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return out
