"""``mskd_fast.MSKD``: MSKD (SPEC 3-6) as one object for any training loop.

::

    mskd = MSKD(model, recipe="stable")          # a timm model, an MSKDModel, or features/head (mskd_fast.student)
    for images, targets in loader:
        out = mskd(images, targets)               # {"loss", "logits", "bce", "lsd", "rsd", "ssd"} (terms detached)
        out["loss"].backward()
        optimizer.step(); optimizer.zero_grad()

Per call, on ``images (B,3,H,W)`` and multi-hot ``targets (B,C)``:

1. ``boxes (B,S,4)``: random-resized-crop boxes drawn with MSKD's own ``torch.Generator`` (seedable), or the four
   corner crops (the ``official`` recipe), :func:`mskd_fast.boxes.sample_boxes`;
2. ``P = crop_resize(images, boxes)`` and one no-grad forward of the *teacher* (the current parameters in eval
   behaviour, :func:`mskd_fast.models.eval_twin`: no BatchNorm statistic update; ``teacher_bn="batch"``: batch
   statistics, :func:`mskd_fast.models.batch_stat_twin`) gives the crop logits ``o (B,S,C)``;
3. S-SD's ``q_prev (B,C)``: the same images through the parameters before the last optimizer update, held by a
   copy of the teacher (:class:`mskd_fast.snapshot.ParameterSnapshot`; absent until the first update);
4. one student forward gives ``q (B,C)`` and the ROI-pooled crop logits ``r (B,S,C)`` from the same feature map;
5. :class:`mskd_fast.losses.MSKDLoss` ``(q, r, o, q_prev, targets)``.

AMP: call it inside ``torch.autocast`` (bf16; fp16 with a ``GradScaler`` as usual: a scaler-skipped step leaves the
S-SD teacher unchanged). DDP: ``mskd.prepare_distributed(device_ids=[rank])`` wraps the student (only it; the
teacher forwards are no-grad) and the loss then runs through the wrapper. ``torch.compile``: ``mskd.compile()``
compiles steps 2-5 (``fullgraph=True``; the first call of a run, without S-SD teacher, runs eagerly).
``state_dict()`` holds the S-SD snapshot and the box generator's state, what an exact resume needs besides the
model, optimizer and loader.

It is also the built-in trainer's method object for ``--method mskd`` (``mskd_fast.methods.base`` contract), and
:class:`VanillaBCE` (all three self-distillation terms off) for ``--method vanilla``.
"""

from __future__ import annotations

from itertools import chain

import torch
import torch.nn as nn

from mskd_fast._validation import check_choice, check_int
from mskd_fast.boxes import CROP_MODES, RANDOM_AREA, check_area, sample_boxes
from mskd_fast.losses import DEFAULT_RECIPE, RECIPES, MSKDLoss
from mskd_fast.methods.base import SelfDistillationMethod
from mskd_fast.models import batch_stat_twin, eval_twin
from mskd_fast.snapshot import ParameterSnapshot
from mskd_fast.student import as_student, classifier_parameters

__all__ = ["MSKD", "TEACHER_BN", "VanillaBCE"]

TEACHER_BN = ("eval", "batch")
LOSS_OPTIONS = ("iota", "kappa", "lam", "temperature", "omega", "gamma_pos", "gamma_neg", "layers", "delta", "use_mbd",
                "mbd_form", "rsd_teacher_scale", "lsd_terms", "rsd_teacher_reduce", "rsd_crop_temperature", "backend")


