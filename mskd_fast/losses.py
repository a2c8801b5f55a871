"""Loss modules: MBD, the L-SD relation loss and the full MSKD objective (SPEC 2-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._validation import check_float, check_rank, check_same_device, check_targets

__all__ = ["MBDLoss", "RelationLoss", "MSKDLoss"]


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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature, self.omega = temperature, omega
        self.gamma_pos, self.gamma_neg = gamma_pos, gamma_neg
        self.weight_grad, self.reduction, self.backend = weight_grad, reduction, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ops.mbd_loss(
            student, teacher, targets, temperature=self.temperature, omega=self.omega,
            gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, weight_grad=self.weight_grad,
            reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, omega={self.omega}, gamma_pos={self.gamma_pos}, "
            f"gamma_neg={self.gamma_neg}, weight_grad={self.weight_grad}, reduction={self.reduction!r}"
        )


class RelationLoss(nn.Module):
    """``nn.Module`` form of :func:`mskd_fast.ops.relation_loss`; ``forward(r, o)`` with ``(B, S, C)`` inputs."""

    def __init__(self, delta: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
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
    """

    def __init__(
        self,
        iota: float = 1.5,
        kappa: float = 2.0,
        lam: float = 2.0,
        temperature: float = 4.0,
        omega: float = 0.5,
        gamma_pos: float = 0.25,
        gamma_neg: float = 1.0,
        layers: int = 2,
        delta: float = 1.0,
        use_lsd: bool = True,
        use_rsd: bool = True,
        use_ssd: bool = True,
        use_mbd: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.iota, self.kappa, self.lam = iota, kappa, lam
        self.temperature, self.omega, self.gamma_pos, self.gamma_neg = temperature, omega, gamma_pos, gamma_neg
        self.layers, self.delta = layers, delta
        self.use_lsd, self.use_rsd, self.use_ssd, self.use_mbd = use_lsd, use_rsd, use_ssd, use_mbd
        self.backend = backend

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MBD (or plain KD when ``use_mbd=False``) of ``student (B, C)`` towards ``teacher (B, C)``."""
        if self.use_mbd:
            return ops.mbd_loss(
                student, teacher, targets, temperature=self.temperature, omega=self.omega,
                gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, backend=self.backend,
            )
        return ops.kd_loss(student, teacher, temperature=self.temperature)

    def forward(self, q, r, o, q_prev, targets):
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
        lsd = rsd = ssd = zero
        if self.use_lsd:
            lsd = ops.relation_loss(r, o, delta=self.delta, backend=self.backend)
            total = total + self.iota * lsd
        if self.use_rsd:
            z = ops.reconstruct_logits(o, q.detach(), targets, layers=self.layers, backend=self.backend)
            rsd = self.distill(q, z, targets)
            total = total + self.kappa * rsd
        if self.use_ssd and q_prev is not None:
            ssd = self.distill(q, q_prev.detach(), targets)
            total = total + self.lam * ssd
        terms = {name: t.detach().float() for name, t in (("bce", bce), ("lsd", lsd), ("rsd", rsd), ("ssd", ssd))}
        return total, terms
