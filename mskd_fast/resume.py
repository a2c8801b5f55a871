"""What a training checkpoint holds, and how a run comes back from one (``--resume PATH``).

:func:`checkpoint_state` builds the checkpoint dict of a :class:`mskd_fast.train.Trainer` (a collective
under DDP: every rank's RNG states and the method's per-process state are gathered to rank 0);
:func:`restore_state` is its inverse. :func:`merge_resume_args` decides which flags a resume may change:

* ``RESUME_OVERRIDABLE``: how the run is executed (epochs, intervals, loader, device, paths): taken from
  the command line when given;
* ``RESUME_ADJUSTABLE``: settings of the run itself that a restart after a failure may need to change
  (``--lr``, ``--clip-grad``, as the non-finite stop message suggests): taken from the command line,
  recorded in the checkpoint's ``resumes`` list, ``args.yaml`` and the log;
* every other flag must equal the checkpoint's.

A resume resets the non-finite *streak* (the run stopped because of it; the restart gets a fresh
``NONFINITE_LIMIT``) and keeps the total count.
"""

from __future__ import annotations

import argparse

from mskd_fast.checkpoint import FORMAT, capture_rng, restore_rng
from mskd_fast.distributed import all_gather_objects
from mskd_fast.epoch_stats import EpochStats

__all__ = [
    "RESUME_ADJUSTABLE",
    "RESUME_OVERRIDABLE",
    "apply_lr",
    "checkpoint_state",
    "merge_resume_args",
    "restore_state",
]

RESUME_OVERRIDABLE = {
    "epochs", "log_interval", "eval_interval", "workers", "loader", "device", "no_progress", "data_dir",
    "synthetic_cache", "output", "experiment", "resume", "on_bad_image", "dist_timeout", "stop_on_collapse",
}
RESUME_ADJUSTABLE = {"lr", "clip_grad"}


class ResumeError(ValueError):
    """A checkpoint that cannot continue with these flags/data."""


def merge_resume_args(args: argparse.Namespace, explicit: set[str], blob: dict):
    """The checkpoint's flags with this command line's overridable/adjustable ones applied.

    Returns ``(merged, changes)``: ``changes`` maps each adjustable flag given with a new value to
    ``(old, new)``. Raises :class:`ResumeError` naming every other flag that differs from the checkpoint.
    """
    saved = blob["args"]
    conflicts = []
    for key in sorted(explicit):
        if key in RESUME_OVERRIDABLE or key in RESUME_ADJUSTABLE or key not in saved:
            continue
        if getattr(args, key) != saved[key]:
            conflicts.append(f"--{key.replace('_', '-')} {getattr(args, key)!r} (checkpoint: {saved[key]!r})")
    if conflicts:
        may = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUME_OVERRIDABLE | RESUME_ADJUSTABLE))
        raise ResumeError("--resume continues the checkpoint's run with its settings; these flags differ: "
                          + "; ".join(conflicts) + f" (only {may} may change)")
    merged = argparse.Namespace(**saved)
    if "recipe" not in saved:  # written before the recipes existed: those runs used the paper's equations
        merged.recipe, merged.mbd_form, merged.rsd_teacher_scale = "paper", "paper", "none"
    if "sd_warmup_epochs" not in saved:
        merged.sd_warmup_epochs = 0.0
    if "lsd_terms" not in saved:  # written before the official recipe: SPEC 3/4 as they were then
        merged.lsd_terms, merged.rsd_teacher_reduce, merged.rsd_crop_temperature = "both", "sum", 1.0
    for key in RESUME_OVERRIDABLE:
        if key in explicit or key == "resume":
            setattr(merged, key, getattr(args, key))
    changes = {}
    for key in sorted(RESUME_ADJUSTABLE & explicit):
        new, old = getattr(args, key), saved.get(key)
        if new != old:
            changes[key] = (old, new)
            setattr(merged, key, new)
    for key, value in vars(args).items():  # flags added after the checkpoint was written
        if not hasattr(merged, key):
            setattr(merged, key, value)
    return merged, changes


