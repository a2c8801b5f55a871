"""Training diagnostics a user can act on: how each loss term pulls on the classifier, against BCE.

Every ``--log-interval`` steps the training step asks the loss for its *weighted* terms (``bce``,
``iota*lsd``, ``kappa*rsd``, ``lambda*ssd``; ``c*ud`` for ``--method ud``) with their graphs, and takes
each term's gradient with respect to the **classifier's parameters only** (``torch.autograd.grad`` on the
last layer: the backward of one matmul per term, not of the backbone; the parameter ``.grad`` is not
touched, so the update is the same as without diagnostics). From these, per term ``t``:

* ``gnorm_<t>``: the norm of ``t``'s gradient on the classifier;
* ``gcos_<t>`` (``t`` other than ``bce``): its cosine with BCE's gradient. A term whose cosine stays
  negative with a norm comparable to BCE's is cancelling the supervision (docs/ACCURACY.md: the
  ``stable`` plateau on fashion-multi, R-SD at cosine -0.5 and 0.6x BCE's norm);

and, every step, ``train_logit_row_std`` (the mean over the batch of each image's logit standard deviation
over classes: squashed logits show up here) and whether gradient clipping was active (``clip_frac`` in the
epoch summary). Everything stays on the device; the trainer reads the epoch means with the other losses.

:func:`opposing_terms` names the terms whose gradient has opposed BCE's for :data:`OPPOSE_EPOCHS`
consecutive epochs (cosine below :data:`OPPOSE_COS` at a norm of at least :data:`OPPOSE_RATIO` x BCE's);
the trainer's epoch line and final summary warn with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = [
    "OPPOSE_COS",
    "OPPOSE_EPOCHS",
    "OPPOSE_RATIO",
    "diagnostic_keys",
    "gradient_diagnostics",
    "opposing_terms",
]

OPPOSE_COS = -0.25
OPPOSE_RATIO = 0.5
OPPOSE_EPOCHS = 2


def diagnostic_keys(terms: Sequence[str]) -> tuple[str, ...]:
    """The summary.csv columns for a method whose loss columns are ``terms`` (``"loss"`` first)."""
    parts = [t for t in terms if t != "loss"]
    keys = [f"gnorm_{t}" for t in parts] + [f"gcos_{t}" for t in parts if t != "bce"]
    return (*keys, "train_logit_row_std")


def gradient_diagnostics(parts: Mapping[str, torch.Tensor], params: Iterable[torch.Tensor],
                         logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient norms and cosines of the weighted loss terms ``parts`` on ``params`` (0-dim float32 tensors).

    ``parts`` maps a term name (``"bce"`` required) to its weighted, differentiable 0-dim value; a term
    without a graph (e.g. S-SD at the first step) gets NaN entries, which the epoch means skip.
    ``logits (B, C)``: the student's logits, for ``train_logit_row_std``. The graphs are retained (the
    step's own backward follows).
    """
    params = [p for p in params if p.requires_grad]
    flat = {}
    for name, value in parts.items():
        if not value.requires_grad:
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                for g, p in zip(grads, params)])
    nan = logits.new_full((), math.nan, dtype=torch.float32)
    out = {}
    g_bce = flat.get("bce")
    n_bce = g_bce.norm() if g_bce is not None else nan
    for name in parts:
        g = flat.get(name)
        out[f"gnorm_{name}"] = g.norm() if g is not None else nan
        if name == "bce":
            continue
        if g is None or g_bce is None:
            out[f"gcos_{name}"] = nan
        else:
            out[f"gcos_{name}"] = (g @ g_bce) / (g.norm() * n_bce).clamp(min=1e-30)
    out["train_logit_row_std"] = logits.detach().float().std(dim=1, unbiased=False).mean()
    return out


def opposing_terms(rows: Sequence[Mapping], epochs: int = OPPOSE_EPOCHS) -> list[str]:
    """Terms whose gradient opposed BCE's in each of the last ``epochs`` summary rows, as phrases
    (``"rsd (cos -0.50, 0.60x BCE's gradient)"``, the last row's numbers); ``[]`` with fewer rows."""
    if len(rows) < epochs:
        return []
    last = rows[-1]
    names = [k.removeprefix("gcos_") for k in last if k.startswith("gcos_")]
    found = []
    for name in names:
        ok = True
        for row in rows[-epochs:]:
            cos, gn, gb = row.get(f"gcos_{name}"), row.get(f"gnorm_{name}"), row.get("gnorm_bce")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (cos, gn, gb)) or gb <= 0:
                ok = False
                break
            if not (cos < OPPOSE_COS and gn >= OPPOSE_RATIO * gb):
                ok = False
                break
        if ok:
            found.append(f"{name} (cos {last[f'gcos_{name}']:+.2f}, {last[f'gnorm_{name}'] / last['gnorm_bce']:.2f}x "
                         "BCE's gradient)")
    return found
