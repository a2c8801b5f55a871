"""``python -m mskd_fast.train``: MSKD (or vanilla BCE) training of a timm backbone; see ``--help``.

Flow: parse and resolve flags (:mod:`mskd_fast.train_args`), validate them, read the checkpoint to resume
and the dataset indices, build loaders, model (+ eval twin as the teacher), loss, fused SGD, per-step
LR schedule and the :class:`mskd_fast.step.TrainStep`; every one of these can fail with a clear message
*before* the first step. Then epochs of steps with a look-ahead batch (S-SD, see ``mskd_fast.step``),
evaluation, reports and atomic checkpoints (rank 0 only under DDP).

Resume (``--resume PATH``) restores model, optimizer, scheduler, GradScaler, the RNG states of every rank
(python, numpy, torch, CUDA, the crop-box generator), epoch/step counters, history, and the S-SD
look-ahead logits. Mid-epoch checkpoints (Ctrl-C, non-finite stop) continue at the next step; the loader
replays the epoch's order (a function of ``(seed, epoch)``) and skips the batches already trained on.
The S-SD logits are only reused if the first batch after resume is the one they were computed for (a
fingerprint of its sample ids and pixels is stored); otherwise that one step runs without S-SD and the
trainer says so (this happens with loaders whose augmentation is not a function of ``(seed, epoch)``).

Non-finite loss/gradient: the step is skipped on the device (no host sync per step) and counted; the
counters are read every ``--log-interval`` steps, and once 10 consecutive steps were skipped the run stops
with a recovery checkpoint. SIGINT/SIGTERM: the run stops after the current step (single process) or at
the next log interval (DDP, so that all ranks stop at the same step) and writes ``recovery.pt``; a second
signal kills immediately.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from mskd_fast.checkpoint import FORMAT, atomic_save, capture_rng, load_checkpoint, restore_rng
from mskd_fast.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_max,
    barrier,
    init_distributed,
    resolve_device,
    shutdown,
)
from mskd_fast.train_args import build_parser, explicit_flags, resolve_defaults, validate

__all__ = ["main", "Trainer"]

NONFINITE_LIMIT = 10
TERMS = ("loss", "bce", "lsd", "rsd", "ssd")
# flags that may differ from the checkpoint's when resuming (everything else must match)
RESUME_OVERRIDABLE = {
    "epochs", "log_interval", "eval_interval", "workers", "loader", "device", "no_progress", "data_dir",
    "synthetic_cache", "output", "experiment", "resume", "on_bad_image",
}


class SetupError(ValueError):
    """A flag, file or dataset problem found before training starts."""


@dataclass
class EpochStats:
    """Running sums of one epoch (device tensors until read)."""

    sums: dict = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    samples: int = 0
    train_time: float = 0.0

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps,
                "skipped": self.skipped, "samples": self.samples, "train_time": self.train_time}


def _fingerprint(images: torch.Tensor, ids: torch.Tensor) -> dict:
    """Identity of a batch: its sample ids and two float64 pixel sums (host sync; used at checkpoints only)."""
    x = images.detach().double()
    return {"sample_ids": ids.detach().cpu().clone(), "sum": float(x.sum()), "abs_sum": float(x.abs().sum())}


def _same_batch(fp: dict, images: torch.Tensor, ids: torch.Tensor) -> bool:
    now = _fingerprint(images, ids)
    return (torch.equal(fp["sample_ids"], now["sample_ids"])
            and math.isclose(fp["sum"], now["sum"], rel_tol=0, abs_tol=1e-6 * max(1.0, fp["abs_sum"]))
            and math.isclose(fp["abs_sum"], now["abs_sum"], rel_tol=1e-9, abs_tol=1e-6))


def _plain(obj):
    """Tuples -> lists, recursively (for YAML's safe dumper)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class Trainer:
    """Everything a run needs, built and validated in ``__init__``; ``fit()`` trains."""

    def __init__(self, args: argparse.Namespace, ctx: DistContext, notes: list[str], resume_blob: dict | None):
        from mskd_fast.data import build_loader, index_from_args, resolve_backend
        from mskd_fast.losses import MSKDLoss
        from mskd_fast.models import batch_stat_twin, create_model, eval_twin, load_initial_checkpoint
        from mskd_fast.step import StepConfig, TrainStep, build_optimizer, build_scheduler

        self.args, self.ctx, self.notes = args, ctx, notes
        self.device = device = ctx.device
        self.t_start = time.time()
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # ---- data
        self.train_index = index_from_args(args, "train")
        self.eval_index = index_from_args(args, "eval")
        if list(self.train_index.class_names) != list(self.eval_index.class_names):
            raise SetupError("train and eval splits have different class lists")
        self.num_classes = self.train_index.num_classes
        if args.num_classes is not None and args.num_classes != self.num_classes:
            raise SetupError(f"--num-classes {args.num_classes} but dataset {args.dataset} has "
                             f"{self.num_classes} classes")
        args.num_classes = self.num_classes
        if resume_blob is not None and list(resume_blob["meta"]["class_names"]) != list(self.train_index.class_names):
            raise SetupError("--resume: the checkpoint was trained on other classes than this dataset has")
        self.amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
        load_dtype = self.amp_dtype if (self.amp_dtype is not None and device.type == "cuda") else torch.float32
        common = dict(img_size=args.img_size, loader=args.loader, num_workers=args.workers, shard_id=ctx.rank,
                      num_shards=ctx.world_size, dtype=load_dtype, channels_last=args.channels_last, device=device)
        self.loader_backend = resolve_backend(args.loader, device)
        self.train_loader = build_loader(self.train_index, train=True, batch_size=args.batch_size, seed=args.seed,
                                         randaugment=args.randaugment, **common)
        self.eval_loader = build_loader(self.eval_index, train=False, batch_size=args.batch_size, **common)
        self.steps_per_epoch = len(self.train_loader)

        # ---- model: identical init on every rank, then per-rank RNG streams
        torch.manual_seed(args.seed)
        model, self.init_note = create_model(args.model, self.num_classes, pretrained=args.pretrained,
                                             allow_random_init=args.allow_random_init, img_size=args.img_size,
                                             roi_mode=args.roi_mode, **args.model_kwargs)
        if args.initial_checkpoint and resume_blob is None:
            self.init_note = load_initial_checkpoint(model, args.initial_checkpoint)
        if resume_blob is not None:
            model.load_state_dict(resume_blob["model"])
            self.init_note = f"resumed from {args.resume}"
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.teacher = eval_twin(model)
        model.train()
        torch.manual_seed(args.seed + 1000 * ctx.rank + 1)
        self.box_generator = torch.Generator(device=device)
        self.box_generator.manual_seed(args.seed * 7919 + 104729 * (ctx.rank + 1))
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            train_model = model

        # ---- loss, optimizer, schedule, step
        use = dict(use_lsd=not args.no_lsd, use_rsd=not args.no_rsd, use_ssd=not args.no_ssd)
        if args.method == "vanilla":
            use = dict(use_lsd=False, use_rsd=False, use_ssd=False)
        loss_fn = MSKDLoss(iota=args.iota, kappa=args.kappa, lam=args.lam, temperature=args.temperature,
                           omega=args.omega, gamma_pos=args.gamma_pos, gamma_neg=args.gamma_neg,
                           layers=args.gp_layers, delta=args.delta, use_mbd=not args.no_mbd,
                           recipe=args.recipe, mbd_form=args.mbd_form, rsd_teacher_scale=args.rsd_teacher_scale,
                           backend=args.loss_backend, **use)
        config = StepConfig(method=args.method, crops=args.crops, crop_mode=args.crop_mode,
                            clip_grad=args.clip_grad or None, amp_dtype=self.amp_dtype,
                            channels_last=args.channels_last, **use)
        self.optimizer = build_optimizer(model, args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                         backbone_lr_mult=args.lr_backbone_mult)
        self.total_steps = self.steps_per_epoch * args.epochs
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=self.total_steps,
            warmup_steps=int(round(args.warmup_epochs * self.steps_per_epoch)), sched=args.sched,
            step_every=max(1, int(round(args.decay_epochs * self.steps_per_epoch))))
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        step_teacher = batch_stat_twin(model) if args.teacher_bn == "batch" else self.teacher
        self.step = TrainStep(train_model, step_teacher, loss_fn, self.optimizer, self.scheduler, config,
                              self.box_generator, scaler=self.scaler, compile=args.compile,
                              fullgraph=not ctx.distributed)

        # ---- counters and state
        self.epoch = 0            # epochs completed
        self.step_in_epoch = 0    # steps completed in the current epoch
        self.global_step = 0
        self.history: list[dict] = []
        self.best = {"mAP": -math.inf, "epoch": None}
        self.look_ahead_fp = None
        self.epoch_stats = EpochStats()
        if resume_blob is not None:
            self._load_state(resume_blob)

        # ---- outputs
        self.out_dir = None
        if ctx.is_main:
            self.out_dir = self._run_dir(resume_blob)
            os.makedirs(self.out_dir, exist_ok=True)
            if resume_blob is None and os.path.exists(os.path.join(self.out_dir, "last.pt")):
                raise SetupError(f"{self.out_dir} already holds a run (last.pt); use --resume "
                                 f"{os.path.join(self.out_dir, 'last.pt')} or another --experiment")
            self._write_args_yaml()
        self.stop_signal = None
        self._old_handlers = {}

    # ------------------------------------------------------------------ setup helpers
    def _run_dir(self, resume_blob) -> str:
        a = self.args
        if a.experiment:
            return os.path.join(a.output, a.experiment)
        if resume_blob is not None:
            return os.path.dirname(os.path.abspath(a.resume))
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{a.dataset}-{a.model}-{a.method}"
        return os.path.join(a.output, name)

    def _write_args_yaml(self) -> None:
        import yaml

        from mskd_fast.reports import write_text

        info = {
            "args": {k: v for k, v in sorted(vars(self.args).items())},
            "resolved": {
                "device": str(self.device), "world_size": self.ctx.world_size, "loader": self.loader_backend,
                "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
                "steps_per_epoch": self.steps_per_epoch, "num_classes": self.num_classes,
                "train": self.train_index.summary(), "eval": self.eval_index.summary(),
                "init": self.init_note, "notes": self.notes,
                "torch": str(torch.__version__),
            },
        }
        write_text(os.path.join(self.out_dir, "args.yaml"), yaml.safe_dump(_plain(info), sort_keys=False))

    def _load_state(self, blob: dict) -> None:
        ctx = self.ctx
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        # the schedule's length follows --epochs of this run (it may have been extended)
        self.scheduler.lr_lambdas[0].kwargs["total_steps"] = self.total_steps
        self.scheduler.lr_lambdas[-1].kwargs["total_steps"] = self.total_steps
        if self.scaler is not None and blob.get("scaler") is not None:
            self.scaler.load_state_dict(blob["scaler"])
        self.step.load_state_dict(blob["step_state"])
        rngs = blob["rng"]
        if len(rngs) == ctx.world_size:
            for note in restore_rng(rngs[ctx.rank], self.box_generator):
                self.notes.append(note)
        else:
            print(f"note: checkpoint has RNG states of {len(rngs)} processes, this run has {ctx.world_size}: "
                  "RNG streams restart from --seed (the run continues, but not bit-exactly)")
        self.epoch, self.step_in_epoch = int(blob["epoch"]), int(blob["step_in_epoch"])
        self.global_step = int(blob["global_step"])
        self.history = list(blob["history"])
        self.best = dict(blob["best"])
        self.look_ahead_fp = blob.get("look_ahead")
        if self.look_ahead_fp is not None and ctx.world_size > 1:
            fps = self.look_ahead_fp.get("per_rank")
            self.look_ahead_fp = fps[ctx.rank] if fps and len(fps) == ctx.world_size else None
            if self.look_ahead_fp is None:
                self.step.drop_q_prev()
        q_prev_all = blob["step_state"].get("q_prev_per_rank")
        if q_prev_all is not None:
            q = q_prev_all[ctx.rank] if len(q_prev_all) == ctx.world_size else None
            self.step.q_prev = None if q is None else q.to(self.device)
        acc = blob.get("epoch_acc")
        if acc and self.step_in_epoch > 0:
            self.epoch_stats = EpochStats(
                sums={k: torch.tensor(v, device=self.device) for k, v in acc["sums"].items()},
                steps=acc["steps"], skipped=acc["skipped"], samples=acc["samples"], train_time=acc["train_time"])
        if self.epoch >= self.args.epochs:
            raise SetupError(f"--resume: the checkpoint already completed {self.epoch} epochs "
                             f"(--epochs {self.args.epochs}); pass a larger --epochs to continue")

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_blob(self, kind: str, next_batch) -> dict | None:
        """Gather per-rank state (collective under DDP) and build the checkpoint dict on rank 0."""
        from mskd_fast.models import unwrap

        step_state = self.step.state_dict()
        fp = None if next_batch is None else _fingerprint(next_batch[0], next_batch[2])
        local = {"rng": capture_rng(self.box_generator), "q_prev": step_state["q_prev"], "fp": fp}
        gathered = all_gather_objects(self.ctx, local)
        if not self.ctx.is_main:
            return None
        step_state["q_prev_per_rank"] = [g["q_prev"] for g in gathered]
        look_ahead = gathered[0]["fp"]
        if self.ctx.distributed and look_ahead is not None:
            look_ahead = dict(look_ahead, per_rank=[g["fp"] for g in gathered])
        a = self.args
        return {
            "format": FORMAT,
            "kind": kind,
            "args": {k: v for k, v in vars(a).items()},
            "meta": {"model_name": a.model, "num_classes": self.num_classes,
                     "class_names": list(self.train_index.class_names), "img_size": a.img_size,
                     "roi_mode": a.roi_mode, "model_kwargs": dict(a.model_kwargs), "dataset": a.dataset,
                     "method": a.method},
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "step_state": step_state,
            "rng": [g["rng"] for g in gathered],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_acc": self.epoch_stats.state() if self.step_in_epoch else None,
            "history": self.history,
            "best": self.best,
            "look_ahead": look_ahead,
            "world_size": self.ctx.world_size,
        }

    def _save(self, names: list[str], kind: str, next_batch) -> list[str]:
        blob = self._checkpoint_blob(kind, next_batch)
        if blob is None:
            return []
        return [atomic_save(blob, os.path.join(self.out_dir, name)) for name in names]

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        def handler(signum, _frame):
            self.stop_signal = signum
            for sig, old in self._old_handlers.items():  # a second signal acts immediately
                signal.signal(sig, old)

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
        self._print_header()
        self._install_signals()
        try:
            return self._fit()
        finally:
            self._restore_signals()

    def _fit(self) -> int:
        a, ctx = self.args, self.ctx
        stream = self._batches()
        cur = next(stream, None)
        bar = None
        window_t, window_steps = time.time(), 0
        epoch_t0 = time.time()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        while cur is not None:
            epoch, i, (images, targets, ids) = cur
            if bar is None and ctx.is_main and not a.no_progress and sys.stdout.isatty():
                bar = self._progress_bar(epoch, i)
            if self.look_ahead_fp is not None:  # first step after a resume: is q_prev for this very batch?
                if self.step.q_prev is not None and not _same_batch(self.look_ahead_fp, images, ids):
                    self._say("note: the first batch after resume differs from the one whose S-SD logits were "
                              "saved (loader augmentation not reproducible); this step runs without S-SD")
                    self.step.drop_q_prev()
                self.look_ahead_fp = None
            try:
                nxt = next(stream, None)
            except Exception:
                if self.stop_signal is None:
                    raise
                # Ctrl-C reached the loader's worker processes too (same process group) and they died:
                # stop before this step, whose batch (and S-SD logits) the checkpoint then points at.
                if bar is not None:
                    bar.close()
                return self._stop("signal", cur)
            out = self.step(images, targets, None if nxt is None else nxt[2][0])
            st = self.epoch_stats
            for key in TERMS:
                value = out["total"] if key == "loss" else out[key]
                st.sums[key] = st.sums[key] + value if key in st.sums else value.clone()
            st.sums["skipped"] = st.sums["skipped"] + out["skipped"] if "skipped" in st.sums else out["skipped"].clone()
            st.steps += 1
            st.samples += images.shape[0] * ctx.world_size
            self.step_in_epoch = i + 1
            self.global_step += 1
            window_steps += 1
            if bar is not None:
                bar.update(1)
            end_of_epoch = nxt is None or nxt[0] != epoch
            stop = None
            if ctx.world_size == 1 and self.stop_signal is not None:
                stop = "signal"
            if window_steps >= a.log_interval or end_of_epoch or stop:
                values = torch.stack([st.sums[k] / st.steps for k in TERMS]
                                     + [self.step.nonfinite_max_streak.double(), st.sums["skipped"].double()])
                values = values.tolist()
                now = time.time()
                rate = window_steps * images.shape[0] * ctx.world_size / max(now - window_t, 1e-9)
                window_t, window_steps = now, 0
                flags = all_reduce_max(ctx, [values[-2], float(self.stop_signal is not None)])
                if flags[0] >= NONFINITE_LIMIT:
                    stop = "nonfinite"
                elif flags[1] > 0:
                    stop = "signal"
                self._show_progress(bar, epoch, i, values, rate)
            if end_of_epoch:
                sync()
                st.train_time += time.time() - epoch_t0
                if bar is not None:
                    bar.close()
                    bar = None
                self._end_epoch(epoch, nxt)
                epoch_t0 = window_t = time.time()
            if stop:
                return self._stop(stop, nxt)
            cur = nxt
        self._final_summary()
        return 0

    def _end_epoch(self, epoch: int, nxt) -> None:
        a, ctx = self.args, self.ctx
        st = self.epoch_stats
        keys = list(TERMS) + ["skipped"]
        means = torch.stack([st.sums[k].double() for k in keys]).tolist()
        row = {"epoch": epoch + 1, "step": self.global_step}
        row.update({k: v / max(st.steps, 1) for k, v in zip(TERMS, means[: len(TERMS)])})
        row["nonfinite_skipped"] = int(means[-1])
        row["lr"] = self.optimizer.param_groups[-1]["lr"]
        row["lr_backbone"] = self.optimizer.param_groups[0]["lr"]
        row["img_s"] = st.samples / max(st.train_time, 1e-9)
        row["train_time_s"] = st.train_time
        last = epoch + 1 == a.epochs
        evaluate_now = last or (a.eval_interval > 0 and (epoch + 1) % a.eval_interval == 0)
        self._sync_buffers()
        result = None
        if evaluate_now:
            result, eval_time = self._evaluate(epoch)
            row["eval_time_s"] = eval_time
        from mskd_fast.reports import METRIC_KEYS

        for key in METRIC_KEYS:
            row[key] = float(result[key]) if result is not None else float("nan")
        row["eval_samples"] = result["num_samples"] if result is not None else 0
        reasons = self._collapse_signals(row, result)
        self.history.append(row)
        self.epoch = epoch + 1
        self.step_in_epoch = 0
        self.epoch_stats = EpochStats()
        improved = result is not None and not math.isnan(row["mAP"]) and row["mAP"] > self.best["mAP"]
        if improved:
            self.best = {"mAP": row["mAP"], "epoch": epoch + 1}
        names = ["last.pt"] + (["best.pt"] if improved else [])
        self._save(names, "epoch", nxt[2] if nxt is not None else None)
        if ctx.is_main:
            self._write_reports()
            msg = (f"epoch {epoch + 1}/{a.epochs}: loss {row['loss']:.4f} (bce {row['bce']:.4f} lsd {row['lsd']:.4f} "
                   f"rsd {row['rsd']:.4f} ssd {row['ssd']:.4f}) lr {row['lr']:.3g} {row['img_s']:.1f} img/s")
            if result is not None:
                from mskd_fast.reports import format_metrics

                msg += f" | eval {format_metrics(row)}" + (" *best*" if improved else "")
            if row["nonfinite_skipped"]:
                msg += f" | {row['nonfinite_skipped']} non-finite steps skipped"
            if reasons:
                msg += " | WARNING collapsing: " + "; ".join(reasons)
            self._say(msg)

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
        """Under DDP each rank updated BN statistics with its own batches: use rank 0's everywhere."""
        if self.ctx.distributed:
            import torch.distributed as dist

            for buf in self.model.buffers():
                dist.broadcast(buf, 0)

    def _evaluate(self, epoch: int):
        from mskd_fast.evaluate import evaluate, write_eval_reports

        t0 = time.time()
        metrics = evaluate(self.teacher, self.eval_loader, self.num_classes,
                           class_names=self.train_index.class_names, amp_dtype=self.amp_dtype,
                           threshold=self.args.threshold, distributed=self.ctx.distributed)
        result = None
        if self.ctx.is_main:
            from mskd_fast.collapse import eval_signals

            result, _ = write_eval_reports(metrics, self.eval_index, self.args.img_size, self.out_dir,
                                           label=f"{self.args.method} epoch {epoch + 1}",
                                           threshold=self.args.threshold)
            result = dict(result, **eval_signals(torch.from_numpy(metrics.rows()["logits"])))
        result = all_gather_objects(self.ctx, result)[0] if self.ctx.distributed else result
        return result, time.time() - t0

    def _write_reports(self) -> None:
        from mskd_fast.reports import plot_training_curves, write_summary_csv

        write_summary_csv(os.path.join(self.out_dir, "summary.csv"), self.history)
        plot_training_curves(self.history, os.path.join(self.out_dir, "training_curves.png"),
                             title=f"{self.args.method} {self.args.model} on {self.args.dataset}")

    def _stop(self, reason: str, nxt) -> int:
        paths = self._save(["recovery.pt"], reason, nxt[2] if nxt is not None else None)
        path = paths[0] if paths else "recovery.pt"
        if reason == "nonfinite":
            self._say(f"error: {NONFINITE_LIMIT} consecutive steps had a non-finite loss or gradient and were "
                      f"skipped (epoch {self.epoch + 1}, step {self.step_in_epoch}); stopping. Recovery checkpoint: "
                      f"{path}. Try a lower --lr, --clip-grad, --amp-dtype bfloat16, or check the data.")
            return 1
        signame = signal.Signals(self.stop_signal).name if self.stop_signal else "stop request"
        self._say(f"{signame}: stopped after epoch {self.epoch + 1} step {self.step_in_epoch}; recovery checkpoint "
                  f"{path}; continue with --resume {path}")
        return 128 + int(self.stop_signal or signal.SIGINT)

    # ------------------------------------------------------------------ output
    def _say(self, msg: str) -> None:
        if self.ctx.is_main:
            try:
                from tqdm import tqdm

                tqdm.write(msg)
            except ImportError:  # pragma: no cover
                print(msg, flush=True)
            sys.stdout.flush()

    def _progress_bar(self, epoch: int, start: int):
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{self.args.epochs}",
                    unit="step", dynamic_ncols=True, leave=True, file=sys.stdout)

    def _show_progress(self, bar, epoch: int, i: int, values: list[float], rate: float) -> None:
        if not self.ctx.is_main:
            return
        means = dict(zip(TERMS, values[: len(TERMS)]))
        shown = {"loss": means["loss"], "bce": means["bce"]}
        if self.args.method == "mskd":
            shown.update(lsd=means["lsd"], rsd=means["rsd"], ssd=means["ssd"])
        text = " ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" {rate:.1f} img/s"
        if values[-1]:
            text += f" skipped {int(values[-1])}"
        if bar is not None:
            bar.set_postfix_str(text, refresh=True)
        else:
            self._say(f"epoch {epoch + 1} step {i + 1}/{self.steps_per_epoch}: {text}")

    def _print_header(self) -> None:
        a = self.args
        if not self.ctx.is_main:
            return
        lines = [
            f"mskd_fast.train: {a.method} | {a.model} ({self.init_note}) | {a.dataset}, {self.num_classes} classes",
            f"  train {self.train_index.summary()}",
            f"  eval  {self.eval_index.summary()}",
            f"  device {self.device} x{self.ctx.world_size} | loader {self.loader_backend} | img {a.img_size}px | "
            f"batch {a.batch_size}/process | epochs {a.epochs} x {self.steps_per_epoch} steps | "
            f"lr {a.lr} (backbone x{a.lr_backbone_mult}) {a.sched} warmup {a.warmup_epochs} | "
            f"amp {self.amp_dtype and str(self.amp_dtype).removeprefix('torch.')} | compile {a.compile} | "
            f"channels_last {a.channels_last}",
        ]
        if a.method == "mskd":
            lines.append(f"  MSKD recipe {a.recipe}: MBD form {a.mbd_form}, R-SD teacher scale {a.rsd_teacher_scale} | "
                         f"S={a.crops} {a.crop_mode} crops, T={a.temperature} omega={a.omega} "
                         f"gamma+={a.gamma_pos} gamma-={a.gamma_neg} layers={a.gp_layers} iota={a.iota} "
                         f"kappa={a.kappa} lambda={a.lam} | L-SD {not a.no_lsd} R-SD {not a.no_rsd} "
                         f"S-SD {not a.no_ssd} MBD {not a.no_mbd}")
        for note in self.notes:
            lines.append(f"  chosen: {note}")
        if self.epoch or self.step_in_epoch:
            lines.append(f"  resuming at epoch {self.epoch + 1} step {self.step_in_epoch} "
                         f"(S-SD state {'restored' if self.step.q_prev is not None else 'absent'})")
        lines.append(f"  output {self.out_dir}")
        self._say("\n".join(lines))

    def _final_summary(self) -> None:
        if not self.ctx.is_main:
            return
        from mskd_fast.reports import format_table

        rows = [[r["epoch"], r["loss"], r["bce"], r["lsd"], r["rsd"], r["ssd"], r["img_s"], r["mAP"], r["OF1"],
                 r["CF1"], r["nonfinite_skipped"]] for r in self.history]
        table = format_table(rows, ["epoch", "loss", "bce", "lsd", "rsd", "ssd", "img/s", "mAP", "OF1", "CF1",
                                    "skipped"])
        last = self.history[-1]
        from mskd_fast.reports import format_metrics

        best = (f"best mAP {self.best['mAP']:.2f} at epoch {self.best['epoch']}"
                if self.best["epoch"] is not None else "no evaluation")
        self._say(f"\n{table}\n\nfinal: {format_metrics(last)}\n{best} | wall time "
                  f"{time.time() - self.t_start:.0f}s | outputs in {self.out_dir}")
        collapsed = [r["epoch"] for r in self.history if r.get("collapse")]
        if collapsed:
            from mskd_fast.collapse import advice, collapse_reasons

            now = collapse_reasons(last)
            state = ("the final model: " + "; ".join(now)) if now else "the final epoch shows no sign, but check it"
            self._say(f"WARNING: this run collapsed (signs at epoch{'s' if len(collapsed) > 1 else ''} "
                      f"{', '.join(map(str, collapsed))}; {state}); its metrics describe a degenerate model. "
                      f"{advice(self.args)}. See summary.csv (top1_mode_frac, max_abs_logit, bce_rise, collapse) "
                      "and docs/TRAINING.md.")


