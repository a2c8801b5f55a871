"""MulSupCon, multi-label supervised contrastive learning, trained jointly with BCE.

Source: Zhang, Wu, "Multi-Label Supervised Contrastive Learning", AAAI 2024; official code
``williamzhangsjtu/MulSupCon``: ``codes/models.py`` (``PretrainModel``: query encoder + projection head ``MLP``
(one hidden layer: Linear, BatchNorm1d, ReLU, Dropout 0.1, Linear to 256), a momentum key encoder (0.999), a
queue of 2048 keys with their labels, used once full), ``codes/utils.py`` (``generate_output_MulSupCon``: one anchor
per positive label, positives = the keys carrying that label; ``with_weight=False`` weights every anchor
``1/#anchors``) and ``codes/losses.py`` (``WeightedSupCon``, temperature 0.1).

As implemented: ``q = normalize(proj(f))`` from the student's pooled features ``f`` of the loader's image (the
same forward as the logits), ``k = normalize(proj_k(f_k))`` from the momentum encoder on a device-distorted second
view (``_common.distorted_view``), keys ``K = [k_batch ; queue (only once full)]`` with labels ``Y_K``::

    for every anchor (i, j) with y_ij = 1:  P_j = {keys whose labels contain j}
        l_ij = -(1/|P_j|) sum_{p in P_j} log softmax_K(q_i . K / tau)_p
    supcon = mean over the anchors of the batch
    loss   = BCE(z, y) + weight * supcon

``tau = 0.1``, ``dim = 256``, queue 2048, momentum 0.999 (their code); ``weight = 1``. The official recipe is two
stages: contrastive pre-training of the encoder, then a classifier (linear probe or fine-tuning) with BCE. Here both
are trained at once (joint form): the backbone gets both gradients from the first step, the queue fills during
training, and there is no separate pre-training budget. The joint weight has no source (their stages never mix);
1 is the unweighted sum, so a study should choose it on val. Rows without labels anchor nothing; a batch without
any label gives ``supcon = 0``.

After the optimizer step (skipped steps leave all of it untouched): the key encoder moves towards the student's
backbone and projection head (``k <- m k + (1 - m) q`` on parameters; its BatchNorm keeps its own statistics in
train mode, as in their code), and the batch's keys and labels are enqueued (under DDP, every process's keys,
gathered first). State (``step_state["method"]``): projection head, key encoder, queue, queue labels, pointer and
fill flag. Memory: a second copy of the backbone; compute: one extra no-grad forward of ``B`` images per step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from mskd_fast._validation import check_int, check_nonnegative, check_positive, check_unit_interval
from mskd_fast.methods._common import distorted_view, sample_view
from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod, bce_term, distributed_world

__all__ = ["MulSupCon", "ProjectionHead", "mulsupcon_loss"]


def mulsupcon_loss(queries: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                   *, temperature: float = 0.1, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """MulSupCon's contrastive term (module docstring); a 0-dim tensor.

    ``queries (B, D)`` and ``keys (K, D)`` L2-normalised, 0/1 ``query_labels (B, C)`` and ``key_labels (K, C)``,
    ``key_valid (K,)`` bool (invalid keys are neither positives nor in the denominator; ``None``: all valid).
    Anchors whose label no valid key carries are dropped. Differentiable w.r.t. ``queries``.
    """
    check_positive("temperature", temperature)
    if queries.shape[1] != keys.shape[1] or query_labels.shape[1] != key_labels.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} / keys {tuple(keys.shape)} and their labels "
                         f"{tuple(query_labels.shape)} / {tuple(key_labels.shape)} must agree in D and C")
    scores = queries @ keys.t() / temperature  # (B, K)
    key_y = key_labels.to(scores.dtype)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid.view(1, -1), torch.finfo(scores.dtype).min)
        key_y = key_y * key_valid.to(scores.dtype).view(-1, 1)
    log_prob = torch.log_softmax(scores, dim=1)
    # keys without a (valid) label are never positives: zero their log-probabilities so that no 0 * (-huge) occurs
    log_prob = torch.where(key_y.sum(dim=1).view(1, -1) > 0, log_prob, torch.zeros_like(log_prob))
    positives = key_y.sum(dim=0)  # (C,) keys per label
    per_anchor = -(log_prob @ key_y) / positives.clamp(min=1.0)  # (B, C): l_ij for every (i, j)
    anchors = query_labels.to(scores.dtype) * (positives > 0).to(scores.dtype)
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1.0)


class ProjectionHead(nn.Module):
    """MulSupCon's projection ``MLP`` with one hidden layer: ``Linear(D, H)``, ``BatchNorm1d``, ``ReLU``,
    ``Dropout(0.1)``, ``Linear(H, dim)`` with ``H = D // 2`` when ``D >= 2 * dim``, else ``dim``."""

    def __init__(self, in_features: int, dim: int = 256):
        super().__init__()
        hidden = in_features // 2 if in_features >= 2 * dim else dim
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class MulSupCon(SelfDistillationMethod):
    """``--method mulsupcon``: student forward + a no-grad momentum-encoder forward of a second view; a queue."""

    name = "mulsupcon"
    title = "MulSupCon"
    terms = ("bce", "supcon")
    diagnostic_terms = ("bce", "supcon")
    flags = (
        MethodFlag("--mulsupcon-weight", "weight", float, 1.0, "weight of the contrastive term in the joint loss"),
        MethodFlag("--mulsupcon-temperature", "temperature", float, 0.1, "tau of the contrastive softmax",
                   "positive"),
        MethodFlag("--mulsupcon-queue", "queue_size", int, 2048, "keys in the queue (used once full)", "count"),
        MethodFlag("--mulsupcon-momentum", "momentum", float, 0.999, "momentum of the key encoder", "unit"),
        MethodFlag("--mulsupcon-dim", "dim", int, 256, "output dimension of the projection head", "count"),
    )
    context = ("generator",)

    def __init__(self, model, *, generator: torch.Generator | None, weight: float = 1.0, temperature: float = 0.1,
                 queue_size: int = 2048, momentum: float = 0.999, dim: int = 256):
        super().__init__(model)
        check_nonnegative("weight", weight)
        check_positive("temperature", temperature)
        check_int("queue_size", queue_size, 1)
        check_unit_interval("momentum", momentum)
        check_int("dim", dim, 1)
        self.generator = generator
        self.weight, self.temperature, self.momentum = weight, temperature, momentum
        core = self.core
        device = core.fc.weight.device
        self.projection = ProjectionHead(core.num_features, dim).to(device)
        key_model = copy.deepcopy(core)
        key_model.fc = nn.Identity()  # only the pooled features are used
        self.key_encoder = key_model.requires_grad_(False).train()
        self.key_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, device=device), dim=1))
        self.register_buffer("queue_labels", torch.zeros(queue_size, core.num_classes, device=device))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("queue_full", torch.zeros((), dtype=torch.bool, device=device))

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(key-side, query-side) parameter lists of the momentum update, in matching order."""
        keys = list(self.key_encoder.backbone.parameters()) + list(self.key_projection.parameters())
        queries = list(self.core.backbone.parameters()) + list(self.projection.parameters())
        return keys, queries

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters())

    def prepare(self, images, targets, sample_ids, epoch: int) -> dict:
        boxes, flips = sample_view(images.shape[0], images.shape[-2], images.shape[-1], self.generator, images.device)
        return {"images": images, "targets": targets, "boxes": boxes, "flips": flips}

    def compute(self, images, targets, boxes, flips):
        logits, features = self.student(images, with_features=True)
        queries = F.normalize(self.projection(features).float(), dim=1)
        with torch.no_grad():
            view2 = distorted_view(images, boxes, flips)
            key_features = self.key_encoder.features(view2).mean(dim=(2, 3))
            keys = F.normalize(self.key_projection(key_features).float(), dim=1)
        batch_valid = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
        all_keys = torch.cat([keys, self.queue])
        all_labels = torch.cat([targets.to(keys.dtype), self.queue_labels])
        valid = torch.cat([batch_valid, self.queue_full.expand(self.queue.shape[0])])
        supcon = mulsupcon_loss(queries, targets, all_keys, all_labels, temperature=self.temperature, key_valid=valid)
        bce = bce_term(logits, targets)
        parts = {"bce": bce, "supcon": self.weight * supcon}
        out = self.terms_out(bce + self.weight * supcon, logits, parts, bce=bce, supcon=supcon)
        out["_keys"] = keys
        out["_labels"] = targets.to(keys.dtype)
        return out

    @torch.no_grad()
    def after_step(self, skipped: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        keep = skipped == 0
        key_params, query_params = self._pairs()
        step = torch._foreach_sub(query_params, key_params)
        torch._foreach_mul_(step, (1.0 - self.momentum) * keep.to(key_params[0].dtype))
        torch._foreach_add_(key_params, step)
        keys, labels = pending["_keys"], pending["_labels"]
        if distributed_world() > 1:
            from mskd_fast.methods.pskd import _gather_rows

            keys, labels, keep_all = _gather_rows(keys, labels, keep.expand(keys.shape[0]).contiguous())
            keep = keep_all.all()
        size = self.queue.shape[0]
        rows = keys.shape[0]
        if rows > size:  # more keys than the queue holds: the newest ``size`` of them
            keys, labels, rows = keys[-size:], labels[-size:], size
        slots = (self.queue_pointer + torch.arange(rows, device=keys.device)) % size
        self.queue[slots] = torch.where(keep, keys, self.queue[slots])
        self.queue_labels[slots] = torch.where(keep, labels, self.queue_labels[slots])
        advanced = self.queue_pointer + rows * keep.to(torch.int64)
        self.queue_full |= advanced >= size
        self.queue_pointer.copy_(advanced % size)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, tau={self.temperature}, queue={self.queue.shape[0]}, "
                f"momentum={self.momentum}, dim={self.queue.shape[1]}, key view on device")
