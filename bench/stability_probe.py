"""Stability probe: why does MSKD training from random initialisation collapse on the synthetic data (CPU)?

Two self-contained experiments, neither touching the trainer (see docs/ACCURACY.md, "Stability from random
initialisation"):

``mbd`` (free logits, no network)
    A ``(B, C)`` logit tensor is the only parameter; the teacher is the detached student itself (the limit
    of S-SD, whose teacher ``q_prev`` is the student one step earlier). Reports the logit std, the mean
    positive-minus-negative margin and the BCE over SGD steps for pure MBD (``weight_grad`` False / True),
    for the controls with equal weights (``gamma_pos = gamma_neg = 0``, i.e. KL of the reformulated softmax)
    and softmax KL, and for BCE alone vs BCE plus a scaled self-MBD term (trainer-like ``mean`` reductions).
    A divergence has zero gradient at ``teacher == student``; MBD's weights make it non-zero, so
    self-distillation moves the logits every step.

``bn`` (small network)
    ``resnet10t`` (timm, random init) trained from scratch on in-memory synthetic images with
    ``BCE + lambda * MBD(q, teacher)`` where the teacher is the *same batch, same parameters* forwarded
    either in eval mode (BatchNorm running statistics, as the trainer's teachers) or in train mode (batch
    statistics, no running-statistics update), plus BCE alone, plus an eval-mode teacher with equal weights
    (``gamma_pos = gamma_neg = 0``: KL of the reformulated softmax, driven only by the eval/train difference).
    Reports, over the steps, the std of the student logits, of the eval-mode logits and the BCE. If the
    eval-mode teacher is what destabilises MSKD, the train-mode-teacher run stays close to BCE alone while the
    eval-mode one does not.

Usage::

    python bench/stability_probe.py                  # free logits only (< 1 min on the shared 2-core CPU)
    python bench/stability_probe.py --part bn        # the network part (about 4-5 min on the shared 2-core CPU)
    python bench/stability_probe.py --part both --steps 1000 --lr 20
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mskd_fast.ops import mbd_loss
from mskd_fast.reference import kd_loss

NUM_CLASSES = 20


# ------------------------------------------------------------------------------------------ free logits


def random_targets(gen: torch.Generator, batch: int, classes: int) -> torch.Tensor:
    """``(batch, classes)`` multi-hot targets with 1-3 positives per row."""
    y = torch.zeros(batch, classes)
    for i in range(batch):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        y[i, torch.randperm(classes, generator=gen)[:k]] = 1.0
    return y


def _stats(z: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(logit std, mean over rows of mean positive minus mean negative logit, BCE) of ``z (B, C)``."""
    pos = (z * y).sum(1) / y.sum(1)
    neg = (z * (1 - y)).sum(1) / (1 - y).sum(1)
    bce = F.binary_cross_entropy_with_logits(z, y)
    return float(z.std()), float((pos - neg).mean()), float(bce)


def free_logit_conditions(scale: float) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Name -> loss(z, y) on free logits; "self" terms use ``z.detach()`` as the teacher."""

    def mbd(wg: bool, gp: float = 0.25, gn: float = 1.0):
        return lambda z, y: mbd_loss(z, z.detach(), y, gamma_pos=gp, gamma_neg=gn, weight_grad=wg,
                                     backend="reference")

    def bce(z, y):
        return F.binary_cross_entropy_with_logits(z, y)

    return {
        "MBD self, weights const (default)": mbd(False),
        "MBD self, weight_grad=True": mbd(True),
        "control: MBD with gamma+=gamma-=0 (w=1)": mbd(False, 0.0, 0.0),
        "control: softmax KL self": lambda z, y: kd_loss(z, z.detach()),
        "BCE only": bce,
        f"BCE + {scale:g} x MBD self": lambda z, y: bce(z, y) + scale * mbd(False)(z, y),
        f"BCE + {scale / 10:g} x MBD self": lambda z, y: bce(z, y) + scale / 10 * mbd(False)(z, y),
        f"BCE + {scale:g} x softmax KL self": lambda z, y: bce(z, y) + scale * kd_loss(z, z.detach()),
    }


def run_free_logits(steps: int, batch: int, lr: float, scale: float, seed: int) -> None:
    """Print logit std / margin / BCE at a few checkpoints for each condition of :func:`free_logit_conditions`."""
    gen = torch.Generator().manual_seed(seed)
    y = random_targets(gen, batch, NUM_CLASSES)
    z0 = torch.randn(batch, NUM_CLASSES, generator=gen)
    marks = sorted({0, steps // 10, steps // 4, steps // 2, steps})
    print(f"\n## Part mbd: free logits B={batch} C={NUM_CLASSES}, z0 ~ N(0,1), SGD lr={lr:g}, {steps} steps, "
          "trainer reductions (BCE mean over B*C, MBD mean over B), T=4 omega=0.5 gamma+=0.25 gamma-=1\n")
    print("| condition | |grad| at step 0 | " + " | ".join(f"std@{m}" for m in marks)
          + f" | margin@{steps} | BCE@{steps} |")
    print("|---|---:|" + "---:|" * len(marks) + "---:|---:|")
    for name, loss_fn in free_logit_conditions(scale).items():
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.SGD([z], lr=lr)
        stds, grad0 = {}, float("nan")
        for step in range(steps + 1):
            if step in marks:
                stds[step] = _stats(z.detach(), y)[0]
            if step == steps:
                break
            opt.zero_grad()
            loss_fn(z, y).backward()
            if step == 0:
                grad0 = float(z.grad.norm())
            opt.step()
        _, margin, bce = _stats(z.detach(), y)
        print(f"| {name} | {grad0:.2e} | " + " | ".join(f"{stds[m]:.2f}" for m in marks)
              + f" | {margin:.2f} | {bce:.3f} |")


# ------------------------------------------------------------------------------------------ small network


def synthetic_batch_source(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic images ``(n, 3, size, size)`` normalised to about zero mean / unit std, targets ``(n, C)``."""
    from mskd_fast.data.synthetic import render_image

    rng = np.random.default_rng(seed)
    images, targets = [], torch.zeros(n, NUM_CLASSES)
    for i in range(n):
        img, _, classes = render_image(rng, size)
        images.append(torch.from_numpy(img).permute(2, 0, 1).float())
        targets[i, torch.from_numpy(classes)] = 1.0
    x = torch.stack(images) / 255.0
    return (x - 0.45) / 0.25, targets