# ---------------------------------------------------------------------------------------------- entry point
SETUP_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)


def _merge_resume_args(args: argparse.Namespace, explicit: set[str], blob: dict) -> argparse.Namespace:
    saved = blob["args"]
    conflicts = []
    for key in sorted(explicit):
        if key in RESUME_OVERRIDABLE or key not in saved:
            continue
        if getattr(args, key) != saved[key]:
            conflicts.append(f"--{key.replace('_', '-')} {getattr(args, key)!r} (checkpoint: {saved[key]!r})")
    if conflicts:
        raise SetupError("--resume continues the checkpoint's run with its settings; these flags differ: "
                         + "; ".join(conflicts) + " (only " + ", ".join(sorted(RESUME_OVERRIDABLE))
                         + " may change)")
    merged = argparse.Namespace(**saved)
    if "recipe" not in saved:  # written before the recipes existed: those runs used the paper's equations
        merged.recipe, merged.mbd_form, merged.rsd_teacher_scale = "paper", "paper", "none"
    for key in RESUME_OVERRIDABLE:
        if key in explicit or key == "resume":
            setattr(merged, key, getattr(args, key))
    for key, value in vars(args).items():  # flags added after the checkpoint was written
        if not hasattr(merged, key):
            setattr(merged, key, value)
    return merged


def main(argv=None) -> int:
    """Entry point of ``python -m mskd_fast.train`` / ``mskd-train``; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    try:
        blob = None
        if args.resume:
            blob = load_checkpoint(args.resume, require=("model", "optimizer", "scheduler", "step_state", "rng",
                                                         "args", "meta", "epoch", "history"))
            args = _merge_resume_args(args, explicit, blob)
            notes = ["settings of the resumed run (args.yaml of the checkpoint)"]
            device = resolve_device(args.device)
        else:
            device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
            notes = resolve_defaults(args, explicit, on_cuda=device.type == "cuda")
        validate(args)
    except SETUP_ERRORS as exc:
        parser.error(str(exc))
    ctx = init_distributed(args.device)
    try:
        try:
            trainer = Trainer(args, ctx, notes, blob)
        except SETUP_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        code = trainer.fit()
        barrier(ctx)
        return code
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
