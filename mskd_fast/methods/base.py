"""The base class of a training method object: it owns the forward and the loss, the loop owns the update.

A method object is built with the student (the trainer's ``MSKDModel``, possibly wrapped in DDP) and its
hyper-parameters. Per batch the loop calls::

    out = method(images, targets, sample_ids=ids, epoch=epoch)   # inside the loop's autocast
    out["loss"].backward(); clip; optimizer step (skipped on the device when non-finite)
    method.after_step(skipped)                                    # banks, queues, momentum encoders

``out`` holds ``"loss"`` (differentiable 0-dim), ``"logits"`` ``(B, C)`` (the student's logits of ``images``)
and one detached float 0-dim tensor per name in :attr:`SelfDistillationMethod.terms` (the first is always
``"bce"``: the plain BCE of those logits against ``targets``, the column the trainer's collapse guard reads).
:meth:`SelfDistillationMethod.loss_parts` gives the last call's loss as weighted, differentiable parts that sum
to ``"loss"`` (``"bce"`` first; names :attr:`diagnostic_terms`), for the trainer's gradient diagnostics.

A call is split in two: :meth:`prepare` (eager: random draws from the trainer's box generator, host-side
state such as the epoch) and :meth:`compute` (tensors only; compiled with ``torch.compile`` by
:meth:`compile`). ``compute`` may return extra entries whose names start with ``"_"``: the wrapper keeps
them for :meth:`after_step` (e.g. the predictions a bank stores) and does not return them.

State: everything a resume needs lives in the module's ``state_dict`` (buffers and sub-modules, identical on
every process under DDP) or in :meth:`rank_state_dict` (per process, e.g. DLB's stored half batch). The
student is *not* a sub-module (its weights are the checkpoint's ``model``). Trainable parameters of the method
(an auxiliary head, a projection head) go into the optimizer as one more group (:meth:`extra_parameters`);
under DDP their gradients are averaged over processes by hooks (:meth:`sync_gradients`), because they are
outside the DDP-wrapped student. Floating buffers of sub-modules (their BatchNorm statistics) are rolled back
with the student's when a step is skipped as non-finite (:meth:`rollback_buffers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mskd_fast._validation import check_float, check_rank, check_targets, check_tensor
from mskd_fast.models import unwrap

__all__ = ["MethodFlag", "SelfDistillationMethod", "bce_term", "distributed_world"]

_RANGES = {  # name -> (test, expected-text) of a flag's value
    "positive": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "nonnegative": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "unit": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "open_unit": (lambda v: 0 < v < 1, "in (0, 1)"),
    "above_half": (lambda v: 0.5 < v < 1, "in (0.5, 1)"),
    "count": (lambda v: v >= 1, "an int >= 1"),
}


@dataclass(frozen=True)
class MethodFlag:
    """One trainer flag of a method: ``--{option}`` (argparse dest with underscores) -> constructor ``kwarg``."""

    option: str
    kwarg: str
    type: type
    default: object
    help: str
    range: str = "nonnegative"

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")

    def check(self, value) -> None:
        """Raises ``ValueError`` naming the flag when ``value`` is outside its range."""
        test, expected = _RANGES[self.range]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise ValueError(f"{self.option} must be {expected}, got {value!r}")


def distributed_world() -> int:
    """Number of processes of the default process group (1 when torch.distributed is not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def bce_term(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the ``B*C`` entries (the project's BCE; targets cast to the logits' dtype)."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


class SelfDistillationMethod(nn.Module):
    """Base of the comparison methods (see the module docstring for the contract).

    Subclasses set :attr:`name` (the ``--method`` value), :attr:`terms` (names of the reported terms,
    ``"bce"`` first) and implement :meth:`compute`; they override :meth:`prepare`, :meth:`after_step`,
    :meth:`rank_state_dict` / :meth:`load_rank_state_dict` and :meth:`use_compiled` where they need to.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    terms: ClassVar[tuple[str, ...]] = ("bce",)
    needs_sample_ids: ClassVar[bool] = False
    diagnostic_terms: ClassVar[tuple[str, ...]] = ("bce",)  # names of loss_parts(), "bce" first
    flags: ClassVar[tuple[MethodFlag, ...]] = ()  # its trainer flags (defaults = the method's own)
    context: ClassVar[tuple[str, ...]] = ()  # run facts the trainer passes: num_samples, epochs, generator

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module) or not isinstance(getattr(unwrap(model), "num_classes", None), int):
            raise TypeError(f"model must be the trainer's MSKDModel (possibly DDP-wrapped), got {type(model).__name__}")
        object.__setattr__(self, "_student", model)  # not a sub-module: its weights are not the method's state
        self._compiled = None
        self._pending: dict | None = None
        self._grad_hooks: list = []

    # ------------------------------------------------------------------ the student
    @property
    def student(self) -> nn.Module:
        """The model the loop trains (DDP-wrapped under DDP: forward through it, so gradients are reduced)."""
        return self._student

    @property
    def core(self) -> nn.Module:
        """The unwrapped ``MSKDModel`` (for shapes, ``feature_info``, copies; never for the training forward)."""
        return unwrap(self._student)

    # ------------------------------------------------------------------ one call
    def forward(self, images: torch.Tensor, targets: torch.Tensor, *, sample_ids: torch.Tensor | None = None,
                epoch: int = 0, eager: bool = False) -> dict[str, torch.Tensor]:
        """``images (B,3,H,W)``, ``targets (B,C)`` 0/1, ``sample_ids (B,)`` int64 rows of the training set,
        ``epoch`` (0-based) -> ``{"loss", "logits", *terms}`` (see the module docstring). ``eager``: do not use
        the compiled :meth:`compute` for this call (the trainer's diagnostic steps)."""
        self.check_inputs(images, targets, sample_ids)
        inputs = self.prepare(images, targets, sample_ids, epoch)
        compiled = self._compiled is not None and self.use_compiled() and not eager
        fn = self._compiled if compiled else self.compute
        out = fn(**inputs)
        self._pending = {k: out.pop(k) for k in [k for k in out if k.startswith("_")]}
        return out

    def check_inputs(self, images, targets, sample_ids) -> None:
        """Shapes and dtypes (no host sync): a clear error naming the argument."""
        check_float("images", images)
        check_rank("images", images, 4, "(B, 3, H, W)")
        check_tensor("targets", targets)
        check_rank("targets", targets, 2, "(B, C)")
        if targets.shape[0] != images.shape[0] or targets.shape[1] != self.core.num_classes:
            raise ValueError(f"targets must have shape (B, C) = ({images.shape[0]}, {self.core.num_classes}), "
                             f"got {tuple(targets.shape)}")
        check_targets("targets", targets, "targets", targets)
        if self.needs_sample_ids:
            if sample_ids is None:
                raise ValueError(f"method {self.name!r} needs sample_ids (B,) int64 (rows of the training set)")
            check_tensor("sample_ids", sample_ids)
            if sample_ids.dtype != torch.int64 or sample_ids.shape != (images.shape[0],):
                raise ValueError(f"sample_ids must be an int64 tensor of shape ({images.shape[0]},), got "
                                 f"{sample_ids.dtype} {tuple(sample_ids.shape)}")

    @classmethod
    def check_args(cls, args) -> None:
        """Run-level checks of the trainer's flags for this method (e.g. a minimum batch size); ``ValueError``."""

    def prepare(self, images, targets, sample_ids, epoch: int) -> dict:
        """Eager part of a call: returns the keyword arguments of :meth:`compute`."""
        return {"images": images, "targets": targets}

    def compute(self, images: torch.Tensor, targets: torch.Tensor, **inputs) -> dict[str, torch.Tensor]:
        """Tensor part of a call (compilable): ``{"loss", "logits", *terms, "_private"...}``."""
        raise NotImplementedError

    def use_compiled(self) -> bool:
        """Whether this call may use the compiled :meth:`compute` (e.g. ``False`` on a differently shaped call)."""
        return True

    def compile(self, *, fullgraph: bool = True, backend: str = "inductor", mode: str | None = None) -> None:
        """Compile :meth:`compute` (``dynamic=False``; ``fullgraph`` makes a graph break an error)."""
        self._compiled = torch.compile(self.compute, fullgraph=fullgraph, dynamic=False, backend=backend, mode=mode)

    def after_step(self, skipped: torch.Tensor) -> None:
        """After the optimizer step; ``skipped`` is the device 0-dim flag (1: the update was skipped)."""
        self._pending = None

    def terms_out(self, loss: torch.Tensor, logits: torch.Tensor, parts: dict[str, torch.Tensor],
                  **terms: torch.Tensor) -> dict:
        """The output dict: ``loss``, ``logits``, each term detached as float32, and ``parts`` (the weighted,
        differentiable parts of ``loss``, kept for :meth:`loss_parts`)."""
        out = {"loss": loss, "logits": logits}
        out.update({k: v.detach().float() for k, v in terms.items()})
        out["_parts"] = parts
        return out

    def loss_parts(self) -> dict[str, torch.Tensor]:
        """The last call's loss as weighted, differentiable parts (names :attr:`diagnostic_terms`; they sum to
        the loss). Valid between a call and :meth:`after_step`."""
        if not self._pending or "_parts" not in self._pending:
            raise RuntimeError("loss_parts() is only available after a call and before after_step()")
        return self._pending["_parts"]

    # ------------------------------------------------------------------ parameters and state
    def classifier_parameters(self):
        """The student's final classifier parameters (where the training diagnostics take their gradients)."""
        return self.core.fc.parameters()

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the method itself (they join the optimizer; empty for most methods)."""
        return [p for p in self.parameters() if p.requires_grad]

    def rollback_buffers(self) -> list[torch.Tensor]:
        """Floating buffers of sub-modules (BatchNorm statistics), restored with the student's after a skip."""
        return [b for child in self.children() for b in child.buffers() if b.is_floating_point()]

    def rank_state_dict(self) -> dict:
        """Per-process state (CPU tensors / plain data) a resume needs; ``{}`` when there is none."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`rank_state_dict`."""

    def sync_gradients(self) -> None:
        """Under DDP, average the gradients of :meth:`extra_parameters` over processes (hooks; no-op alone)."""
        if distributed_world() == 1 or self._grad_hooks:
            return
        import torch.distributed as dist

        world = distributed_world()

        def average(param):
            dist.all_reduce(param.grad)
            param.grad.div_(world)

        self._grad_hooks = [p.register_post_accumulate_grad_hook(average) for p in self.extra_parameters()]

    def describe(self) -> str:
        """One line of settings for the run header."""
        return self.extra_repr()
