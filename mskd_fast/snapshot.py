"""The S-SD teacher (SPEC 5): the student's parameters from one optimizer update earlier, kept as a snapshot.

S-SD distils the current batch's logits towards the same batch's logits under the parameters *before the last
update*. :class:`ParameterSnapshot` keeps those tensors for any training loop, without knowing the next batch:

* ``pending``: a copy of the live parameters and floating buffers, taken at the first call after an update;
* ``teacher``: the previous ``pending``, i.e. the tensors before the last update, held by ``module`` (a copy of
  the teacher twin whose tensors are these), which S-SD forwards through; absent until the first update.

At each call (:meth:`ParameterSnapshot.refresh`) it checks whether the parameters were updated since ``pending`` was
taken; if so the two swap storages (``Tensor.data``, no copy) and ``pending`` takes a copy of the live tensors: one
copy per update, none while gradients accumulate. An update is seen in two ways, neither needing a host sync:

* a ``torch.optim`` optimizer holding these parameters ran ``step()`` (a global step pre-hook; fused optimizers do
  not bump tensor version counters). When the optimizer carries a ``found_inf`` tensor (``GradScaler`` with a
  fused optimizer, the trainer's non-finite skip) the step may have been skipped: on an accelerator the swap is
  then a device-side ``torch.where(updated, pending, teacher)``, so a skipped step leaves the teacher as it was
  (on the CPU the flag is read, which costs nothing);
* a parameter's version counter moved (in-place writes under ``no_grad``: a hand-written update,
  ``load_state_dict``). Writes through ``.data`` are invisible to both: update through an optimizer.

``GradScaler`` with a non-fused optimizer skips ``step()`` itself on inf/NaN: no hook, no swap. Memory: two copies
of the parameters and floating buffers. The first update decided on an accelerator costs one host sync (whether
the teacher exists at all); later ones none.
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["ParameterSnapshot"]


def _on_optimizer_step(ref, optimizer, args, kwargs):
    snapshot = ref()
    if snapshot is not None:
        snapshot._saw_step(optimizer)


class ParameterSnapshot:
    """Snapshot of ``module``'s parameters and floating buffers from one optimizer update earlier.

    Args:
        module: the (unwrapped) student; its ``named_parameters()`` and floating ``named_buffers()`` are copied.
        teacher_like: returns the module the snapshot forwards through (e.g. the eval twin of ``module``; same
            tensor names); it is deep-copied once and its tensors then point at the snapshot's storage.
    """

    def __init__(self, module: nn.Module, teacher_like=None):
        self.source = module
        self.teacher_like = teacher_like or (lambda: module)
        self.module: nn.Module | None = None
        self.teacher: dict[str, torch.Tensor] | None = None  # the tensors of `module`
        self.pending: dict[str, torch.Tensor] | None = None
        self._updated = None  # since `pending` was taken: None (no step), True, or a 0-dim device bool
        self._versions: tuple | None = None  # parameter versions when `pending` was taken (None: take them next)
        # skipped-step flags on the CPU are read on the host (free); True takes the accelerator's device-side
        # torch.where path there too (its CPU twin, for tests)
        self.device_side_on_cpu = False
        self._bind()
        self._hook = register_optimizer_step_pre_hook(functools.partial(_on_optimizer_step, weakref.ref(self)))

    def __del__(self):
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()

    # ------------------------------------------------------------------ tensors
    def _bind(self) -> None:
        self.params = dict(self.source.named_parameters())
        self.buffers = {k: b for k, b in self.source.named_buffers() if b.is_floating_point()}
        self._param_ids = frozenset(id(p) for p in self.params.values())
        self._known: dict[tuple, bool] = {}  # (id(optimizer), its parameter count) -> holds one of ours

    def live(self) -> dict[str, torch.Tensor]:
        return {**self.params, **self.buffers}

    def _versions_now(self) -> tuple:
        return tuple(p._version for p in self.params.values())

    def nbytes(self) -> int:
        """Bytes of one copy (the snapshot holds two)."""
        return sum(t.numel() * t.element_size() for t in self.live().values())

    # ------------------------------------------------------------------ updates
    def _saw_step(self, optimizer) -> None:
        key = (id(optimizer), sum(len(g["params"]) for g in optimizer.param_groups))
        holds = self._known.get(key)
        if holds is None:
            holds = any(id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"])
            self._known[key] = holds
        if holds and self.pending is not None:
            found_inf = getattr(optimizer, "found_inf", None)
            flag = True if found_inf is None else (found_inf == 0)
            if self._updated is None or flag is True:
                self._updated = flag
            elif self._updated is not True:  # several possibly skipped steps: any of them updated
                self._updated = torch.logical_or(self._updated, flag)

    def rebind(self) -> None:
        """The module's tensors were replaced (``Module.to``): re-read them and move the copies along."""
        self._bind()
        live = self.live()
        for held in (self.teacher, self.pending):
            for k, t in (held or {}).items():
                if t.device != live[k].device or t.dtype != live[k].dtype:
                    if held is self.teacher:
                        t.data = t.data.to(device=live[k].device, dtype=live[k].dtype)
                    else:
                        held[k] = t.to(device=live[k].device, dtype=live[k].dtype)

    def _copy_live(self, into: dict | None) -> dict[str, torch.Tensor]:
        live = self.live()
        with torch.no_grad():
            if into is None:
                return {k: t.detach().clone() for k, t in live.items()}
            torch._foreach_copy_(list(into.values()), [live[k] for k in into])
        return into

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make ``tensors`` the teacher: ``module``'s tensors point at their storage (built on first use)."""
        if self.module is None:
            self.module = copy.deepcopy(self.teacher_like())
            named = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
            self.module.requires_grad_(False)
            self.teacher = {k: named[k] for k in self.live()}
        for k, t in self.teacher.items():
            t.data = tensors[k]

    def _swap(self) -> None:
        """``teacher <- pending`` and ``pending <- copy of live``, reusing the old teacher's storage."""
        if self.teacher is None:
            self._install(self.pending)
            self.pending = self._copy_live(None)
            return
        for k, t in self.teacher.items():
            old = t.data
            t.data = self.pending[k]
            self.pending[k] = old
        self._copy_live(self.pending)

    def refresh(self) -> None:
        """Apply the updates seen since ``pending`` was taken (see the module docstring); no-op without any."""
        if self._versions is None:  # fresh, or restored from a checkpoint: start from here
            self._versions = self._versions_now()
            self._updated = None
        if self.pending is None:
            self.pending = self._copy_live(None)
            self._versions = self._versions_now()
            self._updated = None
            return
        updated = True if self._versions_now() != self._versions else self._updated
        if updated is None:
            return
        on_host = updated is not True and updated.device.type == "cpu" and not self.device_side_on_cpu
        if updated is not True and (on_host or self.teacher is None):
            updated = bool(updated)  # free on the CPU; on a GPU once per run (whether a teacher exists at all)
        if updated is True:
            self._swap()
        elif updated is False:
            self._copy_live(self.pending)
        else:
            with torch.no_grad():
                for k, t in self.teacher.items():
                    torch.where(updated, self.pending[k], t, out=t)
            self._copy_live(self.pending)
        self._versions = self._versions_now()
        self._updated = None

    def teacher_module(self) -> nn.Module | None:
        """Refresh, then the module holding the tensors before the last update (``None`` before the first one)."""
        self.refresh()
        return self.module if self.teacher is not None else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"teacher.<name>": tensor, "pending.<name>": tensor}`` (detached, on their device).

        Pending updates are applied first (exactly what the next call would do); ``pending`` is then left out when
        it equals the live tensors (right after an update), so a checkpoint holds one copy in the common case.
        """
        had_updates = self.pending is not None and self._versions is not None and (
            self._updated is not None or self._versions_now() != self._versions)
        if self.pending is not None:
            self.refresh()
        state = {}
        if self.teacher is not None:
            state.update({f"teacher.{k}": t.detach() for k, t in self.teacher.items()})
        if self.pending is not None and not had_updates:
            state.update({f"pending.{k}": t.detach() for k, t in self.pending.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`; the model's own weights may be loaded before or after (not in between
        two training calls)."""
        live = self.live()
        copies = {"teacher": {}, "pending": {}}
        for key, value in state.items():
            kind, _, name = key.partition(".")
            if kind not in copies or name not in live:
                raise ValueError(f"S-SD snapshot state: unexpected entry {key!r} (not a tensor of this model)")
            copies[kind][name] = value.to(device=live[name].device, dtype=live[name].dtype).clone()
        for kind, held in copies.items():
            if held and set(held) != set(live):
                missing = sorted(set(live) - set(held))[:3]
                raise ValueError(f"S-SD snapshot state: {kind} lacks tensors of this model (e.g. {missing})")
        if copies["teacher"]:
            self._install(copies["teacher"])
        elif self.teacher is not None:  # a state without teacher: back to "no update yet"
            self.module = self.teacher = None
        self.pending = copies["pending"] or None
        self._versions = None
        self._updated = None
