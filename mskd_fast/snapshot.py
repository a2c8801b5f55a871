"""The S-SD teacher (SPEC 5): the student's parameters from one optimizer update earlier, kept as a snapshot.

S-SD distils the current batch's logits towards the same batch's logits under the parameters *before the last
update*. :class:`ParameterSnapshot` keeps those tensors for any training loop, without knowing the next batch:

* ``pending``: a copy of the live parameters and floating buffers, taken at the first call after an update;
* ``teacher``: the previous ``pending``, i.e. the tensors before the last update (what S-SD forwards through,
  ``torch.func.functional_call``); absent until the first update.

At each call (:meth:`ParameterSnapshot.teacher_state`) it checks whether the parameters were updated since
``pending`` was taken; if so ``teacher <- pending`` and ``pending <- copy of live`` (one copy per update, none
while gradients accumulate). An update is seen in two ways, both free of host syncs:

* a ``torch.optim`` optimizer holding these parameters ran ``step()`` (a global step pre-hook; fused optimizers do
  not bump tensor version counters). When the optimizer carries a device ``found_inf`` (``GradScaler`` with a
  fused optimizer, the trainer's non-finite skip) the step may have been skipped: the swap is then a device-side
  ``torch.where(updated, pending, teacher)``, so a skipped step leaves the teacher as it was;
* a parameter's version counter moved (in-place writes under ``no_grad``: a hand-written update,
  ``load_state_dict``). Writes through ``.data`` are invisible to both: update through an optimizer.

``GradScaler`` with a non-fused optimizer skips ``step()`` itself on inf/NaN: no hook, no swap. Memory: two copies
of the parameters and floating buffers. The first update decided on the device costs one host sync (whether the
teacher exists at all); later ones none.
"""

from __future__ import annotations

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
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.teacher: dict[str, torch.Tensor] | None = None
        self.pending: dict[str, torch.Tensor] | None = None
        self._updates: list = []  # since `pending` was taken: True (host) or a 0-dim device bool per step
        self._versions: tuple | None = None  # parameter versions when `pending` was taken (None: take them next)
        self._bind()
        self._hook = register_optimizer_step_pre_hook(functools.partial(_on_optimizer_step, weakref.ref(self)))

    def __del__(self):
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()

    # ------------------------------------------------------------------ tensors
    def _bind(self) -> None:
        self.params = dict(self.module.named_parameters())
        self.buffers = {k: b for k, b in self.module.named_buffers() if b.is_floating_point()}
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
            self._updates.append(True if found_inf is None else (found_inf == 0))

    def rebind(self) -> None:
        """The module's tensors were replaced (``Module.to``): re-read them and move the copies along."""
        self._bind()
        live = self.live()
        for copy in (self.teacher, self.pending):
            if copy is not None:
                for k, t in list(copy.items()):
                    if k in live and (t.device != live[k].device or t.dtype != live[k].dtype):
                        copy[k] = t.to(device=live[k].device, dtype=live[k].dtype)

    def _copy_live(self, into: dict | None) -> dict[str, torch.Tensor]:
        live = self.live()
        with torch.no_grad():
            if into is None:
                return {k: t.detach().clone() for k, t in live.items()}
            torch._foreach_copy_(list(into.values()), [live[k] for k in into])
        return into

    def refresh(self) -> None:
        """Apply the updates seen since ``pending`` was taken (see the module docstring); no-op without any."""
        if self._versions is None:  # fresh, or restored from a checkpoint: start from here
            self._versions = self._versions_now()
            self._updates = []
        if self.pending is None:
            self.pending = self._copy_live(None)
            self._versions = self._versions_now()
            self._updates = []
            return
        updates = self._updates
        if self._versions_now() != self._versions:
            updates = [True]
        if not updates:
            return
        flags = [u for u in updates if u is not True]
        if len(flags) < len(updates):
            updated = True
        else:
            updated = torch.stack(flags).any() if len(flags) > 1 else flags[0]
        if updated is True or self.teacher is None:
            if updated is not True and not bool(updated):  # first update decided on the device: one sync
                self.pending = self._copy_live(self.pending)
            else:
                self.teacher, self.pending = self.pending, self._copy_live(self.teacher)
        else:
            with torch.no_grad():
                for k, t in self.teacher.items():
                    torch.where(updated, self.pending[k], t, out=t)
            self.pending = self._copy_live(self.pending)
        self._versions = self._versions_now()
        self._updates = []

    def teacher_state(self) -> dict[str, torch.Tensor] | None:
        """Refresh, then the tensors before the last update (``None`` before the first update)."""
        self.refresh()
        return self.teacher

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"teacher.<name>": tensor, "pending.<name>": tensor}`` (detached, on their device).

        Pending updates are applied first (exactly what the next call would do); ``pending`` is then left out when
        it equals the live tensors (right after an update), so a checkpoint holds one copy in the common case.
        """
        had_updates = self.pending is not None and self._versions is not None and (
            bool(self._updates) or self._versions_now() != self._versions)
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
        for kind, copy in copies.items():
            if copy and set(copy) != set(live):
                missing = sorted(set(live) - set(copy))[:3]
                raise ValueError(f"S-SD snapshot state: {kind} lacks tensors of this model (e.g. {missing})")
        self.teacher = copies["teacher"] or None
        self.pending = copies["pending"] or None
        self._versions = None
        self._updates = []