def _teacher_logits(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """No-grad logits of ``x``; ``mode='eval'`` uses BN running stats, ``'train'`` batch stats without updating them."""
    with torch.no_grad():
        if mode == "eval":
            model.eval()
            out = model(x)
        else:
            bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
            out = model(x)
            for m, (rm, rv, nb) in zip(bns, saved):
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                m.num_batches_tracked.copy_(nb)
    model.train()
    return out


def run_bn(steps: int, batch: int, size: int, lr: float, lam: float, seed: int, n_images: int) -> None:
    """Train resnet10t from scratch with BCE (+ lam x self-MBD against an eval- or train-mode teacher)."""
    import timm

    x_all, y_all = synthetic_batch_source(n_images, size, seed)
    # name -> (teacher mode or None, gamma used for both gamma+ and gamma- or None for the SPEC defaults)
    variants = {"BCE only": (None, None),
                f"BCE + {lam:g} x MBD, eval-mode teacher": ("eval", None),
                f"BCE + {lam:g} x MBD, train-mode teacher": ("train", None),
                f"BCE + {lam:g} x MBD w=1 (gamma+=gamma-=0), eval-mode teacher": ("eval", 0.0)}
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    print(f"\n## Part bn: resnet10t random init, {n_images} synthetic images at {size} px, batch {batch}, "
          f"SGD lr={lr:g} momentum 0.9 wd 5e-4, no warm-up, {steps} steps; teacher = same batch, same parameters\n")
    print("| run | step | BCE | std student (train-mode) logits | std eval-mode logits | "
          "max abs eval-mode logit | eval/train std ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (mode, gamma) in variants.items():
        gammas = {} if gamma is None else {"gamma_pos": gamma, "gamma_neg": gamma}
        torch.manual_seed(seed)
        model = timm.create_model("resnet10t", pretrained=False, num_classes=NUM_CLASSES)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        perm_gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n_images, generator=perm_gen)
        for step in range(steps):
            start = (step * batch) % n_images
            if start + batch > n_images:
                order = torch.randperm(n_images, generator=perm_gen)
                start = 0
            idx = order[start:start + batch]
            x, y = x_all[idx], y_all[idx]
            # teacher first: restoring the BN statistics in place after the student forward would break backward
            teacher = None if mode is None else _teacher_logits(model, x, mode)
            model.train()
            q = model(x)
            loss = F.binary_cross_entropy_with_logits(q, y)
            if teacher is not None:
                loss = loss + lam * mbd_loss(q, teacher, y, backend="reference", **gammas)
            if step in marks:
                ev = _teacher_logits(model, x, "eval")
                bce = float(F.binary_cross_entropy_with_logits(q.detach(), y))
                s_q, s_e = float(q.detach().std()), float(ev.std())
                print(f"| {name} | {step} | {bce:.3f} | {s_q:.2f} | {s_e:.2f} | {float(ev.abs().max()):.1f} | "
                      f"{s_e / max(s_q, 1e-12):.2f} |")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("mbd", "bn", "both"), default="mbd",
                   help="mbd: free logits (default, < 1 min); bn: small network (minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=200, help="free-logit SGD steps")
    p.add_argument("--batch", type=int, default=64, help="free-logit rows")
    p.add_argument("--lr", type=float, default=30.0, help="free-logit SGD LR (losses are batch means)")
    p.add_argument("--scale", type=float, default=2.0, help="weight of the self-MBD term next to BCE (lambda)")
    p.add_argument("--bn-steps", type=int, default=40)
    p.add_argument("--bn-batch", type=int, default=32)
    p.add_argument("--bn-size", type=int, default=48, help="image size of the bn part")
    p.add_argument("--bn-images", type=int, default=256)
    p.add_argument("--bn-lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "bn_steps", "bn_batch", "bn_size", "bn_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bn_batch > args.bn_images:
        raise ValueError(f"--bn-batch ({args.bn_batch}) must not exceed --bn-images ({args.bn_images})")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    if args.part in ("both", "mbd"):
        run_free_logits(args.steps, args.batch, args.lr, args.scale, args.seed)
    if args.part in ("both", "bn"):
        run_bn(args.bn_steps, args.bn_batch, args.bn_size, args.bn_lr, args.scale, args.seed, args.bn_images)
    print(f"\n(wall {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
