"""USKD, the self-distillation form of "normalized KD with customized soft labels", for multi-label training.

Source: Yang, Zeng, Li, Zhang, Yuan, Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels", ICCV 2023; official code ``yzd-v/cls_KD``,
``mmcls/distillation/losses/uskd.py`` (``alpha=1, beta=0.1, mu=0.005``; the CIFAR-100 config uses 0.1/0.1/0.1)
and ``classification_distiller.py`` (the auxiliary head reads the pooled output of the second-to-last stage; the
model's own CE stays).

Original (softmax, one label): a soft target for the target class ``p_t = s_t^2 + 1 - mean_batch(s_t^2)``
(detached), Zipf soft labels (``1/rank``) over the non-target classes ranked by the normalised non-target
probabilities of the final head plus an auxiliary linear head on a middle stage, and the auxiliary head trained
with label-smoothed CE weighted by ``mu``.

Multi-label adaptation (as implemented): ``s = sigmoid(z)``, ``w`` the auxiliary head's logits, ``P_i``/``N_i`` the
positives/negatives of row ``i`` (per-row sums, then the batch mean, then ``/C``, so the BCE part is the project's
mean BCE and USKD's weights keep their ratio to a per-sample loss)::

    p_ic   = sg(s_ic^2) + 1 - mean_{(j,t): y_jt = 1} sg(s_jt^2)                    for c in P_i
    pos    = mean_i sum_{c in P_i} -p_ic * log s_ic                           / C
    rank_i = ranks of (softmax over N_i of sg(z_i)) + (softmax over N_i of sg(w_i)), descending, 1-based
    zipf_i = (1 / rank_i) / sum_{N_i} (1 / rank_i)                                 over c in N_i
    non    = mean_i sum_{c in N_i} -zipf_ic * log softmax over N_i of z_i     / C
    aux    = BCE(w, (1 - 0.1) * y + 0.1 / 2)                                       (mean over B*C)
    loss   = BCE(z, y) + alpha * pos + beta * non + mu * aux

Each positive is a Bernoulli "target" (``-p log s``, the positive half of a BCE); the negatives' softmax (each
row's partial softmax over its negatives) is matched to the Zipf distribution by rank; label smoothing is per-class
Bernoulli (towards 1/2; USKD's ``0.1/C`` is the softmax analogue). Rows without positives have no ``pos`` term and
rank/Zipf over all classes; rows without negatives have no ``non`` term. Differences (docs/METHODS.md): the code
ranks with log-probabilities of the final head (a reassigned variable) where the paper says probabilities, here
probabilities; the code keeps only the top-2 labels of a soft multi-label target, here every positive.

The auxiliary head ``Linear(D_mid, C)`` reads the globally pooled output of the backbone's second-to-last
``feature_info`` stage (``layer3`` of a ResNet; a forward hook, so the student is forwarded once); its parameters
join the optimizer and the checkpoint. State: the auxiliary head (``step_state["method"]``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mskd_fast._validation import check_int, check_nonnegative
from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod, bce_term

__all__ = ["USKD", "uskd_loss"]

LABEL_SMOOTHING = 0.1


def _negatives_softmax(logits: torch.Tensor, negatives: torch.Tensor, log: bool) -> torch.Tensor:
    """Softmax (or log-softmax) of each row over its negatives; 0 at positives (finite everywhere, also for rows
    without negatives, whose result is all 0)."""
    masked = logits.masked_fill(~negatives, torch.finfo(logits.dtype).min)
    out = torch.log_softmax(masked, dim=1) if log else torch.softmax(masked, dim=1)
    return torch.where(negatives, out, torch.zeros_like(out))


def zipf_targets(logits: torch.Tensor, aux_logits: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """USKD's Zipf soft labels ``(B, C)`` over each row's negatives (0 at positives; rows without negatives: 0).

    Negatives are ranked (1 = largest, ties by class index) by the sum of the two heads' softmax over the negatives;
    the label of rank ``r`` is ``1/r`` normalised over the row's negatives. Not differentiable (a target).
    """
    score = _negatives_softmax(logits.detach(), negatives, log=False) + _negatives_softmax(
        aux_logits.detach().to(logits.dtype), negatives, log=False)
    score = score.masked_fill(~negatives, -1.0)  # positives rank after every negative
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(1, score.shape[1] + 1, device=score.device)
                                             .expand_as(order).contiguous())
    inverse = torch.where(negatives, 1.0 / ranks.to(logits.dtype), torch.zeros_like(logits))
    return inverse / inverse.sum(dim=1, keepdim=True).clamp(min=torch.finfo(logits.dtype).tiny)


def uskd_loss(logits: torch.Tensor, aux_logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 1.0,
              beta: float = 0.1, mu: float = 0.005) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """USKD for multi-label logits; returns ``(loss, {"bce", "pos", "non", "aux"})`` (module docstring).

    ``logits (B, C)`` of the final head, ``aux_logits (B, C)`` of the auxiliary head, 0/1 ``targets (B, C)``.
    ``loss = bce + alpha * pos + beta * non + mu * aux``.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        check_nonnegative(name, value)
    if aux_logits.shape != logits.shape:
        raise ValueError(f"aux_logits must have the logits' shape {tuple(logits.shape)}, got {tuple(aux_logits.shape)}")
    classes = logits.shape[1]
    y = targets.to(logits.dtype)
    positives = targets > 0.5
    negatives = ~positives
    s2 = torch.sigmoid(logits.detach()) ** 2
    mean_s2 = (s2 * y).sum() / y.sum().clamp(min=1.0)
    soft = (s2 + 1.0 - mean_s2) * y
    pos = (-soft * F.logsigmoid(logits)).sum(dim=1).mean() / classes
    zipf = zipf_targets(logits, aux_logits, negatives)
    non = (-zipf * _negatives_softmax(logits, negatives, log=True)).sum(dim=1).mean() / classes
    smoothed = y * (1.0 - LABEL_SMOOTHING) + LABEL_SMOOTHING / 2.0
    aux = F.binary_cross_entropy_with_logits(aux_logits, smoothed.to(aux_logits.dtype))
    bce = bce_term(logits, y)
    loss = bce + alpha * pos + beta * non + mu * aux
    return loss, {"bce": bce, "pos": pos, "non": non, "aux": aux}


