"""``python -m mskd_fast.train``: MSKD (or vanilla BCE) training of a timm backbone; see ``--help``.

Flow: parse and resolve flags (:mod:`mskd_fast.train_args`), validate them, read the checkpoint to resume,
choose and check the run folder (:mod:`mskd_fast.run_dir`) and build the run's parts
(:func:`mskd_fast.train_build.build_run`: data, model, the method object, optimizer, schedule, the
:class:`mskd_fast.step.TrainStep`); every one of these can fail with a clear message *before* the first step and
before anything is written. Then this module's loop: epochs of steps, evaluation (with the collapse guard,
:mod:`mskd_fast.collapse`), reports and atomic checkpoints (rank 0 only under DDP).

Resume (``--resume PATH``, :mod:`mskd_fast.resume`) restores model, optimizer, scheduler, GradScaler, the
RNG states of every rank (python, numpy, torch, CUDA, the crop-box generator), epoch/step counters,
history, and the method's state (MSKD: the S-SD parameter snapshot, :mod:`mskd_fast.snapshot`). Mid-epoch
checkpoints (Ctrl-C, non-finite stop) continue at the next step; the loader replays the epoch's order (a
function of ``(seed, epoch)``) and skips the batches already trained on. ``--lr`` and ``--clip-grad`` may change
at resume (recorded).

Non-finite loss/gradient: the step is skipped on the device (no host sync per step) and counted; epoch
means average over the steps that counted. The counters are read every ``--log-interval`` steps, and once
10 consecutive steps were skipped the run stops with a recovery checkpoint (a resume starts a new streak).
SIGINT/SIGTERM: the run stops after the current step (single process) or at the next log interval (DDP,
so that all ranks stop at the same step) and writes ``recovery.pt``; a second signal kills immediately,
unless it comes within ``SIGNAL_GRACE_S`` of the first (a launcher that forwards one interrupt as two
signals, SIGINT then SIGTERM): then it is ignored, and the recovery checkpoint is still written.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch

from mskd_fast.checkpoint import WriteError, atomic_save, load_checkpoint
from mskd_fast.data.index import ImageDecodeError
from mskd_fast.diagnostics import opposing_terms
from mskd_fast.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_max,
    barrier,
    collective_timeout_message,
    init_distributed,
    resolve_device,
    shutdown,
)
from mskd_fast.epoch_stats import EpochStats
from mskd_fast.resume import RESUME_OVERRIDABLE, checkpoint_state, merge_resume_args, restore_state
from mskd_fast.train_args import build_parser, explicit_flags, resolve_defaults, validate
from mskd_fast.train_build import SetupError, build_run
from mskd_fast.train_log import say

__all__ = ["main", "EpochStats", "Trainer", "Resume", "RESUME_OVERRIDABLE", "SetupError"]

NONFINITE_LIMIT = 10
SIGNAL_GRACE_S = 2.0  # a second stop signal sooner than this after the first is taken as the same request


@dataclass
class Resume:
    """A checkpoint to continue: its dict, path, the flags given on the command line, changed settings."""

    blob: dict
    path: str
    explicit: set = field(default_factory=set)
    changes: dict = field(default_factory=dict)


class Trainer:
    """Everything a run needs, built and validated in ``__init__``; ``fit()`` trains."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, notes: list[str], resume: Resume | None):
        from mskd_fast.run_dir import plan_run_folder

        self.args, self.ctx, self.notes = args, ctx, notes
        self.device = device = ctx.device
        self.t_start = time.time()
        resume_blob = None if resume is None else resume.blob
        self.resume_changes = {} if resume is None else resume.changes
        self.run_id = uuid.uuid4().hex
        self.resume_notes: list[str] = []
        self.out_dir = self.run_folder = None
        if ctx.is_main:  # checked before anything is built or written; claimed (and locked) when writing starts
            self.run_folder = plan_run_folder(args, set() if resume is None else resume.explicit,
                                              None if resume is None else resume.path,
                                              None if resume_blob is None else resume_blob.get("run_id"))
            self.out_dir = self.run_folder.path
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        parts = build_run(args, ctx, resume_blob, None if resume is None else resume.path)
        self.__dict__.update(vars(parts))
        self.sd_warmup_steps = (int(round(args.sd_warmup_epochs * self.steps_per_epoch))
                                if args.method == "mskd" else 0)

        # ---- counters and state
        self.epoch = 0            # epochs completed
        self.step_in_epoch = 0    # steps completed in the current epoch
        self.global_step = 0
        self.history: list[dict] = []
        self.best = {"mAP": -math.inf, "epoch": None}
        self.resumes: list[dict] = []
        self.epoch_stats = EpochStats(terms=self.terms, diag_keys=self.diag_keys)
        if resume is not None:
            self.resume_notes += restore_state(self, resume_blob)
            self.resumes.append({"from": os.path.abspath(resume.path), "epoch": self.epoch,
                                 "step_in_epoch": self.step_in_epoch, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "changed": {k: list(v) for k, v in resume.changes.items()}})

        # ---- outputs
        if ctx.is_main:
            self._prepare_run_folder(resume)
        self.stop_signal = None
        self._old_handlers = {}

    # ------------------------------------------------------------------ run folder
    def _prepare_run_folder(self, resume: Resume | None) -> None:
        """Create the folder, remove stale temp files, repair ``best.pt`` on resume, write ``args.yaml``."""
        from mskd_fast.run_dir import remove_stale_temps, repair_best

        self.out_dir = self.run_folder.claim()
        if self.run_folder.lock.note:
            self.resume_notes.append(self.run_folder.lock.note)
        self.args.output, self.args.experiment = os.path.split(self.out_dir)
        for path in remove_stale_temps(self.out_dir):
            self.resume_notes.append(f"removed a stale temporary file of an interrupted write: {path}")
        if resume is not None:
            note = repair_best(self.out_dir, resume.blob, resume.path)
            if note:
                self.resume_notes.append(note)
            if os.path.dirname(os.path.abspath(resume.path)) != self.out_dir:
                self.resume_notes.append(f"continuing {resume.path} in a new folder (--output/--experiment)")
        self._write_args_yaml()

    def _write_args_yaml(self) -> None:
        import yaml

        from mskd_fast._provenance import code_provenance
        from mskd_fast.reports import write_text

        info = {
            "args": {k: v for k, v in sorted(vars(self.args).items())},
            "resolved": {
                "device": str(self.device), "world_size": self.ctx.world_size, "loader": self.loader_backend,
                "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
                "steps_per_epoch": self.steps_per_epoch, "num_classes": self.num_classes,
                "train": self.train_index.summary(), "eval": self.eval_index.summary(),
                "init": self.init_note, "notes": self.notes, "run_id": self.run_id,
                "torch": str(torch.__version__), "code": code_provenance(),
            },
            "resumes": self.resumes,
        }
        write_text(os.path.join(self.out_dir, "args.yaml"), yaml.safe_dump(_plain(info), sort_keys=False))

    def _save(self, names: list[str], kind: str) -> list[str]:
        """Write the checkpoint as each of ``names`` (rank 0; collective under DDP); returns the paths."""
        from mskd_fast.run_dir import keep_old_recovery

        blob = checkpoint_state(self, kind)
        if blob is None:
            return []
        if "recovery.pt" in names:
            kept = keep_old_recovery(self.out_dir)
            if kept:
                self._say(f"note: the previous recovery.pt is kept as {kept}")
        return [atomic_save(blob, os.path.join(self.out_dir, name)) for name in names]

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        def handler(signum, _frame):
            now = time.monotonic()
            if self.stop_signal is None:
                self.stop_signal, self._signal_time = signum, now
            elif now - self._signal_time > SIGNAL_GRACE_S:  # a deliberate second signal acts immediately
                self._restore_signals()
                signal.raise_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers = {}

    # ------------------------------------------------------------------ data stream
    def _batches(self):
        """(epoch, index in epoch, batch) for every remaining step, across epoch boundaries."""
        for epoch in range(self.epoch, self.args.epochs):
            self.train_loader.set_epoch(epoch)
            skip = self.step_in_epoch if epoch == self.epoch else 0
            for i, batch in enumerate(self.train_loader):
                if i < skip:
                    continue
                yield epoch, i, batch

    # ------------------------------------------------------------------ main loop
    def fit(self) -> int:
        """Train the remaining epochs; returns the exit code (0, 1 after a non-finite stop, 128+signal)."""
        if self.ctx.is_main:
            from mskd_fast.train_log import header

            self._say(header(self))
        self._install_signals()
        try:
            return self._fit()
        finally:
            if self.stop_signal is not None:  # a launcher's follow-up signal may still come: absorb it, then exit
                time.sleep(max(0.0, self._signal_time + SIGNAL_GRACE_S - time.monotonic()))
            self._restore_signals()
            if self.run_folder is not None:
                self.run_folder.release()

    def _fit(self) -> int:
        a, ctx = self.args, self.ctx
        stream = self._batches()
        try:
            cur = next(stream, None)
        except ImageDecodeError as exc:
            return self._stop_bad_image(exc)
        if self.step_in_epoch >= self.steps_per_epoch:  # resumed from a stop between an epoch's end and its eval
            self._end_epoch(self.epoch)
        bar = None
        window_t, window_steps = time.time(), 0
        epoch_t0 = time.time()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        while cur is not None:
            epoch, i, (images, targets, ids) = cur
            if bar is None and ctx.is_main and not a.no_progress and sys.stdout.isatty():
                bar = self._progress_bar(epoch, i)
            try:
                nxt = next(stream, None)
            except Exception as exc:
                if self.stop_signal is None and not isinstance(exc, ImageDecodeError):
                    raise
                # Ctrl-C reached the loader's worker processes too (same process group) and they died, or an
                # image could not be decoded: stop before this step, which the checkpoint then points at.
                if bar is not None:
                    bar.close()
                return self._stop("signal") if self.stop_signal is not None else self._stop_bad_image(exc)
            if self.sd_warmup_steps:
                self.step.set_sd_scale(self._sd_scale(self.global_step))
            diagnose = self.global_step % a.log_interval == 0
            out = self.step(images, targets, diagnose=diagnose, sample_ids=ids, epoch=epoch)
            self.epoch_stats.add(out)
            self.epoch_stats.samples += images.shape[0] * ctx.world_size
            self.step_in_epoch = i + 1
            self.global_step += 1
            window_steps += 1
            if bar is not None:
                bar.update(1)
            end_of_epoch = nxt is None or nxt[0] != epoch
            stop = "signal" if ctx.world_size == 1 and self.stop_signal is not None else None
            if window_steps >= a.log_interval or end_of_epoch or stop:
                now = time.time()
                rate = window_steps * images.shape[0] * ctx.world_size / max(now - window_t, 1e-9)
                window_t, window_steps = now, 0
                stop = self._log_window(bar, epoch, i, rate) or stop
            if end_of_epoch:
                sync()
                self.epoch_stats.train_time += time.time() - epoch_t0
                if bar is not None:
                    bar.close()
                    bar = None
                try:
                    self._end_epoch(epoch)
                except ImageDecodeError as exc:  # met by the evaluation
                    return self._stop_bad_image(exc)
                epoch_t0 = window_t = time.time()
                if a.stop_on_collapse and self.collapse_streak() >= a.stop_on_collapse and not stop:
                    self._say(f"stopped early after epoch {epoch + 1} of {a.epochs}: the collapse guard flagged "
                              f"{a.stop_on_collapse} consecutive evaluations (--stop-on-collapse); last.pt holds "
                              f"this epoch's model")
                    break
            if stop:
                return self._stop(stop)
            cur = nxt
        if ctx.is_main:
            from mskd_fast.train_log import final_summary

            self._say(final_summary(self))
        return 0

    def collapse_streak(self) -> int:
        """How many of the last evaluations, in a row up to the latest, the collapse guard flagged (from
        ``history``, so a resumed run counts the same)."""
        streak = 0
        for row in reversed(self.history):
            if not row.get("eval_samples"):
                continue  # an epoch without evaluation neither breaks nor extends the streak
            if not row.get("collapse"):
                break
            streak += 1
        return streak

    def _sd_scale(self, step: int) -> float:
        """The self-distillation warm-up factor of optimizer step ``step`` (0-based): ``(step+1) / W``, then 1."""
        return min(1.0, (step + 1) / self.sd_warmup_steps)

    def _log_window(self, bar, epoch: int, i: int, rate: float) -> str | None:
        """Read the device counters (one host sync), show progress; returns a stop reason or ``None``."""
        from mskd_fast.train_log import progress_text

        values = torch.cat([self.epoch_stats.means(), self.step.nonfinite_max_streak.double().view(1)]).tolist()
        flags = all_reduce_max(self.ctx, [values[-1], float(self.stop_signal is not None)])
        if self.ctx.is_main:
            text = progress_text(self.args.method, dict(zip(self.terms, values)), rate, int(values[len(self.terms)]))
            if bar is not None:
                bar.set_postfix_str(text, refresh=True)
            else:
                self._say(f"epoch {epoch + 1} step {i + 1}/{self.steps_per_epoch}: {text}")
        if flags[0] >= NONFINITE_LIMIT:
            return "nonfinite"
        return "signal" if flags[1] > 0 else None

    def _end_epoch(self, epoch: int) -> None:
        from mskd_fast.reports import METRIC_KEYS
        from mskd_fast.train_log import epoch_line

        a, st = self.args, self.epoch_stats
        means = st.means().tolist()
        row = {"epoch": epoch + 1, "step": self.global_step}
        row.update(zip(self.terms, means[: len(self.terms)]))
        row["nonfinite_skipped"] = int(means[-1])
        row["steps_counted"] = st.steps - row["nonfinite_skipped"]
        row.update(st.diag_means())
        if self.sd_warmup_steps:
            row["sd_scale"] = self._sd_scale(self.global_step - 1)
        row["lr"] = self.optimizer.param_groups[-1]["lr"]
        row["lr_backbone"] = self.optimizer.param_groups[0]["lr"]
        row["img_s"] = st.samples / max(st.train_time, 1e-9)
        row["train_time_s"] = st.train_time
        evaluate_now = epoch + 1 == a.epochs or (a.eval_interval > 0 and (epoch + 1) % a.eval_interval == 0)
        self._sync_buffers()
        result = None
        if evaluate_now:
            result, eval_time = self._evaluate(epoch)
            row["eval_time_s"] = eval_time
        for key in METRIC_KEYS:
            row[key] = float(result[key]) if result is not None else float("nan")
        row["eval_samples"] = result["num_samples"] if result is not None else 0
        reasons = self._collapse_signals(row, result)
        opposing = opposing_terms([*self.history, row])
        row["sd_opposes_bce"] = ";".join(t.split(" ")[0] for t in opposing)
        self.history.append(row)
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        self.epoch_stats = EpochStats(terms=self.terms, diag_keys=self.diag_keys)
        improved = result is not None and not math.isnan(row["mAP"]) and row["mAP"] > self.best["mAP"]
        if improved:
            self.best = {"mAP": row["mAP"], "epoch": epoch + 1}
        self._save(["last.pt"] + (["best.pt"] if improved else []), "epoch")
        if self.ctx.is_main:
            self._write_reports()
            self._say(epoch_line(row, a.epochs, result is not None, improved, reasons, self.terms, opposing))

    def _collapse_signals(self, row: dict, result: dict | None) -> list[str]:
        """Put the collapse-guard columns into ``row``; returns the collapse signs found (phrases)."""
        from mskd_fast.collapse import bce_rise, collapse_reasons

        for key in ("top1_mode_frac", "max_abs_logit", "logit_std"):
            row[key] = float(result[key]) if result is not None else float("nan")
        row["top1_classes"] = int(result["top1_classes"]) if result is not None else 0
        row["bce_rise"] = bce_rise(row["bce"], [r["bce"] for r in self.history])
        reasons = collapse_reasons(row)
        row["collapse"] = int(bool(reasons))
        return reasons

    def _sync_buffers(self) -> None:
        """Under DDP each rank updated BN statistics with its own batches: use rank 0's everywhere (also those of
        a method object's sub-modules, e.g. MulSupCon's projection head and key encoder)."""
        if self.ctx.distributed:
            import torch.distributed as dist

            extra = [b for c in self.method.children() for b in c.buffers()]
            for buf in [*self.model.buffers(), *extra]:
                dist.broadcast(buf, 0)

    def _evaluate(self, epoch: int):
        from mskd_fast.evaluate import evaluate, write_eval_reports

        t0 = time.time()
        metrics = evaluate(self.teacher, self.eval_loader, self.num_classes,
                           class_names=self.train_index.class_names, amp_dtype=self.amp_dtype,
                           threshold=self.args.threshold, distributed=self.ctx.distributed)
        result = None
        if self.ctx.is_main:  # the metrics hold every rank's rows (gathered by evaluate)
            result, _ = write_eval_reports(metrics, self.eval_index, self.args.img_size, self.out_dir,
                                           label=f"{self.args.method} epoch {epoch + 1}",
                                           threshold=self.args.threshold, collapse_signals=True)
        result = all_gather_objects(self.ctx, result)[0] if self.ctx.distributed else result
        return result, time.time() - t0

    def _write_reports(self) -> None:
        from mskd_fast.reports import plot_training_curves, write_summary_csv

        write_summary_csv(os.path.join(self.out_dir, "summary.csv"), self.history)
        plot_training_curves(self.history, os.path.join(self.out_dir, "training_curves.png"),
                             title=f"{self.args.method} {self.args.model} on {self.args.dataset}",
                             terms=self.terms)

    def _stop_bad_image(self, exc: ImageDecodeError) -> int:
        """An image could not be decoded (``--on-bad-image error``): recovery checkpoint, message, exit code 1.

        Under DDP only the rank that met it knows (the checkpoint is a collective): it raises, ending the job.
        """
        if self.ctx.distributed:
            raise exc
        paths = self._save(["recovery.pt"], "bad_image")
        path = paths[0] if paths else "recovery.pt"
        print(f"error: {exc}", file=sys.stderr)
        self._say(f"stopped at epoch {self.epoch + 1} step {self.step_in_epoch} because an image could not be "
                  f"decoded; recovery checkpoint {path}; after fixing or removing {exc.path}, continue with "
                  f"--resume {path} (or add --on-bad-image skip)")
        return 1

    def _stop(self, reason: str) -> int:
        paths = self._save(["recovery.pt"], reason)
        path = paths[0] if paths else "recovery.pt"
        if reason == "nonfinite":
            self._say(f"error: {NONFINITE_LIMIT} consecutive steps had a non-finite loss or gradient and were "
                      f"skipped (epoch {self.epoch + 1}, step {self.step_in_epoch}); stopping. Recovery checkpoint: "
                      f"{path}. Try a lower --lr, --clip-grad, --amp-dtype bfloat16, or check the data; "
                      f"continue with --resume {path} [--lr LR] [--clip-grad NORM]")
            return 1
        signame = signal.Signals(self.stop_signal).name if self.stop_signal else "stop request"
        self._say(f"{signame}: stopped after epoch {self.epoch + 1} step {self.step_in_epoch}; recovery checkpoint "
                  f"{path}; continue with --resume {path}")
        return 128 + int(self.stop_signal or signal.SIGINT)

    # ------------------------------------------------------------------ output
    def _say(self, msg: str) -> None:
        if self.ctx.is_main:
            say(msg)

    def _progress_bar(self, epoch: int, start: int):
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{self.args.epochs}",
                    unit="step", dynamic_ncols=True, leave=True, file=sys.stdout)