class MSKD(SelfDistillationMethod):
    """MSKD for one student; see the module docstring.

    Args:
        model: a timm model with a spatial feature map, an :class:`mskd_fast.models.MSKDModel` (possibly
            DDP-wrapped), or a module with ``features``/``head`` (:mod:`mskd_fast.student`).
        recipe: ``"stable"``, ``"paper"`` or ``"official"`` (:data:`mskd_fast.losses.RECIPES`); it sets the loss
            settings and the crop mode, each of which may be overridden.
        crops: ``S`` (``"corners"`` needs 4). crop_mode: ``"random"`` or ``"corners"`` (``None``: the recipe's).
        crop_area: random crops' area fraction range ``(lo, hi)``, ``0 < lo <= hi <= 1`` (SPEC 6: ``(0.2, 0.3)``;
            another range is a labelled departure).
        use_lsd, use_rsd, use_ssd: the three self-distillation terms (``None``: the recipe's ``terms``; ``False``
            for the ablations).
        teacher_bn: ``"eval"`` (SPEC 5: running statistics) or ``"batch"`` (batch statistics, for from-scratch
            runs); ``None``: the recipe's.
        roi_mode: ROI pooling of a timm/protocol model's regions, ``"max"`` (default) or ``"avg"``.
        channels_last: memory format of the crops (``None``: that of the images).
        generator: a ``torch.Generator`` on the images' device for the crop boxes; else one is made on the first
            call's device, seeded with ``seed`` (``None``: drawn from torch's global generator now).
        **loss_options: :class:`mskd_fast.losses.MSKDLoss` settings (``iota``, ``kappa``, ``lam``,
            ``temperature``, ``omega``, ``gamma_pos``, ``gamma_neg``, ``layers``, ``delta``, ``use_mbd``,
            ``mbd_form``, ``rsd_teacher_scale``, ``lsd_terms``, ``rsd_teacher_reduce``, ``rsd_crop_temperature``,
            ``backend``).
    """

    name = "mskd"
    title = "MSKD"
    terms = ("bce", "lsd", "rsd", "ssd")

    def __init__(self, model: nn.Module, recipe: str = DEFAULT_RECIPE, *, crops: int = 4, crop_mode: str | None = None,
                 crop_area: tuple[float, float] = RANDOM_AREA,
                 use_lsd: bool | None = None, use_rsd: bool | None = None, use_ssd: bool | None = None,
                 teacher_bn: str | None = None,
                 roi_mode: str | None = None, channels_last: bool | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None, **loss_options):
        unknown = sorted(set(loss_options) - set(LOSS_OPTIONS))
        if unknown:
            raise TypeError(f"MSKD got unexpected option(s) {unknown}; loss options are {', '.join(LOSS_OPTIONS)}")
        check_choice("recipe", recipe, tuple(RECIPES))
        super().__init__(as_student(model, roi_mode))
        crop_mode = RECIPES[recipe]["crop_mode"] if crop_mode is None else crop_mode
        check_int("crops", crops, 1)
        check_choice("crop_mode", crop_mode, CROP_MODES)
        if crop_mode == "corners" and crops != 4:
            raise ValueError(f"crop_mode 'corners' needs crops == 4, got {crops}")
        crop_area = check_area(crop_area)
        teacher_bn = RECIPES[recipe]["teacher_bn"] if teacher_bn is None else teacher_bn
        check_choice("teacher_bn", teacher_bn, TEACHER_BN)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be None or a bool, got {channels_last!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.loss_fn = MSKDLoss(recipe=recipe, use_lsd=use_lsd, use_rsd=use_rsd, use_ssd=use_ssd, **loss_options)
        self.recipe, self.crops, self.crop_mode, self.crop_area = recipe, crops, crop_mode, crop_area
        self.teacher_bn, self.channels_last = teacher_bn, channels_last
        self.generator = generator
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None and generator is None else seed
        self._generator_state = None
        self._tensor_ids = None
        object.__setattr__(self, "_teacher", None)  # not a sub-module: mskd.train() must not flip its mode
        self.snapshot = ParameterSnapshot(self.core, lambda: self._teacher) if self.loss_fn.use_ssd else None
        self._eager_call = False
        self.sd_scale: torch.Tensor | None = None  # set_sd_scale: a warm-up factor on the SD weights
        self._tie_teacher()

    # ------------------------------------------------------------------ settings
    @property
    def use_lsd(self) -> bool:
        return self.loss_fn.use_lsd

    @property
    def use_rsd(self) -> bool:
        return self.loss_fn.use_rsd

    @property
    def use_ssd(self) -> bool:
        return self.loss_fn.use_ssd

    @property
    def need_crops(self) -> bool:
        return self.loss_fn.use_lsd or self.loss_fn.use_rsd

    @property
    def diagnostic_terms(self) -> tuple[str, ...]:
        return self.loss_fn.diagnostic_terms

    @property
    def teacher(self) -> nn.Module:
        """The crop teacher: the student's current tensors in eval behaviour (rebuilt when they are replaced)."""
        self._tie_teacher()
        return self._teacher

    def classifier_parameters(self):
        return classifier_parameters(self.student)

    # ------------------------------------------------------------------ one call
    def _tie_teacher(self) -> None:
        """(Re)build the teacher twin when the student's tensors were replaced (e.g. ``model.to(device)``)."""
        core = self.core
        ids = tuple(id(t) for t in chain(core.parameters(), core.buffers()))
        if ids != self._tensor_ids:
            twin = batch_stat_twin(core) if self.teacher_bn == "batch" else eval_twin(core)
            object.__setattr__(self, "_teacher", twin)
            if self.snapshot is not None and self._tensor_ids is not None:
                self.snapshot.rebind()
            self._tensor_ids = ids

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
            if self._generator_state is not None:
                self.generator.set_state(self._generator_state)
                self._generator_state = None
        elif torch.device(self.generator.device).type != device.type:
            raise ValueError(f"generator is on {self.generator.device} but the images are on {device}")
        return self.generator

    def prepare(self, images, targets, sample_ids, epoch: int) -> dict:
        self._tie_teacher()
        boxes = None
        if self.need_crops:
            boxes = sample_boxes(images.shape[0], self.crops, images.shape[-2], images.shape[-1], self.crop_mode,
                                 self._generator(images.device), images.device, area=self.crop_area)
        ssd = self.snapshot is not None and self.snapshot.teacher_module() is not None
        self._eager_call = self.snapshot is not None and not ssd
        return {"images": images, "targets": targets, "boxes": boxes, "ssd": ssd, "sd_scale": self.sd_scale}

    def use_compiled(self) -> bool:
        return not self._eager_call  # the first call of a run (no S-SD teacher yet) runs eagerly: one graph

    def compute(self, images: torch.Tensor, targets: torch.Tensor, boxes: torch.Tensor | None = None,
                ssd: bool = False, sd_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Steps 2-5 of the module docstring (tensors only; compiled by :meth:`compile`). ``boxes (B,S,4)`` or
        ``None`` (no crops); ``ssd``: forward ``images`` through the S-SD snapshot (it must hold a teacher);
        ``sd_scale``: 0-dim factor on the three self-distillation weights (:meth:`set_sd_scale`) or ``None``."""
        from mskd_fast import ops

        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        o = q_prev = None
        if boxes is not None:
            channels_last = self.channels_last
            if channels_last is None:
                channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
            crops = ops.crop_resize(images, boxes, (height, width), channels_last=channels_last)
            with torch.no_grad():
                o = self._teacher(crops).view(batch, self.crops, -1)
        if ssd:
            with torch.no_grad():
                q_prev = self.snapshot.module(images)
        if boxes is not None:
            q, r = self.student(images, boxes)
        else:
            q, r = self.student(images), None
        scale = {} if sd_scale is None else {"sd_scale": sd_scale}
        total, terms, parts = self.loss_fn(q, r, o, q_prev, targets, return_parts=True, **scale)
        return self.terms_out(total, q, parts, **terms)

    def set_sd_scale(self, value: float | None) -> None:
        """Scale the self-distillation weights (iota, kappa, lambda) by ``value`` from the next call on (``None``:
        unscaled), e.g. a warm-up from 0. Kept in one 0-dim tensor updated in place (an input of the compiled
        region: a new value needs no recompilation and no host sync)."""
        if value is None:
            self.sd_scale = None
        elif self.sd_scale is None:
            self.sd_scale = torch.full((), float(value), device=next(self.core.parameters()).device)
        else:
            self.sd_scale.fill_(float(value))

    # ------------------------------------------------------------------ distributed
    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> MSKD:
        """Wrap the student (only it) in ``DistributedDataParallel``; returns ``self``."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if isinstance(self.student, DDP):
            raise RuntimeError("the student is already wrapped in DistributedDataParallel")
        object.__setattr__(self, "_student", DDP(self.core, device_ids=device_ids, **ddp_kwargs))
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """``{"generator": ByteTensor, "teacher.<name>", "pending.<name>": tensors}``: the box generator and the
        S-SD snapshot (:meth:`mskd_fast.snapshot.ParameterSnapshot.state_dict`). Tensors stay on their device."""
        state = {}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        elif self._generator_state is not None:
            state["generator"] = self._generator_state
        if self.snapshot is not None:
            state.update(self.snapshot.state_dict())
        return state

    def load_state_dict(self, state: dict, strict: bool = True):
        """Inverse of :meth:`state_dict` (load the model's weights too, before the next call)."""
        state = dict(state)
        generator = state.pop("generator", None)
        if generator is not None:
            generator = generator.cpu()
            if self.generator is not None:
                self.generator.set_state(generator)
            else:
                self._generator_state = generator
        if self.snapshot is not None:
            self.snapshot.load_state_dict(state)
        elif state and strict:
            raise ValueError(f"MSKD state: S-SD is off but the state holds {sorted(state)[:3]}")

    @property
    def ssd_state(self) -> str:
        """``"restored"`` when the S-SD snapshot holds tensors, else ``"absent"`` (for the run header)."""
        held = self.snapshot is not None and (self.snapshot.teacher is not None or self.snapshot.pending is not None)
        return "restored" if held else "absent"

    def extra_repr(self) -> str:
        on = ", ".join(n for n, flag in (("L-SD", self.use_lsd), ("R-SD", self.use_rsd), ("S-SD", self.use_ssd))
                       if flag) or "BCE only"
        area = f" (area {self.crop_area[0]:g}-{self.crop_area[1]:g})" if self.crop_mode == "random" else ""
        return (f"{on}; S={self.crops} {self.crop_mode} crops{area}, teacher BN {self.teacher_bn}; "
                f"loss {self.loss_fn.extra_repr()}")


class VanillaBCE(MSKD):
    """``--method vanilla``: BCE only (MSKD with L-SD, R-SD and S-SD off: no crops, no teacher, no snapshot)."""

    name = "vanilla"
    title = "vanilla BCE"

    def __init__(self, model: nn.Module, **options):
        super().__init__(model, use_lsd=False, use_rsd=False, use_ssd=False, **options)
