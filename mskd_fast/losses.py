"""Loss modules: MBD, the L-SD relation loss and the full MSKD objective (SPEC 2-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._validation import (
    BACKENDS,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_nonnegative,
    check_positive,
    check_rank,
    check_same_device,
    check_targets,
)
from .ops.mbd import check_mbd_args
from .reference import LSD_TERMS, MBD_FORMS

__all__ = ["DEFAULT_RECIPE", "MBDLoss", "RelationLoss", "MSKDLoss", "RECIPES", "resolve_recipe"]

# SPEC 6 recipes: every setting a recipe fixes. ``iota`` of ``stable`` is the value chosen by the accuracy
# study's validation rule (docs/ACCURACY.md). ``official`` reproduces the intent of the authors' public code
# (../shared/notes/official-code.md): corner crops, iota = kappa = lambda = 1, one propagation layer, L-SD's
# within-image term only, the R-SD teacher divided by S, the paper's MBD form. ``terms`` are the
# self-distillation terms a recipe switches on (``--no-lsd/--no-rsd/--no-ssd`` switch more off); ``crop_mode``
# and ``teacher_bn`` are settings of the MSKD object (crops, teacher forward), not of the loss.
_ALL_TERMS = ("lsd", "rsd", "ssd")
RECIPES = {
    "stable": {"mbd_form": "divergence", "rsd_teacher_scale": "match", "iota": 0.15, "kappa": 2.0, "lam": 2.0,
               "layers": 2, "lsd_terms": "both", "rsd_teacher_reduce": "sum", "crop_mode": "random",
               "terms": _ALL_TERMS, "teacher_bn": "eval"},
    "paper": {"mbd_form": "paper", "rsd_teacher_scale": "none", "iota": 1.5, "kappa": 2.0, "lam": 2.0,
              "layers": 2, "lsd_terms": "both", "rsd_teacher_reduce": "sum", "crop_mode": "random",
              "terms": _ALL_TERMS, "teacher_bn": "eval"},
    "official": {"mbd_form": "paper", "rsd_teacher_scale": "none", "iota": 1.0, "kappa": 1.0, "lam": 1.0,
                 "layers": 1, "lsd_terms": "patch", "rsd_teacher_reduce": "mean", "crop_mode": "corners",
                 "terms": _ALL_TERMS, "teacher_bn": "eval"},
    # The default, chosen by the real-object accuracy study's validation rule (docs/ACCURACY.md): S-SD alone, the
    # paper's MBD form, lambda = 0.1, a batch-statistics teacher. L-SD and R-SD are off (their settings unused).
    "step": {"mbd_form": "paper", "rsd_teacher_scale": "none", "iota": 1.5, "kappa": 2.0, "lam": 0.1,
             "layers": 2, "lsd_terms": "both", "rsd_teacher_reduce": "sum", "crop_mode": "random",
             "terms": ("ssd",), "teacher_bn": "batch"},
}
DEFAULT_RECIPE = "step"
_RSD_TEACHER_SCALES = ("match", "none")
RSD_TEACHER_REDUCE = ("sum", "mean")


def resolve_recipe(recipe: str, **overrides) -> dict:
    """The recipe's settings (the keys of ``RECIPES[recipe]``) with non-``None`` overrides applied.

    Raises ``ValueError`` for an unknown recipe or setting name.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(map(repr, RECIPES))}, got {recipe!r}")
    settings = dict(RECIPES[recipe])
    for key, value in overrides.items():
        if key not in settings:
            raise ValueError(f"unknown recipe setting {key!r}; expected one of {', '.join(settings)}")
        if value is not None:
            settings[key] = value
    return settings


