"""The training step of every method: the method object's forward and loss, then the update.

Per batch ``images (B,3,H,W)``, ``targets (B,C)``: the method object (:class:`mskd_fast.MSKD` for ``mskd``,
:class:`mskd_fast.mskd.VanillaBCE` for ``vanilla``, :mod:`mskd_fast.methods` for the comparison methods) returns
the loss and its terms (``method(images, targets, ...)`` under the step's autocast; compiled by the method when
asked); the step owns what follows: backward, gradient-norm clipping, the non-finite skip, the optimizer step, the
LR schedule, then the method's ``after_step``. MSKD's S-SD teacher is the method's own parameter snapshot
(:mod:`mskd_fast.snapshot`): the step needs no next batch and the snapshot follows a skipped update by itself.

**Non-finite steps without a host sync.** The loss and the gradient norm are checked on the device;
the flag is handed to the fused SGD kernel as ``found_inf`` (the mechanism ``GradScaler`` uses), which
then leaves parameters and momentum untouched. The student's train-mode forward has already updated
the BatchNorm running statistics by then (with NaN, for a bad batch, which would poison every later
teacher forward), so the floating-point buffers are snapshotted before the forward (one ``foreach``
copy; BN statistics are a few thousand numbers) and put back with ``torch.where`` when the step is
skipped. Counters stay on the device; the trainer reads them at its log interval. Momentum buffers
are created as zeros up front, which is exactly the first-step initialisation (``buf = grad``) but
keeps a skipped first step from leaving them uninitialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mskd_fast.boxes import CROP_MODES, sample_boxes
from mskd_fast.models import unwrap

__all__ = [
    "CROP_MODES",
    "StepConfig",
    "TrainStep",
    "build_optimizer",
    "build_scheduler",
    "sample_boxes",
]


@dataclass
class StepConfig:
    """The update's settings: gradient-norm clipping (``None``: off) and the autocast dtype (``None``: fp32)."""

    clip_grad: float | None = 10.0
    amp_dtype: torch.dtype | None = torch.bfloat16

    def __post_init__(self):
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad!r}")
        if self.amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {self.amp_dtype}")


def build_optimizer(
    model: nn.Module, lr: float, *, momentum: float = 0.9, weight_decay: float = 5e-4,
    backbone_lr_mult: float = 0.1, extra_params=None,
) -> torch.optim.SGD:
    """Fused SGD with two groups: the backbone at ``lr * backbone_lr_mult`` and the classifier at ``lr``.

    ``extra_params``: trainable parameters of a method object (an auxiliary or projection head), a third group
    ``"method"`` at ``lr``.

    Momentum buffers are created as zeros (see the module docstring). Weight decay applies to every
    parameter, as in the paper's recipe.
    """
    inner = unwrap(model)
    backbone = [p for p in inner.backbone.parameters() if p.requires_grad]
    head = [p for p in inner.fc.parameters() if p.requires_grad]
    groups = [
        {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"},
        {"params": head, "lr": lr, "name": "head"},
    ]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": lr, "name": "method"})
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    if momentum != 0:
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, sched: str, warmup_start: float = 0.01,
              min_factor: float = 0.0, step_every: int = 1, step_gamma: float = 0.1) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps.

    Linear warmup from ``warmup_start`` to 1 over ``warmup_steps``; then ``sched``: ``"cosine"`` anneals
    to ``min_factor`` at ``total_steps``; ``"step"`` multiplies by ``step_gamma`` every ``step_every``
    steps; ``"constant"`` stays at 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    if sched == "constant":
        return 1.0
    if sched == "step":
        return step_gamma ** ((step - warmup_steps) // max(1, step_every))
    if sched == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"sched must be 'cosine', 'step' or 'constant', got {sched!r}")