def apply_lr(optimizer, scheduler, lr: float, backbone_mult: float) -> None:
    """Re-base a restored optimizer/``LambdaLR`` on a new head LR (backbone: ``lr * backbone_mult``).

    The schedule's position is kept: each group's LR becomes its new base LR times the schedule factor
    at the current step.
    """
    bases = [lr * backbone_mult if g.get("name") == "backbone" else lr for g in optimizer.param_groups]
    scheduler.base_lrs = list(bases)
    for group, base, fn in zip(optimizer.param_groups, bases, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def checkpoint_state(trainer, kind: str) -> dict | None:
    """Gather per-rank state (collective under DDP) and build the checkpoint dict on rank 0 (else ``None``).

    The method object's shared state (MSKD: its S-SD snapshot and box generator) is rank 0's, in
    ``step_state["method"]``; its per-process state (``rank_state_dict``) is gathered from every rank.
    """
    from mskd_fast.models import unwrap

    t = trainer
    step_state = t.step.state_dict()
    local = {"rng": capture_rng(t.box_generator), "method": t.step.method.rank_state_dict()}
    gathered = all_gather_objects(t.ctx, local)
    if not t.ctx.is_main:
        return None
    step_state["method_per_rank"] = [g["method"] for g in gathered]
    a = t.args
    return {
        "format": FORMAT,
        "kind": kind,
        "run_id": t.run_id,
        "args": {k: v for k, v in vars(a).items()},
        "meta": {"model_name": a.model, "num_classes": t.num_classes,
                 "class_names": list(t.train_index.class_names), "img_size": a.img_size,
                 "roi_mode": a.roi_mode, "model_kwargs": dict(a.model_kwargs), "dataset": a.dataset,
                 "method": a.method},
        "model": unwrap(t.model).state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": None if t.scaler is None else t.scaler.state_dict(),
        "step_state": step_state,
        "rng": [g["rng"] for g in gathered],
        "epoch": t.epoch,
        "step_in_epoch": t.step_in_epoch,
        "global_step": t.global_step,
        "epoch_acc": t.epoch_stats.state() if t.step_in_epoch else None,
        "history": t.history,
        "best": t.best,
        "resumes": t.resumes,
        "world_size": t.ctx.world_size,
    }


def restore_state(trainer, blob: dict) -> list[str]:
    """Put a checkpoint's optimizer, schedule, step, RNG, counters and history into ``trainer``.

    The model weights are loaded by the caller (before the model moves to its device). Returns notes for
    the log. Raises :class:`ResumeError` when the checkpoint has already trained ``--epochs`` epochs.
    """
    t, ctx, notes = trainer, trainer.ctx, []
    t.optimizer.load_state_dict(blob["optimizer"])
    t.scheduler.load_state_dict(blob["scheduler"])
    # the schedule's length follows --epochs of this run (it may have been extended)
    for fn in t.scheduler.lr_lambdas:
        fn.kwargs["total_steps"] = t.total_steps
    if "lr" in t.resume_changes or blob["args"].get("epochs") != t.args.epochs:
        apply_lr(t.optimizer, t.scheduler, t.args.lr, t.args.lr_backbone_mult)
    if t.scaler is not None and blob.get("scaler") is not None:
        t.scaler.load_state_dict(blob["scaler"])
    notes.extend(t.step.load_state_dict(blob["step_state"]))
    t.step.nonfinite_streak.zero_()
    t.step.nonfinite_max_streak.zero_()
    rngs = blob["rng"]
    if len(rngs) == ctx.world_size:
        notes.extend(restore_rng(rngs[ctx.rank], t.box_generator))
    else:
        notes.append(f"the checkpoint has RNG states of {len(rngs)} processes, this run has {ctx.world_size}: "
                     "RNG streams restart from --seed (the run continues, but not bit-exactly)")
    t.epoch, t.step_in_epoch = int(blob["epoch"]), int(blob["step_in_epoch"])
    t.global_step = int(blob["global_step"])
    t.history = list(blob["history"])
    t.best = dict(blob["best"])
    t.resumes = list(blob.get("resumes") or [])
    t.run_id = blob.get("run_id") or t.run_id
    method_all = blob["step_state"].get("method_per_rank")
    if method_all is not None:
        if len(method_all) == ctx.world_size:
            t.step.method.load_rank_state_dict(method_all[ctx.rank])
        else:
            notes.append(f"the checkpoint has {t.args.method} state of {len(method_all)} processes, this run has "
                         f"{ctx.world_size}: that per-process state restarts empty (not bit-exact)")
    acc = blob.get("epoch_acc")
    if acc and t.step_in_epoch > 0:
        t.epoch_stats = EpochStats.from_state(acc, t.device)
    if t.epoch >= t.args.epochs:
        raise ResumeError(f"--resume: the checkpoint already completed {t.epoch} epochs "
                          f"(--epochs {t.args.epochs}); pass a larger --epochs to continue")
    return notes