class USKD(SelfDistillationMethod):
    """``--method uskd``: one forward (a hook reads the middle stage), an auxiliary linear head in the optimizer."""

    name = "uskd"
    title = "USKD"
    terms = ("bce", "pos", "non", "aux")
    diagnostic_terms = ("bce", "pos", "non", "aux")
    flags = (
        MethodFlag("--uskd-alpha", "alpha", float, 1.0,
                   "weight of the positives' soft-target term (CIFAR config: 0.1)"),
        MethodFlag("--uskd-beta", "beta", float, 0.1, "weight of the negatives' Zipf soft-label term"),
        MethodFlag("--uskd-mu", "mu", float, 0.005, "weight of the auxiliary head's label-smoothed BCE (CIFAR: 0.1)"),
    )

    def __init__(self, model, *, alpha: float = 1.0, beta: float = 0.1, mu: float = 0.005, stage: int = -2):
        super().__init__(model)
        for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
            check_nonnegative(name, value)
        check_int("stage", stage, -10**6)
        info = list(getattr(self.core.backbone, "feature_info", None) or [])
        if len(info) < 2 or not -len(info) <= stage < len(info):
            raise ValueError(f"USKD needs the backbone's feature_info stages (timm) to pick stage {stage}; "
                             f"{type(self.core.backbone).__name__} has {len(info)}")
        entry = info[stage]
        self.stage_name, self.stage_channels = entry["module"], int(entry["num_chs"])
        module = self.core.backbone.get_submodule(self.stage_name)
        weight = self.core.fc.weight
        self.aux_head = nn.Linear(self.stage_channels, self.core.num_classes, device=weight.device, dtype=weight.dtype)
        self.alpha, self.beta, self.mu = alpha, beta, mu
        self._tap: list = [None]  # the middle stage's output of the current forward (hook side effect)
        self._hook = module.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self._tap[0] = output

    def remove_hook(self) -> None:
        """Detach the forward hook from the student (when the method object is discarded)."""
        self._hook.remove()

    def compute(self, images, targets):
        logits = self.student(images)
        middle, self._tap[0] = self._tap[0], None
        spatial = (1, 2) if self.core.nhwc else (2, 3)
        pooled = middle.mean(dim=spatial)
        with torch.autocast(images.device.type, enabled=False):
            aux_logits = self.aux_head(pooled.float())
        loss, terms = uskd_loss(logits, aux_logits, targets, alpha=self.alpha, beta=self.beta, mu=self.mu)
        parts = {"bce": terms["bce"], "pos": self.alpha * terms["pos"], "non": self.beta * terms["non"],
                 "aux": self.mu * terms["aux"]}
        return self.terms_out(loss, logits, parts, **terms)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, mu={self.mu}, auxiliary head on {self.stage_name} "
                f"({self.stage_channels} channels)")