class _Factor:
    """Picklable LR lambda (a closure would not survive ``LambdaLR.state_dict``-free pickling)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.kwargs)


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int = 0, sched: str = "cosine",
                    step_every: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step ``LambdaLR`` implementing :func:`lr_factor` (its state is just the step count)."""
    lr_factor(0, total_steps=total_steps, warmup_steps=warmup_steps, sched=sched)  # validates sched
    fn = _Factor(total_steps=total_steps, warmup_steps=warmup_steps, sched=sched, step_every=step_every)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class TrainStep:
    """The training step of every method; call it once per batch.

    The method object owns the forward and the loss (the single dispatch point is :meth:`_method_forward`); the
    step keeps the update for all: clipping, the device-side non-finite skip with BN rollback (the method's
    sub-module statistics included), AMP/GradScaler, the scheduler, then the method's ``after_step`` (banks,
    queues, momentum encoders; told whether the update was skipped).

    Args:
        method: the method object (``method.student`` is the model being trained, possibly DDP-wrapped; its
            ``extra_parameters()`` must be in ``optimizer``).
        optimizer: SGD from :func:`build_optimizer` (fused, so non-finite steps skip on the device).
        scheduler: per-step LR scheduler (or ``None``).
        config: :class:`StepConfig` (``None``: its defaults).
        scaler: ``torch.amp.GradScaler`` for float16 AMP, else ``None``.
        compile: compile the method's tensor part (``method.compile``) with ``torch.compile``.
        fullgraph: compile with ``fullgraph=True`` (graph breaks become errors); DDP needs ``False``.
    """

    def __init__(self, method, optimizer, scheduler=None, config: StepConfig | None = None, *, scaler=None,
                 compile: bool = False, fullgraph: bool = True):
        from mskd_fast.methods.base import SelfDistillationMethod

        if not isinstance(method, SelfDistillationMethod):
            raise TypeError(f"method must be a method object (mskd_fast.MSKD, mskd_fast.methods), got "
                            f"{type(method).__name__}")
        config = StepConfig() if config is None else config
        self.method, self.model = method, method.student
        self.optimizer, self.scheduler, self.config = optimizer, scheduler, config
        self.scaler = scaler
        if scaler is not None and config.amp_dtype != torch.float16:
            raise ValueError("a GradScaler is only used with amp_dtype=float16")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        in_optimizer = {id(p) for p in self.params}
        if any(id(p) not in in_optimizer for p in method.extra_parameters()):
            raise ValueError(f"the {method.name} method's own parameters are not in the optimizer: "
                             "build_optimizer(..., extra_params=method.extra_parameters())")
        self.stat_buffers = [b for b in method.core.buffers() if b.is_floating_point()] + method.rollback_buffers()
        device = self.params[0].device
        self.device = device
        self.steps = 0
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_max_streak = torch.zeros((), dtype=torch.int64, device=device)
        if compile:
            method.compile(fullgraph=fullgraph)

    def set_sd_scale(self, value: float | None) -> None:
        """Scale MSKD's self-distillation weights by ``value`` from the next step on (``None``: unscaled); see
        :meth:`mskd_fast.MSKD.set_sd_scale` (the trainer's ``--sd-warmup-epochs``)."""
        if not hasattr(self.method, "set_sd_scale"):
            raise ValueError(f"method {self.method.name!r} has no self-distillation weights to scale")
        self.method.set_sd_scale(value)

    # ------------------------------------------------------------------ full step
    def __call__(self, images: torch.Tensor, targets: torch.Tensor, *, diagnose: bool = False,
                 sample_ids: torch.Tensor | None = None, epoch: int = 0) -> dict[str, torch.Tensor]:
        """Run one step on ``images (B,3,H,W)``, ``targets (B,C)``.

        ``sample_ids (B,)`` int64 and ``epoch`` (0-based) go to the method object. Returns device tensors:
        ``total``, the method's ``terms`` (``bce``, ``lsd``, ``rsd``, ``ssd`` for MSKD and vanilla),
        ``grad_norm``, ``clipped`` (1 when gradient clipping was active) and ``skipped`` (1 when the step was
        skipped as non-finite); with ``diagnose`` (this step runs eagerly) also the :mod:`mskd_fast.diagnostics`
        entries. No host synchronisation (but MSKD's first update, see :mod:`mskd_fast.snapshot`).
        """
        self.optimizer.zero_grad(set_to_none=True)
        saved_stats = torch._foreach_mul(self.stat_buffers, 1.0) if self.stat_buffers else []
        total, terms, diag = self._method_forward(images, targets, sample_ids, epoch, diagnose)
        loss_bad = ~torch.isfinite(total)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        grad_norm = self._clip()
        if self.scaler is not None:
            skipped = loss_bad
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            skipped = loss_bad | ~torch.isfinite(grad_norm)
            self.optimizer.found_inf = skipped.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        for buf, old in zip(self.stat_buffers, saved_stats):
            torch.where(skipped, old, buf, out=buf)
        self.method.after_step(skipped)
        if self.scheduler is not None:
            self.scheduler.step()
        skipped_i = skipped.to(torch.int64)
        self.nonfinite_total += skipped_i
        self.nonfinite_streak.mul_(skipped_i).add_(skipped_i)
        torch.maximum(self.nonfinite_max_streak, self.nonfinite_streak, out=self.nonfinite_max_streak)
        self.steps += 1
        out = dict(terms)
        out.update(diag)
        out["total"] = total.detach().float()
        out["grad_norm"] = grad_norm.detach().float()
        out["skipped"] = skipped_i
        clip = self.config.clip_grad
        out["clipped"] = ((grad_norm > clip) if clip is not None else torch.zeros_like(skipped)).to(torch.int64)
        return out

    def _method_forward(self, images, targets, sample_ids, epoch, diagnose=False):
        """The method object's forward under the step's autocast; ``(total, terms, diagnostics)``.

        ``diagnose``: an eager call, and :func:`mskd_fast.diagnostics.gradient_diagnostics` of the method's
        weighted loss parts on the classifier (``{}`` otherwise).
        """
        cfg = self.config
        amp = cfg.amp_dtype is not None
        with torch.autocast(images.device.type, dtype=cfg.amp_dtype or torch.bfloat16, enabled=amp):
            out = self.method(images, targets, sample_ids=sample_ids, epoch=epoch, eager=diagnose)
        terms = {name: out[name] for name in self.method.terms}
        diag = {}
        if diagnose:
            from mskd_fast.diagnostics import gradient_diagnostics

            diag = gradient_diagnostics(self.method.loss_parts(), self.method.classifier_parameters(),
                                        out["logits"])
        return out["loss"], terms, diag

    def _clip(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("no parameter received a gradient: is the model frozen?")
        if self.config.clip_grad is None:
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        return torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad, foreach=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The non-finite counters and the method object's state (CPU tensors; MSKD: its S-SD snapshot and box
        generator). ``"method"`` is shared by all processes; per-process state (``rank_state_dict``) is gathered
        by the trainer's checkpoint code."""
        return {
            "steps": self.steps,
            "nonfinite_total": self.nonfinite_total.cpu(),
            "nonfinite_streak": self.nonfinite_streak.cpu(),
            "nonfinite_max_streak": self.nonfinite_max_streak.cpu(),
            "method": {k: v.detach().cpu() for k, v in self.method.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> list[str]:
        """Inverse of :meth:`state_dict`; returns notes for the log (a checkpoint from before MSKD's snapshot)."""
        self.steps = int(state.get("steps", 0))
        for key in ("nonfinite_total", "nonfinite_streak", "nonfinite_max_streak"):
            if key in state:
                getattr(self, key).copy_(state[key])
        if "method" in state:
            self.method.load_state_dict(state["method"])
            return []
        if self.method.name in ("mskd", "vanilla"):  # written with the S-SD look-ahead (before the snapshot)
            return ["the checkpoint predates the S-SD parameter snapshot: the first step after resume runs "
                    "without S-SD (not bit-exact)"] if self.method.name == "mskd" else []
        raise ValueError(f"the checkpoint's step state has no {self.method.name} method state")
