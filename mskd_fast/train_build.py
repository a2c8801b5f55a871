"""What a training run is made of, built and checked before the first step (:func:`build_run`).

Data (indices and loaders), the model (timm backbone + MSKD head, weights from ``--pretrained``,
``--initial-checkpoint`` or the resumed checkpoint), the method object (:class:`mskd_fast.MSKD` for ``mskd``,
:class:`mskd_fast.mskd.VanillaBCE` for ``vanilla``, :mod:`mskd_fast.methods` otherwise), fused SGD, the per-step LR
schedule and the :class:`mskd_fast.step.TrainStep`. Every one of these can fail with a clear message (a
``ValueError`` subclass, :class:`SetupError`, or the error of the part that failed) before anything is written.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from mskd_fast.distributed import DistContext

__all__ = ["RunParts", "SetupError", "build_method_object", "build_run"]


class SetupError(ValueError):
    """A flag, file or dataset problem found before training starts."""


@dataclass
class RunParts:
    """The pieces of a run (see the module docstring); the trainer holds them as its attributes."""

    train_index: object
    eval_index: object
    num_classes: int
    amp_dtype: torch.dtype | None
    loader_backend: str
    train_loader: object
    eval_loader: object
    steps_per_epoch: int
    model: torch.nn.Module          # the unwrapped MSKDModel
    teacher: torch.nn.Module        # its eval twin (evaluation)
    init_note: str
    box_generator: torch.Generator
    method: object                  # the method object (owns forward + loss)
    terms: tuple
    diag_keys: tuple
    optimizer: torch.optim.Optimizer
    total_steps: int
    scheduler: object
    scaler: object
    step: object                    # mskd_fast.step.TrainStep


def build_method_object(args: argparse.Namespace, train_model, *, num_samples: int, generator: torch.Generator):
    """The method object of ``--method`` for ``train_model`` (the student, DDP-wrapped under DDP)."""
    from mskd_fast.mskd import MSKD, VanillaBCE

    if args.method == "vanilla":
        return VanillaBCE(train_model, recipe=args.recipe, generator=generator)
    if args.method == "mskd":
        return MSKD(train_model, recipe=args.recipe, crops=args.crops, crop_mode=args.crop_mode,
                    crop_area=tuple(args.crop_area),
                    use_lsd=not args.no_lsd, use_rsd=not args.no_rsd, use_ssd=not args.no_ssd,  # recipe terms applied
                    teacher_bn=args.teacher_bn, channels_last=args.channels_last, generator=generator,
                    iota=args.iota, kappa=args.kappa, lam=args.lam, temperature=args.temperature, omega=args.omega,
                    gamma_pos=args.gamma_pos, gamma_neg=args.gamma_neg, layers=args.gp_layers, delta=args.delta,
                    use_mbd=not args.no_mbd, mbd_form=args.mbd_form, rsd_teacher_scale=args.rsd_teacher_scale,
                    lsd_terms=args.lsd_terms, rsd_teacher_reduce=args.rsd_teacher_reduce,
                    rsd_crop_temperature=args.rsd_crop_temperature, backend=args.loss_backend)
    from mskd_fast.methods import build_method

    method = build_method(args.method, train_model, args, num_samples=num_samples, epochs=args.epochs,
                          generator=generator)
    method.sync_gradients()
    return method


def build_run(args: argparse.Namespace, ctx: DistContext, resume_blob: dict | None,
              resume_path: str | None = None) -> RunParts:
    """Build and check every part of a run (``args`` is completed with the dataset's ``num_classes``)."""
    from mskd_fast.data import build_loader, index_from_args, resolve_backend
    from mskd_fast.diagnostics import diagnostic_keys
    from mskd_fast.models import create_model, eval_twin, load_initial_checkpoint
    from mskd_fast.step import StepConfig, TrainStep, build_optimizer, build_scheduler
    from mskd_fast.train_log import terms_for

    device = ctx.device
    # ---- data
    train_index = index_from_args(args, "train")
    eval_index = index_from_args(args, "eval")
    if list(train_index.class_names) != list(eval_index.class_names):
        raise SetupError("train and eval splits have different class lists")
    num_classes = train_index.num_classes
    if args.num_classes is not None and args.num_classes != num_classes:
        raise SetupError(f"--num-classes {args.num_classes} but dataset {args.dataset} has {num_classes} classes")
    args.num_classes = num_classes
    if resume_blob is not None and list(resume_blob["meta"]["class_names"]) != list(train_index.class_names):
        raise SetupError("--resume: the checkpoint was trained on other classes than this dataset has")
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    load_dtype = amp_dtype if (amp_dtype is not None and device.type == "cuda") else torch.float32
    common = dict(img_size=args.img_size, loader=args.loader, num_workers=args.workers, shard_id=ctx.rank,
                  num_shards=ctx.world_size, dtype=load_dtype, channels_last=args.channels_last, device=device,
                  on_bad_image=args.on_bad_image)
    loader_backend = resolve_backend(args.loader, device)
    train_loader = build_loader(train_index, train=True, batch_size=args.batch_size, seed=args.seed,
                                randaugment=args.randaugment, **common)
    eval_loader = build_loader(eval_index, train=False, batch_size=args.batch_size, **common)
    steps_per_epoch = len(train_loader)

    # ---- model: identical init on every rank, then per-rank RNG streams
    torch.manual_seed(args.seed)
    model, init_note = create_model(args.model, num_classes, pretrained=args.pretrained,
                                    allow_random_init=args.allow_random_init, img_size=args.img_size,
                                    roi_mode=args.roi_mode, **args.model_kwargs)
    if args.initial_checkpoint and resume_blob is None:
        init_note = load_initial_checkpoint(model, args.initial_checkpoint)
    if resume_blob is not None:
        model.load_state_dict(resume_blob["model"])
        init_note = f"resumed from {resume_path}"
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = eval_twin(model)
    model.train()
    torch.manual_seed(args.seed + 1000 * ctx.rank + 1)
    box_generator = torch.Generator(device=device)
    box_generator.manual_seed(args.seed * 7919 + 104729 * (ctx.rank + 1))
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = model

    # ---- method, optimizer, schedule, step
    method = build_method_object(args, train_model, num_samples=len(train_index), generator=box_generator)
    optimizer = build_optimizer(model, args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                backbone_lr_mult=args.lr_backbone_mult, extra_params=method.extra_parameters())
    total_steps = steps_per_epoch * args.epochs
    scheduler = build_scheduler(
        optimizer, total_steps=total_steps, warmup_steps=int(round(args.warmup_epochs * steps_per_epoch)),
        sched=args.sched, step_every=max(1, int(round(args.decay_epochs * steps_per_epoch))))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    config = StepConfig(clip_grad=args.clip_grad or None, amp_dtype=amp_dtype)
    step = TrainStep(method, optimizer, scheduler, config, scaler=scaler, compile=args.compile,
                     fullgraph=not ctx.distributed)
    return RunParts(train_index=train_index, eval_index=eval_index, num_classes=num_classes, amp_dtype=amp_dtype,
                    loader_backend=loader_backend, train_loader=train_loader, eval_loader=eval_loader,
                    steps_per_epoch=steps_per_epoch, model=model, teacher=teacher, init_note=init_note,
                    box_generator=box_generator, method=method, terms=terms_for(args.method),
                    diag_keys=diagnostic_keys(("loss", *method.diagnostic_terms)), optimizer=optimizer,
                    total_steps=total_steps, scheduler=scheduler, scaler=scaler, step=step)
