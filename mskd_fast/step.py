"""One MSKD training step (SPEC 5-6): crops, teacher forward, student forward, loss, update.

Per batch ``x (B,3,H,W)``, ``y (B,C)``:

1. draw ``boxes (B,S,4)`` on the device with the trainer's ``torch.Generator`` (``sample_boxes``);
2. ``P = crop_resize(x, boxes, (H,W))`` (image-major rows ``i*S+s``);
3. one no-grad forward of the *teacher* (the current parameters in eval behaviour, see
   ``mskd_fast.models.eval_twin``: no BN statistic update) on ``[P ; x_next]``: the first ``B*S`` rows
   give ``o (B,S,C)``, the last ``B`` rows give the S-SD logits of the *next* batch (look-ahead). With a
   batch-statistics teacher (``StepConfig.teacher_batch_stats``, the trainer's ``--teacher-bn batch``) the
   crops and ``x_next`` are two forwards, so that each is normalised with its own batch statistics
   (one forward would normalise ``q_prev`` with the statistics of ``B*S`` crops plus ``B`` images);
4. one student forward ``(q, r) = model(x, boxes)`` (``r`` by ``roi_pool`` on the same feature map);
5. ``MSKDLoss(q, r, o, q_prev, y)``; backward; gradient-norm clipping; optimizer step; LR schedule.

Steps 2-5's forward part is one function (``forward_loss``), compiled with ``torch.compile`` when asked
(``fullgraph=True`` outside DDP, so a graph break is an error). Box sampling stays outside it: dynamo
cannot trace a ``torch.Generator`` argument, and it is a handful of tiny ops.

**S-SD (SPEC 5) by look-ahead.** ``q_prev`` of batch ``t+1`` must be its logits under the parameters
of one optimizer step earlier, i.e. the parameters current at step ``t``. So at step ``t``, before the
optimizer step, the teacher forward also runs on batch ``t+1`` (the caller passes it in), and the result
is kept as ``q_prev`` for step ``t+1``. This costs one no-grad forward of ``B`` images per step, fused
into the crop forward, and no parameter copy. At the first step of a run S-SD is absent (term 0) and that
step runs eagerly (a second compiled graph for it would double compile time). After a skipped
(non-finite) step the parameters did not change, so ``q_prev`` is still "one optimizer step earlier".
``state_dict`` carries ``q_prev``: a checkpoint continues exactly as long as the same next batch comes
back on resume (the trainer checks a fingerprint, and drops ``q_prev`` with a message otherwise).

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

from mskd_fast.losses import MSKDLoss
from mskd_fast.models import unwrap

__all__ = [
    "CROP_MODES",
    "StepConfig",
    "TrainStep",
    "build_optimizer",
    "build_scheduler",
    "sample_boxes",
]

CROP_MODES = ("random", "corners")
RANDOM_AREA = (0.2, 0.3)
RANDOM_RATIO = (2.0 / 5.0, 5.0 / 3.0)
_CORNER_BOXES: dict[tuple, torch.Tensor] = {}  # (batch, H, W, device) -> (B, 4, 4) boxes, never written to


def sample_boxes(
    batch: int,
    crops: int,
    height: int,
    width: int,
    mode: str = "random",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Crop boxes ``(B,S,4)`` float32 ``(x1,y1,x2,y2)`` in continuous input-pixel coordinates (SPEC 6).

    ``mode="random"``: random-resized-crop boxes, area fraction ~ U(0.2, 0.3) of ``H*W``, aspect ratio
    ``w/h`` log-uniform in (2/5, 5/3), position uniform inside the image (a side longer than the image,
    possible only for very elongated inputs, is clipped to it). Drawn with ``generator`` on ``device``
    in one ``torch.rand`` call (no host sync). ``mode="corners"``: the four ``H/2 x W/2`` corner crops in
    the order top-left, top-right, bottom-left, bottom-right (needs ``S == 4``; no randomness); the same
    cached tensor is returned for the same shape and device, so it must not be modified in place.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    if batch < 1 or crops < 1 or height < 1 or width < 1:
        raise ValueError(f"batch, crops, height, width must be >= 1, got {(batch, crops, height, width)}")
    if mode == "corners":
        if crops != 4:
            raise ValueError(f"crop mode 'corners' needs exactly 4 crops, got {crops}")
        key = (batch, height, width, str(torch.device(device)))
        cached = _CORNER_BOXES.get(key)
        if cached is None:  # built on the host and uploaded once: a copy per step would block on CUDA
            h2, w2 = height / 2.0, width / 2.0
            corners = torch.tensor(
                [[0.0, 0.0, w2, h2], [w2, 0.0, width, h2], [0.0, h2, w2, height], [w2, h2, width, height]],
                dtype=torch.float32,
            )
            cached = _CORNER_BOXES[key] = corners.unsqueeze(0).expand(batch, 4, 4).contiguous().to(device)
        return cached
    u = torch.rand(batch, crops, 4, generator=generator, device=device, dtype=torch.float32)
    area = (RANDOM_AREA[0] + (RANDOM_AREA[1] - RANDOM_AREA[0]) * u[..., 0]) * (height * width)
    log_lo, log_hi = math.log(RANDOM_RATIO[0]), math.log(RANDOM_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(area * ratio).clamp(max=float(width))
    h = torch.sqrt(area / ratio).clamp(max=float(height))
    x1 = u[..., 2] * (width - w)
    y1 = u[..., 3] * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)


@dataclass
class StepConfig:
    """What one step computes. ``method="vanilla"`` = BCE only (no crops, no teacher, no look-ahead); any other
    name but ``"mskd"`` is a method object of :mod:`mskd_fast.methods` (passed to ``TrainStep(method=...)``)."""

    method: str = "mskd"
    crops: int = 4
    crop_mode: str = "random"
    use_lsd: bool = True
    use_rsd: bool = True
    use_ssd: bool = True
    clip_grad: float | None = 10.0
    amp_dtype: torch.dtype | None = torch.bfloat16
    channels_last: bool = True
    teacher_batch_stats: bool = False  # teacher BN uses batch statistics: crops and look-ahead forwarded apart

    def __post_init__(self):
        from mskd_fast.methods import METHODS

        if self.method not in ("mskd", "vanilla", *METHODS):
            raise ValueError(f"method must be one of {', '.join(('mskd', 'vanilla', *METHODS))}, got {self.method!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if not isinstance(self.crops, int) or self.crops < 1:
            raise ValueError(f"crops must be an int >= 1, got {self.crops!r}")
        if self.crop_mode == "corners" and self.crops != 4:
            raise ValueError(f"crop_mode 'corners' needs crops == 4, got {self.crops}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad!r}")
        if self.amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {self.amp_dtype}")
        if self.method != "mskd":
            self.use_lsd = self.use_rsd = self.use_ssd = False

    @property
    def need_crops(self) -> bool:
        return self.use_lsd or self.use_rsd


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

    ``mskd`` and ``vanilla`` run :meth:`forward_loss` here; every other method is a method object
    (:mod:`mskd_fast.methods`) that owns its forward and loss, called at the single dispatch point in
    :meth:`__call__`. The step keeps the update for all: clipping, the device-side non-finite skip with BN
    rollback (the method's sub-module statistics included), AMP/GradScaler, the scheduler, then the method's
    ``after_step`` hook (banks, queues, momentum encoders; told whether the update was skipped).

    Args:
        model: the student ``MSKDModel``, possibly wrapped in DDP; ``model(x, boxes) -> (q, r)``.
        teacher: ``eval_twin`` of the (unwrapped) student: same tensors, eval behaviour.
        loss_fn: ``MSKDLoss`` configured with the same switches as ``config`` (``None`` for a method object).
        optimizer: SGD from :func:`build_optimizer` (fused, so non-finite steps skip on the device).
        scheduler: per-step LR scheduler (or ``None``).
        config: :class:`StepConfig`.
        generator: ``torch.Generator`` on the training device, for the crop boxes.
        scaler: ``torch.amp.GradScaler`` for float16 AMP, else ``None``.
        compile: compile ``forward_loss`` (or the method object's ``compute``) with ``torch.compile``.
        fullgraph: compile with ``fullgraph=True`` (graph breaks become errors); DDP needs ``False``.
        method: the method object when ``config.method`` is neither ``mskd`` nor ``vanilla`` (its
            ``extra_parameters()`` must be in ``optimizer``); ``teacher`` and ``loss_fn`` are then unused.
    """

    def __init__(self, model, teacher, loss_fn: MSKDLoss | None, optimizer, scheduler, config: StepConfig,
                 generator: torch.Generator | None, *, scaler=None, compile: bool = False,
                 fullgraph: bool = True, method=None):
        self.model, self.teacher, self.loss_fn = model, teacher, loss_fn
        self.optimizer, self.scheduler, self.config = optimizer, scheduler, config
        self.generator, self.scaler = generator, scaler
        self.method = method
        if config.method in ("mskd", "vanilla"):
            if method is not None:
                raise ValueError(f"method {config.method!r} runs without a method object, got {type(method).__name__}")
            if not isinstance(loss_fn, MSKDLoss):
                raise TypeError(f"method {config.method!r} needs an MSKDLoss, got {type(loss_fn).__name__}")
        elif method is None or getattr(method, "name", None) != config.method:
            raise ValueError(f"method {config.method!r} needs its method object (mskd_fast.methods.build_method), "
                             f"got {type(method).__name__}")
        if config.method == "mskd" and (
            loss_fn.use_lsd != config.use_lsd or loss_fn.use_rsd != config.use_rsd
            or loss_fn.use_ssd != config.use_ssd
        ):
            raise ValueError("loss_fn switches (use_lsd/use_rsd/use_ssd) must match the StepConfig")
        if config.method == "vanilla" and (loss_fn.use_lsd or loss_fn.use_rsd or loss_fn.use_ssd):
            raise ValueError("vanilla training needs MSKDLoss(use_lsd=False, use_rsd=False, use_ssd=False)")
        if scaler is not None and config.amp_dtype != torch.float16:
            raise ValueError("a GradScaler is only used with amp_dtype=float16")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.stat_buffers = [b for b in unwrap(model).buffers() if b.is_floating_point()]
        if method is not None:
            in_optimizer = {id(p) for p in self.params}
            if any(id(p) not in in_optimizer for p in method.extra_parameters()):
                raise ValueError(f"the {config.method} method's own parameters are not in the optimizer: "
                                 "build_optimizer(..., extra_params=method.extra_parameters())")
            self.stat_buffers += method.rollback_buffers()
        device = self.params[0].device
        self.device = device
        self.q_prev: torch.Tensor | None = None
        self.steps = 0
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_max_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.sd_scale: torch.Tensor | None = None  # set_sd_scale: a warm-up factor on the SD weights (MSKD)
        self.compiled = None
        if compile and method is not None:
            method.compile(fullgraph=fullgraph)
        elif compile:
            self.compiled = torch.compile(self.forward_loss, fullgraph=fullgraph, dynamic=False)

    def set_sd_scale(self, value: float | None) -> None:
        """Scale MSKD's self-distillation weights by ``value`` from the next step on (``None``: unscaled).

        Kept in one 0-dim device tensor that is updated in place, so a compiled forward sees the new value
        without recompiling and nothing waits for the device.
        """
        if value is None:
            self.sd_scale = None
        elif self.sd_scale is None:
            self.sd_scale = torch.full((), float(value), device=self.device)
        else:
            self.sd_scale.fill_(float(value))

    # ------------------------------------------------------------------ forward region
    def forward_loss(self, images: torch.Tensor, targets: torch.Tensor, boxes: torch.Tensor | None,
                     next_images: torch.Tensor | None, q_prev: torch.Tensor | None, diagnose: bool = False,
                     sd_scale: torch.Tensor | None = None):
        """Forward part of the step; returns ``(total, terms, q_next)`` (and ``diagnostics`` when ``diagnose``).

        ``images (B,3,H,W)``, ``targets (B,C)``, ``boxes (B,S,4)`` or ``None`` (no crops), ``next_images
        (B',3,H,W)`` or ``None`` (no look-ahead), ``q_prev (B,C)`` or ``None``. ``q_next (B',C)``: teacher
        logits of ``next_images`` (float32, no grad), or ``None``. ``terms``: MSKDLoss terms (detached).
        ``diagnose``: also return :func:`mskd_fast.diagnostics.gradient_diagnostics` of the weighted terms on
        the classifier (eager only; a few head-only ``autograd.grad`` calls). ``sd_scale``: 0-dim factor on the
        self-distillation weights (``MSKDLoss``'s), or ``None``.
        """
        from mskd_fast import ops

        cfg = self.config
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        amp = cfg.amp_dtype is not None
        with torch.autocast(images.device.type, dtype=cfg.amp_dtype or torch.bfloat16, enabled=amp):
            teacher_in = []
            if boxes is not None:
                teacher_in.append(
                    ops.crop_resize(images, boxes, (height, width), channels_last=cfg.channels_last)
                )
            if next_images is not None:
                teacher_in.append(next_images)
            o = q_next = None
            if teacher_in:
                with torch.no_grad():
                    if cfg.teacher_batch_stats or len(teacher_in) == 1:
                        # a batch-statistics teacher normalises each part with its own statistics
                        parts = [self.teacher(t) for t in teacher_in]
                    else:
                        stacked = self.teacher(torch.cat(teacher_in, dim=0))
                        parts = list(stacked.split([t.shape[0] for t in teacher_in], dim=0))
                if boxes is not None:
                    o = parts[0].view(batch, cfg.crops, -1)
                if next_images is not None:
                    q_next = parts[-1]
            if boxes is not None:
                q, r = self.model(images, boxes)
            else:
                q, r = self.model(images), None
            scale = {} if sd_scale is None else {"sd_scale": sd_scale}
            if not diagnose:
                total, terms = self.loss_fn(q, r, o, q_prev, targets, **scale)
                return total, terms, q_next
            total, terms, parts = self.loss_fn(q, r, o, q_prev, targets, return_parts=True, **scale)
        from mskd_fast.diagnostics import gradient_diagnostics

        diag = gradient_diagnostics(parts, unwrap(self.model).fc.parameters(), q)
        return total, terms, q_next, diag

    # ------------------------------------------------------------------ full step
    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 next_images: torch.Tensor | None = None, diagnose: bool = False, *,
                 sample_ids: torch.Tensor | None = None, epoch: int = 0) -> dict[str, torch.Tensor]:
        """Run one step on ``images (B,3,H,W)``, ``targets (B,C)``.

        ``next_images``: the batch the next call will get (S-SD look-ahead; MSKD only); ``None`` at the last
        step of training (the current batch is forwarded instead, to keep compiled shapes static, and the result
        dropped). ``sample_ids (B,)`` int64 and ``epoch`` (0-based) go to a method object. Returns device
        tensors: ``total``, the loss terms (``bce``, ``lsd``, ``rsd``, ``ssd`` for MSKD/vanilla; the method's
        ``terms`` otherwise), ``grad_norm``, ``clipped`` (1 when gradient clipping was active) and ``skipped``
        (1 when the step was skipped as non-finite); with ``diagnose`` (this step runs eagerly) also the
        :mod:`mskd_fast.diagnostics` entries. No host synchronisation.
        """
        cfg = self.config
        batch = images.shape[0]
        boxes = None
        if cfg.need_crops:
            boxes = sample_boxes(batch, cfg.crops, images.shape[-2], images.shape[-1], cfg.crop_mode,
                                 self.generator, images.device)
        q_prev = self.q_prev if cfg.use_ssd else None
        look_ahead = None
        if cfg.use_ssd:
            # no next batch (last step): forward a copy of this one to keep the compiled shapes (a copy, not
            # the same tensor, which would be a duplicate input and recompile); the result is dropped
            look_ahead = next_images if next_images is not None else images.clone()
        fn = self.compiled
        if fn is None or (cfg.use_ssd and q_prev is None):
            fn = self.forward_loss
        self.optimizer.zero_grad(set_to_none=True)
        saved_stats = torch._foreach_mul(self.stat_buffers, 1.0) if self.stat_buffers else []
        diag = {}
        if self.method is not None:  # the one dispatch point: every method but mskd/vanilla owns its forward
            total, terms, q_next, diag = self._method_forward(images, targets, sample_ids, epoch, diagnose)
        elif diagnose:
            total, terms, q_next, diag = self.forward_loss(images, targets, boxes, look_ahead, q_prev, diagnose=True,
                                                           sd_scale=self.sd_scale)
        else:
            total, terms, q_next = fn(images, targets, boxes, look_ahead, q_prev, sd_scale=self.sd_scale)
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
        if self.method is not None:
            self.method.after_step(skipped)
        if self.scheduler is not None:
            self.scheduler.step()
        skipped_i = skipped.to(torch.int64)
        self.nonfinite_total += skipped_i
        self.nonfinite_streak.mul_(skipped_i).add_(skipped_i)
        torch.maximum(self.nonfinite_max_streak, self.nonfinite_streak, out=self.nonfinite_max_streak)
        self.q_prev = q_next.detach() if (q_next is not None and next_images is not None) else None
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
        """The method object's forward under the step's autocast; ``(total, terms, None, diagnostics)``.

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

            diag = gradient_diagnostics(self.method.loss_parts(), unwrap(self.model).fc.parameters(), out["logits"])
        return out["loss"], terms, None, diag

    def _clip(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("no parameter received a gradient: is the model frozen?")
        if self.config.clip_grad is None:
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        return torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad, foreach=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """S-SD look-ahead logits, the non-finite counters and a method object's state (CPU tensors).

        ``"method"``: the method object's ``state_dict`` (shared by all processes); its per-process state
        (``rank_state_dict``) is gathered by the trainer's checkpoint code.
        """
        state = {
            "q_prev": None if self.q_prev is None else self.q_prev.detach().cpu(),
            "steps": self.steps,
            "nonfinite_total": self.nonfinite_total.cpu(),
            "nonfinite_streak": self.nonfinite_streak.cpu(),
            "nonfinite_max_streak": self.nonfinite_max_streak.cpu(),
        }
        if self.method is not None:
            state["method"] = {k: v.detach().cpu() for k, v in self.method.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        q_prev = state.get("q_prev")
        self.q_prev = None if q_prev is None else q_prev.to(self.device)
        self.steps = int(state.get("steps", 0))
        for key in ("nonfinite_total", "nonfinite_streak", "nonfinite_max_streak"):
            if key in state:
                getattr(self, key).copy_(state[key])
        if self.method is not None:
            if "method" not in state:
                raise ValueError(f"the checkpoint's step state has no {self.config.method} method state")
            self.method.load_state_dict(state["method"])

    def drop_q_prev(self) -> None:
        """Forget the look-ahead logits (the next step runs without S-SD)."""
        self.q_prev = None