def _plain(obj):
    """Tuples -> lists, recursively (for YAML's safe dumper)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- entry point
SETUP_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, WriteError)


def main(argv=None) -> int:
    """Entry point of ``python -m mskd_fast.train`` / ``mskd-train``; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    try:
        resume = None
        if args.resume:
            blob = load_checkpoint(args.resume, require=("model", "optimizer", "scheduler", "step_state", "rng",
                                                         "args", "meta", "epoch", "history"))
            args, changes = merge_resume_args(args, explicit, blob)
            resume = Resume(blob, args.resume, explicit, changes)
            notes = ["settings of the resumed run (args.yaml of the checkpoint)"]
            device = resolve_device(args.device)
        else:
            device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
            notes = resolve_defaults(args, explicit, on_cuda=device.type == "cuda")
        validate(args)
    except SETUP_ERRORS as exc:
        parser.error(str(exc))
    ctx = init_distributed(args.device, args.dist_timeout)
    try:
        try:
            trainer = Trainer(args, ctx, notes, resume)
        except SETUP_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            code = trainer.fit()
        except ImageDecodeError as exc:  # under DDP: the rank that met it stops the job (no recovery.pt)
            print(f"error: rank {ctx.rank}: {exc}", file=sys.stderr)  # the other ranks fail on the lost peer
            return 1
        except RuntimeError as exc:  # a rank stopped responding (--dist-timeout)
            message = collective_timeout_message(exc, ctx, args.dist_timeout)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 1
        except WriteError as exc:  # a full disk: the file's previous version is intact (atomic writes)
            print(f"error: {exc}; its previous version (if any) is unchanged. Free some space (or use another "
                  "--output) and continue with --resume from the run's last checkpoint", file=sys.stderr)
            return 2
        barrier(ctx)
        return code
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
