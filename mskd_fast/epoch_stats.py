"""Running sums of one training epoch (device tensors until read), and their plain-data form for checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mskd_fast.train_log import TERMS

__all__ = ["EpochStats"]


@dataclass
class EpochStats:
    """Running sums of one epoch (device tensors until read). Loss sums skip non-finite steps."""

    sums: dict = field(default_factory=dict)
    terms: tuple = TERMS  # the method's loss columns (train_log.terms_for)
    diag_keys: tuple = ()  # the diagnostics columns (mskd_fast.diagnostics), averaged over the steps that have them
    steps: int = 0
    skipped: int = 0  # unused; the device count is ``sums["skipped"]``
    samples: int = 0
    train_time: float = 0.0

    def add(self, out: dict) -> None:
        """Add one step's outputs (``TrainStep.__call__``); no host sync."""
        keep = out["skipped"] == 0
        for key in self.terms:  # where() gives a new tensor: no zeros_like and no clone of the first step's value
            value = torch.where(keep, out["total"] if key == "loss" else out[key], 0.0)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        for key in ("skipped", "clipped"):
            value = out[key]
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        for key in self.diag_keys:
            if key in out:
                ok = torch.isfinite(out[key])
                self._accumulate(key, torch.where(ok, out[key], 0.0))
                self._accumulate(f"n_{key}", ok.to(torch.int64))
        self.steps += 1

    def _accumulate(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def diag_means(self) -> dict[str, float]:
        """Epoch means of the diagnostics columns (NaN where no step measured them) and ``clip_frac`` (the
        share of steps with active gradient clipping); one host sync."""
        device = self.sums["skipped"].device
        zero = torch.zeros((), device=device)
        values = [torch.where(self.sums.get(f"n_{k}", zero) > 0,
                              self.sums.get(k, zero).double() / self.sums.get(f"n_{k}", zero).clamp(min=1),
                              torch.full((), math.nan, device=device, dtype=torch.float64)) for k in self.diag_keys]
        values.append(self.sums["clipped"].double() / max(1, self.steps))
        return dict(zip((*self.diag_keys, "clip_frac"), torch.stack(values).tolist()))

    def means(self) -> torch.Tensor:
        """Device float64 tensor: the ``terms`` means over the steps that counted (NaN if none), then the skip count."""
        skipped = self.sums["skipped"].double()
        counted = self.steps - skipped
        sums = torch.stack([self.sums[k].double() for k in self.terms])
        means = torch.where(counted > 0, sums / counted.clamp(min=1), torch.full_like(sums, math.nan))
        return torch.cat([means, skipped.view(1)])

    def state(self) -> dict:
        """Plain-data copy for a mid-epoch checkpoint (``epoch_acc``): sums as floats (one host sync)."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "terms": list(self.terms),
                "diag_keys": list(self.diag_keys), "steps": self.steps,
                "skipped": self.skipped, "samples": self.samples, "train_time": self.train_time}

    @classmethod
    def from_state(cls, state: dict, device, terms: tuple = TERMS) -> EpochStats:
        """Inverse of :meth:`state`: the sums become 0-dim tensors on ``device``."""
        return cls(sums={k: torch.tensor(v, device=device) for k, v in state["sums"].items()},
                   terms=tuple(state.get("terms", TERMS)), diag_keys=tuple(state.get("diag_keys", ())),
                   steps=state["steps"], skipped=state["skipped"], samples=state["samples"],
                   train_time=state["train_time"])
