"""The run folder: where a run writes, what it may overwrite, and its housekeeping at start and resume.

Rules (docs/TRAINING.md, "Run folders"):

* a new run writes into ``--output/--experiment`` (default name ``DATE-TIME-DATASET-MODEL-METHOD``) and
  refuses a folder that already holds a run's checkpoint;
* the folder is claimed atomically when the run starts writing (:meth:`RunFolder.claim`): a default name is
  created exclusively (``os.mkdir``), and when another run took it first (two runs started in the same
  second) the next free name ``NAME-2``, ``NAME-3``, ... is used; every run (new or resumed) then holds an
  exclusive lock on ``FOLDER/.run.lock`` (``fcntl.flock``, released by the kernel when the process ends,
  so a killed run leaves no stale lock) for its whole lifetime, and a second writer (an explicit
  ``--experiment`` or a resume of the same folder while the first runs) is refused, naming the folder;
* the folder (or the nearest existing parent) must be a folder this process can write into, checked
  before any work starts;
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
import socket
import time
from dataclasses import dataclass, field

import torch

from mskd_fast._atomic import atomic_path
from mskd_fast._fs import check_writable_dir
from mskd_fast.checkpoint import atomic_save

__all__ = [
    "CHECKPOINTS",
    "LOCK_FILE",
    "RUN_FILES",
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "check_run_folder",
    "checkpoint_info",
    "choose_run_folder",
    "keep_old_recovery",
    "lock_run_folder",
    "plan_run_folder",
    "remove_stale_temps",
    "repair_best",
]

LOCK_FILE = ".run.lock"

CHECKPOINTS = ("last.pt", "best.pt", "recovery.pt")
RUN_FILES = ("args.yaml", "summary.csv", *CHECKPOINTS, "per_class_ap.csv", "scale_recall.csv", "scale_recall.md",
             "scale_recall.png", "training_curves.png")
_TEMP_NAME = "[a-z0-9_]{8}"  # tempfile.mkstemp's random part


class RunFolderError(ValueError):
    """The run folder cannot be used (it holds another run, or the resume target is ambiguous)."""


def default_run_name(args) -> str:
    """``DATE-TIME-DATASET-MODEL-METHOD`` (one-second resolution; :meth:`RunFolder.claim` resolves clashes)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{args.dataset}-{args.model}-{args.method}"


def _numbered(parent: str, base: str):
    yield os.path.join(parent, base)
    n = 2
    while True:
        yield os.path.join(parent, f"{base}-{n}")
        n += 1


def choose_run_folder(args, explicit: set[str], resume_path: str | None) -> str:
    """The folder this run writes into (absolute); see the module docstring for the rules.

    A default name that exists already is followed by the first free ``NAME-2``, ``NAME-3``, ...
    """
    if resume_path is None:
        if args.experiment:
            return os.path.abspath(os.path.join(args.output, args.experiment))
        parent = os.path.abspath(args.output)
        return next(p for p in _numbered(parent, default_run_name(args)) if not os.path.lexists(p))
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


def check_run_folder(folder: str, resume_path: str | None, run_id: str | None, *, locked: bool = False) -> None:
    """Raise :class:`RunFolderError` when this run may not write into ``folder`` (nothing is created).

    Also refused: a path that is not (and cannot become) a folder this process can write into, and a folder
    whose lock another live run holds (``locked=True``: this process holds it; those two checks are skipped).
    """
    if not locked:
        try:
            check_writable_dir(folder, "run folder")
        except ValueError as exc:
            raise RunFolderError(f"{exc} (--output/--experiment)") from None
        holder = lock_holder(folder)
        if holder is not None:
            raise RunFolderError(_in_use(folder, holder))
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


def _in_use(folder: str, holder: str) -> str:
    return (f"{folder} is in use by another run ({holder or 'its lock file names no process'}); wait for it to "
            "finish, or give another --experiment")


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.run.lock`` held by this process until :meth:`release` (or exit).

    The file records the holder (``pid PID on HOST since TIME``) for the message a refused run prints, and is
    removed on release (a killed run leaves it behind, unlocked: the next run takes it over). A process that
    opened the file just before its removal notices that the path no longer names the inode it locked and
    tries again, so two runs never both hold the lock.
    """

    def __init__(self, folder: str, fd: int | None, note: str | None = None):
        self.folder, self._fd, self.note = folder, fd, note

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up and remove the lock file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        path = os.path.join(self.folder, LOCK_FILE)
        try:
            if _same_file(fd, path):
                os.unlink(path)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the flock

    def __del__(self):
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_ino, here.st_dev) == (there.st_ino, there.st_dev)


def lock_run_folder(folder: str) -> RunLock:
    """Take the run lock of the existing ``folder``; raises :class:`RunFolderError` when a live run holds it.

    On a filesystem without ``flock`` support the run continues unlocked (``RunLock.note`` says so).
    """
    import fcntl

    path = os.path.join(folder, LOCK_FILE)
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"cannot create the run lock {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(_in_use(folder, holder)) from None
        except OSError as exc:  # e.g. ENOLCK / EOPNOTSUPP on some network filesystems
            os.close(fd)
            return RunLock(folder, None, f"warning: {folder} cannot be locked ({exc.strerror or exc}); a second "
                                         "run started into it would not be refused")
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: take the new one
    else:
        raise RunFolderError(f"cannot take the run lock {path}: it keeps being replaced")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    return RunLock(folder, fd)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def lock_holder(folder: str) -> str | None:
    """``None`` when no live run holds ``folder``'s lock, else who holds it (may be ``""``). Takes nothing."""
    import fcntl

    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


@dataclass
class RunFolder:
    """Where a run writes: planned and checked before the work starts, claimed when it starts writing.

    ``path`` is the planned folder until :meth:`claim`, then the claimed one (a default name may move on to
    ``NAME-2``, ... when another run took it in between). ``lock`` is the held :class:`RunLock`.
    """

    path: str
    resume_path: str | None
    run_id: str | None
    default_base: str | None = None  # the default name's base when no --experiment was given (new runs)
    lock: RunLock | None = field(default=None, repr=False)

    def claim(self) -> str:
        """Create the folder (exclusively for a default name), lock it and re-check it; returns the path.

        Raises :class:`RunFolderError` naming the folder when it cannot be created or another run holds it.
        """
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            if self.default_base is not None:
                for path in _numbered(parent, self.default_base):
                    try:
                        os.mkdir(path)
                    except FileExistsError:
                        continue
                    self.path = path
                    break
            else:
                os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create the run folder {self.path}: {exc.strerror or exc}") from None
        self.lock = lock_run_folder(self.path)
        try:  # another run may have written here between the plan and the claim
            check_run_folder(self.path, self.resume_path, self.run_id, locked=True)
        except BaseException:
            self.release()
            raise
        return self.path

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def plan_run_folder(args, explicit: set[str], resume_path: str | None, run_id: str | None) -> RunFolder:
    """:func:`choose_run_folder` + :func:`check_run_folder`: the folder this run will claim (nothing created)."""
    base = None
    if resume_path is None and not args.experiment:
        base = default_run_name(args)
        folder = next(p for p in _numbered(os.path.abspath(args.output), base) if not os.path.lexists(p))
    else:
        folder = choose_run_folder(args, explicit, resume_path)
    check_run_folder(folder, resume_path, run_id)
    return RunFolder(folder, resume_path, run_id, base)


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
