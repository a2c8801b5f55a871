"""Step time of every training method relative to vanilla, same machine, same batch, one run.

Each method gets a full ``TrainStep`` (forward, backward, clipping, fused SGD, the method's after-step hook) on
the same model and batch shape; the methods are timed round-robin (``--rounds`` rounds of ``--steps`` steps each,
after ``--warmup`` steps), so a slow spell of a shared machine hits every method alike; the reported time of a
method is the median over its rounds of the mean step time in the round, and its ratio is that over vanilla's.

Default setting (the CPU entries of docs/PERFORMANCE.md): timm ``resnet10t`` with channels (16, 32, 64, 128) and
stem width 16, 64 x 64 inputs, 20 classes, batch 16, bf16 autocast, eager, channels-last, one intra-op thread.
``mskd`` runs with every term on (``recipe="stable"``: S = 4 crops, S-SD active from the parameter snapshot, two
batches alternating); ``mskd-step`` is the default recipe (``step``: S-SD alone, no crops).

    .venv/bin/python bench/method_step_time.py [--batch 16] [--json out.json]

Prints a markdown table (method, median ms/step, ratio to vanilla, extra forward work). Not a test: timings
never go into tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from mskd_fast.methods import METHODS, build_method
from mskd_fast.models import create_model
from mskd_fast.mskd import MSKD, VanillaBCE
from mskd_fast.step import StepConfig, TrainStep, build_optimizer
from mskd_fast.train_args import build_parser

EXTRA_WORK = {
    "vanilla": "-",
    "mskd-step": "no-grad forward of B images through the S-SD snapshot (one parameter copy per update); "
                 "S-SD loss",
    "mskd": "no-grad teacher forwards of S*B crops and of B images (S-SD snapshot, one parameter copy per "
            "update); crops, ROI pooling, 3 SD losses",
    "tfkd": "none (loss only)",
    "pskd": "bank gather/scatter (N x C)",
    "dlb": "forward/backward of B + B/2 images",
    "ddgsd": "forward/backward of 2B images (+ device view)",
    "uskd": "aux linear head on a middle stage",
    "ud": "none (loss only)",
    "mulsupcon": "no-grad key-encoder forward of B images (+ device view), projection head, queue",
}


def _make_step(name: str, args, classes: int, batch: int, num_samples: int, amp_dtype):
    torch.manual_seed(0)
    model, _ = create_model(args.model, classes, channels=(16, 32, 64, 128), stem_width=16)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    generator = torch.Generator().manual_seed(1)
    if name == "vanilla":
        method = VanillaBCE(model, generator=generator)
    elif name in ("mskd", "mskd-step"):
        method = MSKD(model, recipe="stable" if name == "mskd" else "step", generator=generator)
    else:
        method = build_method(name, model, build_parser().parse_args([]), num_samples=num_samples, epochs=10,
                              generator=generator)
    opt = build_optimizer(model, 0.01, backbone_lr_mult=1.0, extra_params=method.extra_parameters())
    return TrainStep(method, opt, None, StepConfig(amp_dtype=amp_dtype))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp32", action="store_true", help="no autocast (default: bf16 autocast)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    amp_dtype = None if args.fp32 else torch.bfloat16
    names = ["vanilla", "mskd-step", "mskd", *METHODS]
    g = torch.Generator().manual_seed(0)
    batches = []
    for k in range(2):
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(args.batch, args.classes, generator=g) < 0.2).float()
        batches.append((x, y, torch.arange(args.batch) + k * args.batch))
    steps = {name: _make_step(name, args, args.classes, args.batch, 2 * args.batch, amp_dtype) for name in names}
    counter = {name: 0 for name in names}

    def run(name: str, n: int) -> float:
        step = steps[name]
        t0 = time.perf_counter()
        for _ in range(n):
            k = counter[name] % 2
            x, y, ids = batches[k]
            step(x, y, sample_ids=ids, epoch=0)
            counter[name] += 1
        return (time.perf_counter() - t0) / n

    for name in names:
        run(name, args.warmup)
    per_round = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            per_round[name].append(run(name, args.steps))
    median = {name: statistics.median(v) for name, v in per_round.items()}
    cpu = platform.processor() or platform.machine()
    try:
        model_name = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                                    capture_output=True, text=True, check=False).stdout.strip()
        cpu = model_name or cpu
    except OSError:
        pass
    print(f"host: {cpu}; torch {torch.__version__}; {args.threads} thread(s); {args.model} (16,32,64,128) "
          f"{args.size}px B={args.batch} C={args.classes} {'fp32' if args.fp32 else 'bf16 autocast'} eager; "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
    print("| method | median ms/step | spread over rounds (ms) | ratio to vanilla | extra work per step |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        lo, hi = min(per_round[name]) * 1e3, max(per_round[name]) * 1e3
        print(f"| {name} | {median[name] * 1e3:.1f} | {lo:.1f}-{hi:.1f} | {median[name] / median['vanilla']:.2f}x | "
              f"{EXTRA_WORK.get(name, '')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "host": cpu, "torch": torch.__version__,
                       "rounds_s": per_round, "median_s": median}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
