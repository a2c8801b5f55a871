"""UD-style partial softmax as a method object: ``--method ud`` (the loss is :mod:`.partial_softmax`).

Source: Song, Liu, Wang, Wang, "Uncertainty-Aware Multi-label Self-distillation" / UD (ACM MM 2021): the
"pick-all-labels" calibration loss of its first stage, the part of UD that needs no second training stage.

As implemented (:func:`mskd_fast.methods.partial_softmax.partial_softmax_loss`, float64-tested there)::

    loss = BCE(z, y) + c * mean_i (1/|M_i|) sum_{t in M_i} -log(e^{z_t/T} / (e^{z_t/T} + sum_{k not in M_i} e^{z_k/T}))

``c = --ud-weight`` (default 0.1), ``T = --ud-temperature`` (default 4, MSKD's T). Multi-label by construction
(each positive against the row's negatives). Differences from UD: no uncertainty-weighted second stage, and the
temperature is MSKD's (docs/METHODS.md). It is also the accuracy study's label-push control (docs/ACCURACY.md).
State: none; one forward per step.
"""

from __future__ import annotations

from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod
from mskd_fast.methods.partial_softmax import PartialSoftmaxBCELoss

__all__ = ["UD"]


class UD(SelfDistillationMethod):
    """``--method ud``: one forward, ``BCE + c * partial_softmax_loss`` (:class:`PartialSoftmaxBCELoss`)."""

    name = "ud"
    title = "UD partial softmax"
    terms = ("bce", "ud")
    diagnostic_terms = ("bce", "ud")
    flags = (
        MethodFlag("--ud-weight", "weight", float, 0.1, "--method ud: weight c of the partial-softmax term "
                   "(BCE + c * PS)"),
        MethodFlag("--ud-temperature", "temperature", float, 4.0,
                   "--method ud: temperature T of the partial softmax", "positive"),
    )

    def __init__(self, model, *, weight: float = 0.1, temperature: float = 4.0):
        super().__init__(model)
        self.loss = PartialSoftmaxBCELoss(weight, temperature)  # no parameters or buffers: no state

    def compute(self, images, targets):
        logits = self.student(images)
        loss, terms, parts = self.loss(logits, None, None, None, targets, return_parts=True)
        return self.terms_out(loss, logits, parts, **terms)

    def extra_repr(self) -> str:
        return f"weight {self.loss.weight}, T={self.loss.temperature}"  # the header line of the step-path version
