"""The run folder: where a run writes, what it may overwrite, and its housekeeping at start and resume.

Rules (docs/TRAINING.md, "Run folders"):

* a new run writes into ``--output/--experiment`` (default name ``DATE-TIME-DATASET-MODEL-METHOD``) and
  refuses a folder that already holds a run's checkpoint;
* ``--resume PATH`` writes next to ``PATH`` (so a copied or moved run folder continues in place, never in
  the folder recorded in the checkpoint), or into ``--output`` / ``--experiment`` when given on the
  command line; a folder other than the checkpoint's own must not hold a run yet, and a checkpoint in it
  that belongs to another run (its ``run_id`` differs) is never overwritten;
* at start and resume the run removes its own stale temporary files (``.last.pt.XXXXXXXX.pt`` and the like,
  left by a process killed during an atomic write, see :mod:`mskd_fast._atomic`);
* a new ``recovery.pt`` never replaces an older one silently: the old one is kept as
  ``recovery-E<epoch>-S<step>.pt`` and the log says so;
* on resume, a ``best.pt`` that lags the best record (a kill between the ``last.pt`` and ``best.pt``
  writes) is repaired from the checkpoint when that checkpoint is the best model, and reported otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import torch

from mskd_fast._atomic import atomic_path
from mskd_fast.checkpoint import atomic_save

__all__ = [
    "CHECKPOINTS",
    "RUN_FILES",
    "RunFolderError",
    "check_run_folder",
    "checkpoint_info",
    "choose_run_folder",
    "keep_old_recovery",
    "remove_stale_temps",
    "repair_best",
]

CHECKPOINTS = ("last.pt", "best.pt", "recovery.pt")
RUN_FILES = ("args.yaml", "summary.csv", *CHECKPOINTS, "per_class_ap.csv", "scale_recall.csv", "scale_recall.md",
             "scale_recall.png", "training_curves.png")
_TEMP_NAME = "[a-z0-9_]{8}"  # tempfile.mkstemp's random part


class RunFolderError(ValueError):
    """The run folder cannot be used (it holds another run, or the resume target is ambiguous)."""


def choose_run_folder(args, explicit: set[str], resume_path: str | None) -> str:
    """The folder this run writes into (absolute); see the module docstring for the rules."""
    if resume_path is None:
        name = args.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.dataset}-{args.model}-{args.method}"
        return os.path.abspath(os.path.join(args.output, name))
    here = os.path.dirname(os.path.abspath(resume_path))
    if not ({"output", "experiment"} & explicit):
        return here
    parent = args.output if "output" in explicit else os.path.dirname(here)
    name = args.experiment if "experiment" in explicit else os.path.basename(here)
    return os.path.abspath(os.path.join(parent, name))


def checkpoint_info(path: str) -> dict | None:
    """``run_id``, ``epoch``, ``step_in_epoch``, ``kind``, best record of a checkpoint file, read lazily
    (memory-mapped, so the weights are not read); ``None`` when it is not a readable checkpoint."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(blob, dict):
        return None
    return {"run_id": blob.get("run_id"), "epoch": blob.get("epoch"), "step_in_epoch": blob.get("step_in_epoch"),
            "kind": blob.get("kind"), "best": blob.get("best")}


def check_run_folder(folder: str, resume_path: str | None, run_id: str | None) -> None:
    """Raise :class:`RunFolderError` when this run may not write into ``folder`` (nothing is created)."""
    present = [n for n in CHECKPOINTS if os.path.isfile(os.path.join(folder, n))]
    if resume_path is None:
        if present:
            raise RunFolderError(f"{folder} already holds a run ({', '.join(present)}); use --resume "
                                 f"{os.path.join(folder, present[0])} or another --experiment")
        return
    own = os.path.dirname(os.path.abspath(resume_path))
    if os.path.abspath(folder) != own:
        held = present + [n for n in ("summary.csv",) if os.path.isfile(os.path.join(folder, n))]
        if held:
            raise RunFolderError(f"--resume into {folder}: that folder already holds a run ({', '.join(held)}); "
                                 "give an empty or new --output/--experiment, or resume in the checkpoint's "
                                 f"own folder {own}")
        return
    for name in present:
        path = os.path.join(folder, name)
        if os.path.samefile(path, resume_path):
            continue
        info = checkpoint_info(path)
        if info is not None and run_id and info["run_id"] and info["run_id"] != run_id:
            raise RunFolderError(f"{path} belongs to another run (run_id {info['run_id']}, the resumed checkpoint "
                                 f"has {run_id}); resume into another folder with --output/--experiment")


def remove_stale_temps(folder: str) -> list[str]:
    """Delete the temporary files that an interrupted atomic write of a run file left in ``folder``.

    Only names of the form ``.<run file>.<8 random chars><ext>`` for the files in :data:`RUN_FILES` are
    touched. Returns the removed paths.
    """
    if not os.path.isdir(folder):
        return []
    patterns = [re.compile(rf"^\.{re.escape(n)}\.{_TEMP_NAME}{re.escape(os.path.splitext(n)[1])}$")
                for n in RUN_FILES]
    removed = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if any(p.match(entry) for p in patterns) and os.path.isfile(path):
            os.unlink(path)
            removed.append(path)
    return removed


def keep_old_recovery(folder: str) -> str | None:
    """Before a new ``recovery.pt`` is written: rename an existing one to ``recovery-E<e>-S<s>.pt``.

    Returns the new name of the old file, or ``None`` when there was none.
    """
    path = os.path.join(folder, "recovery.pt")
    if not os.path.isfile(path):
        return None
    info = checkpoint_info(path) or {}
    stem = f"recovery-E{info.get('epoch', 'x')}-S{info.get('step_in_epoch', 'x')}"
    target, n = os.path.join(folder, stem + ".pt"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(folder, f"{stem}-{n}.pt")
    os.replace(path, target)
    return target


def repair_best(folder: str, blob: dict, resume_path: str) -> str | None:
    """Make ``folder/best.pt`` hold the model of the best record ``blob["best"]`` when it does not.

    The checkpoint being resumed is the best model when its record's best epoch is its own completed epoch
    and it stopped at that epoch's end; then it is written as ``best.pt``. Otherwise a matching ``best.pt``
    beside ``resume_path`` (resume into another folder) is copied. Returns a note for the log, or ``None``
    when ``best.pt`` was already right or no evaluation happened yet.
    """
    best_epoch = (blob.get("best") or {}).get("epoch")
    if best_epoch is None:
        return None
    path = os.path.join(folder, "best.pt")
    info = checkpoint_info(path) if os.path.isfile(path) else None
    if info is not None and info["epoch"] == best_epoch and not info["step_in_epoch"]:
        return None
    held = "is missing" if info is None else f"holds epoch {info['epoch']}"
    if blob.get("epoch") == best_epoch and not blob.get("step_in_epoch"):
        atomic_save(dict(blob, kind="best"), path)
        return f"best.pt {held} but the best record says epoch {best_epoch}: rewritten from {resume_path}"
    source = os.path.join(os.path.dirname(os.path.abspath(resume_path)), "best.pt")
    if os.path.abspath(source) != os.path.abspath(path) and os.path.isfile(source):
        src = checkpoint_info(source)
        if src is not None and src["epoch"] == best_epoch and not src["step_in_epoch"]:
            with atomic_path(path, durable=True) as tmp:
                shutil.copyfile(source, tmp)
            return f"best.pt copied from {source} (epoch {best_epoch})"
    return (f"warning: best.pt {held} but the best record says epoch {best_epoch}, and no checkpoint of that "
            "epoch is at hand; best.pt stays as it is until a better epoch replaces it")
