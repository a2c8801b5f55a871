"""TF-KD, teacher-free knowledge distillation in its regularisation form (Tf-KD_reg), for multi-label training.

Source: Yuan, Tay, Li, Wang, Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization",
CVPR 2020, Tf-KD_reg (sec. 4.2); official code ``yuanli2333/Teacher-free-Knowledge-Distillation``,
``my_loss_function.py::loss_kd_regularization`` and ``ImageNet_train/main.py`` (``--alpha 0.1 --T 20``).

Single-label original: a virtual teacher that puts probability ``a`` on the true class and ``(1-a)/(K-1)``
on every other class, distilled at temperature ``T``.

Multi-label adaptation (as implemented): every class is its own Bernoulli with a virtual teacher probability
``t = a*y + (1-a)*(1-y)`` (``a`` on the labels present, ``1-a`` on the others), softened at temperature ``T``
the way a logit is (``t_T = sigmoid(logit(t) / T)``), and the student's ``s_T = sigmoid(z / T)``::

    loss = BCE(z, y) + alpha * T^2 * mean_{i,c} bkl(t_T || s_T)

Both terms are means over the ``B*C`` (sample, class) pairs, so their ratio is the original's CE : batch-mean
KL. Defaults ``a = 0.9`` (the paper's choice of a correct-class probability of 0.9 or more; the code uses 0.99),
``alpha = 0.1`` and ``T = 20`` (the code's ImageNet/CIFAR settings). Differences from the original (docs/METHODS.md):
the BCE keeps weight 1 instead of ``1 - alpha``; the teacher is softened as a logit (the paper) rather than by a
softmax of the probabilities themselves (the code's ``softmax(p/T)``), and the student is softened too (paper).
State: none.
"""

from __future__ import annotations

import math

import torch

from mskd_fast._validation import check_nonnegative, check_number, check_positive
from mskd_fast.methods._common import bernoulli_kl
from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod, bce_term

__all__ = ["TFKD", "check_tfkd_args", "tfkd_loss"]


def check_tfkd_args(correct_prob, alpha, temperature) -> None:
    """``correct_prob`` in (0.5, 1) (1 would be an infinite teacher logit), ``alpha >= 0``, ``temperature > 0``."""
    check_number("correct_prob", correct_prob)
    if not 0.5 < correct_prob < 1.0:
        raise ValueError(f"correct_prob must be in (0.5, 1), got {correct_prob!r}")
    check_nonnegative("alpha", alpha)
    check_positive("temperature", temperature)


def tfkd_loss(logits: torch.Tensor, targets: torch.Tensor, *, correct_prob: float = 0.9, alpha: float = 0.1,
              temperature: float = 20.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TF-KD_reg for multi-label logits ``(B, C)`` and 0/1 ``targets (B, C)``; returns ``(loss, {"bce", "kd"})``.

    ``kd`` is the unweighted ``mean bkl(t_T || s_T)`` (see the module docstring); ``loss = bce + alpha*T^2*kd``.
    """
    check_tfkd_args(correct_prob, alpha, temperature)
    y = targets.to(logits.dtype)
    teacher_logit = math.log(correct_prob / (1.0 - correct_prob))
    teacher = (2.0 * y - 1.0) * teacher_logit  # logit(a) on labels present, logit(1-a) = -logit(a) elsewhere
    bce = bce_term(logits, y)
    kd = bernoulli_kl(teacher, logits, temperature).mean()
    return bce + alpha * temperature**2 * kd, {"bce": bce, "kd": kd}


class TFKD(SelfDistillationMethod):
    """``--method tfkd``: one forward, BCE plus the virtual-Bernoulli-teacher KL (no state, no extra pass)."""

    name = "tfkd"
    title = "TF-KD"
    terms = ("bce", "kd")
    diagnostic_terms = ("bce", "kd")
    flags = (
        MethodFlag("--tfkd-correct-prob", "correct_prob", float, 0.9,
                   "a: the virtual teacher's probability of a label present (1-a for one absent)", "above_half"),
        MethodFlag("--tfkd-alpha", "alpha", float, 0.1, "weight of the T^2-scaled Bernoulli KL"),
        MethodFlag("--tfkd-temperature", "temperature", float, 20.0, "T of teacher and student", "positive"),
    )

    def __init__(self, model, *, correct_prob: float = 0.9, alpha: float = 0.1, temperature: float = 20.0):
        super().__init__(model)
        check_tfkd_args(correct_prob, alpha, temperature)
        self.correct_prob, self.alpha, self.temperature = correct_prob, alpha, temperature

    def compute(self, images, targets):
        logits = self.student(images)
        loss, terms = tfkd_loss(logits, targets, correct_prob=self.correct_prob, alpha=self.alpha,
                                temperature=self.temperature)
        parts = {"bce": terms["bce"], "kd": self.alpha * self.temperature**2 * terms["kd"]}
        return self.terms_out(loss, logits, parts, **terms)

    def extra_repr(self) -> str:
        return f"a={self.correct_prob}, alpha={self.alpha}, T={self.temperature}"