class MBDLoss(nn.Module):
    """``nn.Module`` form of :func:`mskd_fast.ops.mbd_loss`; ``forward(student, teacher, targets)``."""

    def __init__(
        self,
        temperature: float = 4.0,
        omega: float = 0.5,
        gamma_pos: float = 0.25,
        gamma_neg: float = 1.0,
        weight_grad: bool = False,
        reduction: str = "mean",
        form: str = "divergence",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_mbd_args(temperature, omega, gamma_pos, gamma_neg, weight_grad, reduction, form)
        check_choice("backend", backend, BACKENDS)
        self.temperature, self.omega = temperature, omega
        self.gamma_pos, self.gamma_neg = gamma_pos, gamma_neg
        self.weight_grad, self.reduction, self.form, self.backend = weight_grad, reduction, form, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ops.mbd_loss(
            student, teacher, targets, temperature=self.temperature, omega=self.omega,
            gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, weight_grad=self.weight_grad,
            reduction=self.reduction, form=self.form, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, omega={self.omega}, gamma_pos={self.gamma_pos}, "
            f"gamma_neg={self.gamma_neg}, weight_grad={self.weight_grad}, reduction={self.reduction!r}, "
            f"form={self.form!r}"
        )


class RelationLoss(nn.Module):
    """``nn.Module`` form of :func:`mskd_fast.ops.relation_loss`; ``forward(r, o)`` with ``(B, S, C)`` inputs."""

    def __init__(self, delta: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        check_positive("delta", delta)
        check_choice("backend", backend, BACKENDS)
        self.delta, self.backend = delta, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return ops.relation_loss(student, teacher, delta=self.delta, backend=self.backend)


class MSKDLoss(nn.Module):
    """The MSKD objective (SPEC 6, paper eq. 17): ``BCE + iota*L_LSD + kappa*L_RSD + lambda*L_SSD``.

    ``forward(q, r, o, q_prev, targets)`` with ``q (B, C)`` student logits, ``r (B, S, C)`` the
    student's ROI-branch crop logits, ``o (B, S, C)`` the teacher's crop logits, ``q_prev (B, C)``
    the same batch under the previous step's parameters (``None`` at the first step: S-SD is 0)
    and ``targets (B, C)``. ``r``/``o`` may be ``None`` when both L-SD and R-SD are off.

    Returns ``(total, terms)``: ``total`` is differentiable; ``terms`` maps ``"bce"``, ``"lsd"``,
    ``"rsd"``, ``"ssd"`` to detached 0-dim tensors of the *unweighted* terms (0 when off).
    ``use_mbd=False`` replaces MBD by plain softmax KD in R-SD and S-SD (paper Table 3).

    ``recipe`` (SPEC 6, :data:`RECIPES`): ``"stable"`` (default: MBD ``form="divergence"``, R-SD teacher
    scale-matched to ``q``, ``iota=0.15``), ``"paper"`` (the equations as written: ``form="paper"``, no
    scale matching, ``iota=1.5``) or ``"official"`` (the authors' code's intent: ``iota=kappa=lam=1``,
    ``layers=1``, ``lsd_terms="patch"``, ``rsd_teacher_reduce="mean"``, paper form). Every setting left at
    ``None`` takes the recipe's value; given explicitly it overrides it. The resolved values are attributes.

    ``lsd_terms``: ``"both"`` or ``"patch"`` (L-SD's within-image term only). ``rsd_teacher_reduce``:
    ``"sum"`` (eq. 8) or ``"mean"`` (the reconstructed teacher divided by ``S``, as the authors' code).
    ``rsd_crop_temperature``: temperature of the softmax over crops in the reconstruction (1 = paper; a
    departure when not 1). ``use_lsd``/``use_rsd``/``use_ssd`` left at ``None`` follow the recipe's ``terms``.
    """

    def __init__(
        self,
        iota: float | None = None,
        kappa: float | None = None,
        lam: float | None = None,
        temperature: float = 4.0,
        omega: float = 0.5,
        gamma_pos: float = 0.25,
        gamma_neg: float = 1.0,
        layers: int | None = None,
        delta: float = 1.0,
        use_lsd: bool | None = None,
        use_rsd: bool | None = None,
        use_ssd: bool | None = None,
        use_mbd: bool = True,
        recipe: str = DEFAULT_RECIPE,
        mbd_form: str | None = None,
        rsd_teacher_scale: str | None = None,
        lsd_terms: str | None = None,
        rsd_teacher_reduce: str | None = None,
        rsd_crop_temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("recipe", recipe, tuple(RECIPES))
        settings = resolve_recipe(recipe, iota=iota, kappa=kappa, lam=lam, layers=layers, mbd_form=mbd_form,
                                  rsd_teacher_scale=rsd_teacher_scale, lsd_terms=lsd_terms,
                                  rsd_teacher_reduce=rsd_teacher_reduce)
        check_choice("mbd_form", settings["mbd_form"], MBD_FORMS)
        check_choice("rsd_teacher_scale", settings["rsd_teacher_scale"], _RSD_TEACHER_SCALES)
        check_choice("lsd_terms", settings["lsd_terms"], LSD_TERMS)
        check_choice("rsd_teacher_reduce", settings["rsd_teacher_reduce"], RSD_TEACHER_REDUCE)
        kappa, lam, layers = settings["kappa"], settings["lam"], settings["layers"]
        for name, weight in (("iota", settings["iota"]), ("kappa", kappa), ("lam", lam)):
            check_nonnegative(name, weight)
        check_positive("rsd_crop_temperature", rsd_crop_temperature)
        check_mbd_args(temperature, omega, gamma_pos, gamma_neg, False, "mean", settings["mbd_form"])
        check_int("layers", layers, 0)
        check_positive("delta", delta)
        on = settings["terms"]
        use_lsd, use_rsd, use_ssd = (("lsd" in on) if use_lsd is None else use_lsd,
                                     ("rsd" in on) if use_rsd is None else use_rsd,
                                     ("ssd" in on) if use_ssd is None else use_ssd)
        for name, flag in (("use_lsd", use_lsd), ("use_rsd", use_rsd), ("use_ssd", use_ssd), ("use_mbd", use_mbd)):
            check_bool(name, flag)
        check_choice("backend", backend, BACKENDS)
        self.recipe = recipe
        self.mbd_form, self.rsd_teacher_scale = settings["mbd_form"], settings["rsd_teacher_scale"]
        self.lsd_terms, self.rsd_teacher_reduce = settings["lsd_terms"], settings["rsd_teacher_reduce"]
        self.rsd_crop_temperature = rsd_crop_temperature
        self.iota, self.kappa, self.lam = settings["iota"], kappa, lam
        self.temperature, self.omega, self.gamma_pos, self.gamma_neg = temperature, omega, gamma_pos, gamma_neg
        self.layers, self.delta = layers, delta
        self.use_lsd, self.use_rsd, self.use_ssd, self.use_mbd = use_lsd, use_rsd, use_ssd, use_mbd
        self.backend = backend

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MBD (or plain KD when ``use_mbd=False``) of ``student (B, C)`` towards ``teacher (B, C)``."""
        if self.use_mbd:
            return ops.mbd_loss(
                student, teacher, targets, temperature=self.temperature, omega=self.omega,
                gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, form=self.mbd_form, backend=self.backend,
            )
        return ops.kd_loss(student, teacher, temperature=self.temperature)

    @property
    def diagnostic_terms(self) -> tuple[str, ...]:
        """The weighted terms ``forward(..., return_parts=True)`` returns: ``"bce"`` and each term switched on."""
        on = (("lsd", self.use_lsd), ("rsd", self.use_rsd), ("ssd", self.use_ssd))
        return ("bce", *(name for name, flag in on if flag))

    def forward(self, q, r, o, q_prev, targets, return_parts: bool = False, sd_scale=None):
        """``(total, terms)``; with ``return_parts`` also the weighted, differentiable terms (training
        diagnostics, :mod:`mskd_fast.diagnostics`): ``{"bce", "lsd": iota*L_LSD, ...}`` for the terms on.

        ``sd_scale`` (float or 0-dim tensor, ``None`` = 1): a factor on the three self-distillation weights,
        for a warm-up of self-distillation (the trainer's ``--sd-warmup-epochs``); ``terms`` stay unweighted.
        """
        check_float("q", q)
        check_rank("q", q, 2, "(B, C)")
        check_targets("targets", targets, "q", q)
        check_same_device(q=q, targets=targets, r=r, o=o, q_prev=q_prev)
        needs_crops = self.use_lsd or self.use_rsd
        if needs_crops and (r is None or o is None):
            raise ValueError("r and o (B, S, C) are required while L-SD or R-SD is on")
        targets_f = targets.to(q.dtype)
        zero = q.new_zeros(()).float()
        bce = F.binary_cross_entropy_with_logits(q, targets_f)
        total = bce
        parts = {"bce": bce}
        lsd = rsd = ssd = zero
        if self.use_lsd:
            lsd = ops.relation_loss(r, o, delta=self.delta, terms=self.lsd_terms, backend=self.backend)
            parts["lsd"] = self._weight(self.iota, sd_scale) * lsd
            total = total + parts["lsd"]
        if self.use_rsd:
            z = ops.reconstruct_logits(o, q.detach(), targets, layers=self.layers,
                                       crop_temperature=self.rsd_crop_temperature, backend=self.backend)
            if self.rsd_teacher_reduce == "mean":
                z = z / o.shape[1]
            if self.rsd_teacher_scale == "match":
                z = ops.match_logit_scale(z, q.detach())
            rsd = self.distill(q, z, targets)
            parts["rsd"] = self._weight(self.kappa, sd_scale) * rsd
            total = total + parts["rsd"]
        if self.use_ssd:
            parts["ssd"] = zero
            if q_prev is not None:
                ssd = self.distill(q, q_prev.detach(), targets)
                parts["ssd"] = self._weight(self.lam, sd_scale) * ssd
                total = total + parts["ssd"]
        terms = {name: t.detach().float() for name, t in (("bce", bce), ("lsd", lsd), ("rsd", rsd), ("ssd", ssd))}
        return (total, terms, parts) if return_parts else (total, terms)

    @staticmethod
    def _weight(weight: float, sd_scale):
        return weight if sd_scale is None else weight * sd_scale

    def extra_repr(self) -> str:
        return (
            f"recipe={self.recipe!r}, mbd_form={self.mbd_form!r}, rsd_teacher_scale={self.rsd_teacher_scale!r}, "
            f"iota={self.iota}, kappa={self.kappa}, lam={self.lam}, layers={self.layers}, "
            f"lsd_terms={self.lsd_terms!r}, rsd_teacher_reduce={self.rsd_teacher_reduce!r}, "
            f"rsd_crop_temperature={self.rsd_crop_temperature}, temperature={self.temperature}"
        )
