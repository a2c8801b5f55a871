"""Collapse guard: cheap signs, read at evaluation time, that a run has collapsed to a degenerate model.

A collapsed multi-label model (docs/ACCURACY.md: every MSKD run from scratch with the paper's equations)
gives the *same* top-1 class to (nearly) every evaluation image, its logits grow without bound (50-300,
where a healthy run's stay within about -10..5), and its training BCE climbs far above its early value
(0.55 -> 2-4) while a healthy run's falls. The signals:

* ``top1_mode_frac``: the share of evaluation images whose arg-max class is the most common arg-max
  class (1.0 = one class for every image);
* ``top1_classes``: how many distinct arg-max classes the evaluation set gets;
* ``max_abs_logit``: the largest ``|logit|`` over the evaluation set;
* ``logit_std``: the mean over images of the per-image (row) standard deviation of the logits;
* ``bce_rise``: this epoch's mean training BCE over the lowest epoch mean BCE before it.

A model from random initialisation also gives one top-1 class to every image early on (the class
prior), with small logits, so the share alone never flags a run; it does together with logits above
:data:`MODE_LOGIT` (the "drifting" runs of docs/ACCURACY.md: 95 % on one class with logits of 51).
Large logits alone (above :data:`MAX_ABS_LOGIT`) flag a run unless it is visibly healthy: its training BCE
still within 10 % of its lowest epoch mean and fewer than half of the images on one top-1 class. A
fine-tuned model trained with a margin-pushing loss (the UD control of docs/ACCURACY.md: max |logit| 33,
BCE still falling, 14 % on the commonest top-1 class, vanilla's mAP) is not a collapse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "BCE_RISE",
    "MAX_ABS_LOGIT",
    "MODE_FRAC",
    "MODE_LOGIT",
    "SIGNAL_KEYS",
    "advice",
    "bce_rise",
    "collapse_reasons",
    "eval_signals",
]

MODE_FRAC = 0.9       # share of eval images on one top-1 class ...
MODE_LOGIT = 10.0     # ... counts as collapse together with a max |logit| above this
MAX_ABS_LOGIT = 30.0  # logits this large (collapsed runs: 50-300; healthy from scratch: within about -10..5) ...
HEALTHY_RISE = 1.1    # ... unless BCE is still within 10 % of its lowest epoch mean and top-1 classes are spread
HEALTHY_MODE = 0.5
BCE_RISE = 2.0        # training BCE this many times its lowest earlier epoch mean

SIGNAL_KEYS = ("top1_mode_frac", "top1_classes", "max_abs_logit", "logit_std", "bce_rise", "collapse")


def eval_signals(logits: torch.Tensor) -> dict:
    """``top1_mode_frac``, ``top1_classes``, ``max_abs_logit``, ``logit_std`` of eval logits ``(N, C)``.

    ``logits`` are the raw scores of the whole evaluation set (every DDP rank's rows, once each). With
    ``N == 0`` every value is NaN (``top1_classes`` 0).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    n = logits.shape[0]
    if n == 0:
        return {"top1_mode_frac": math.nan, "top1_classes": 0, "max_abs_logit": math.nan, "logit_std": math.nan}
    x = logits.detach().float()
    counts = torch.bincount(x.argmax(dim=1), minlength=x.shape[1])
    row_std = x.std(dim=1, unbiased=False)
    return {
        "top1_mode_frac": float(counts.max()) / n,
        "top1_classes": int((counts > 0).sum()),
        "max_abs_logit": float(x.abs().max()),
        "logit_std": float(row_std.mean()),
    }


def bce_rise(bce: float, earlier: Sequence[float]) -> float:
    """``bce`` over the lowest finite positive value of ``earlier`` (epoch mean BCEs; NaN when there is none,
    or ``bce`` is not finite)."""
    finite = [v for v in earlier if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    if not finite or not math.isfinite(bce):
        return math.nan
    return bce / min(finite)


def collapse_reasons(signals: Mapping) -> list[str]:
    """The collapse signs in ``signals`` (keys of :data:`SIGNAL_KEYS`; NaN = not measured), as phrases."""
    def value(key):
        v = signals.get(key, math.nan)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    reasons = []
    mode, logit, rise = value("top1_mode_frac"), value("max_abs_logit"), value("bce_rise")
    if mode is not None and logit is not None and mode >= MODE_FRAC and logit > MODE_LOGIT:
        reasons.append(f"{mode:.0%} of eval images share one top-1 class")
    healthy = rise is not None and rise < HEALTHY_RISE and (mode is None or mode < HEALTHY_MODE)
    if logit is not None and logit > MAX_ABS_LOGIT and not healthy:
        reasons.append(f"max |logit| {logit:.1f} (> {MAX_ABS_LOGIT:g})")
    if rise is not None and rise >= BCE_RISE:
        reasons.append(f"training BCE {rise:.1f}x its lowest earlier epoch mean")
    return reasons


def advice(args) -> str:
    """What to try against a collapse, given the run's flags (``recipe``, ``lr``, ``pretrained``)."""
    tips = []
    if getattr(args, "method", "mskd") == "mskd" and getattr(args, "recipe", None) not in ("stable", "step"):
        tips.append("the default recipe (--recipe step) or the stable one (--recipe stable)")
    lr = getattr(args, "lr", None)
    tips.append(f"a lower --lr (this run: {lr:g})" if isinstance(lr, (int, float)) else "a lower --lr")
    if not getattr(args, "pretrained", False) and not getattr(args, "initial_checkpoint", None):
        tips.append("a pretrained backbone (--pretrained)")
    return "try " + ", ".join(tips)
