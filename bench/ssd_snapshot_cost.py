"""What MSKD's S-SD parameter snapshot costs against the look-ahead it replaced (time per step, memory).

``python bench/ssd_snapshot_cost.py [--ref COMMIT]`` runs, in separate processes and interleaved rounds, the full
training step (forward, backward, clipping, fused SGD; bf16 autocast, eager) of:

* ``snapshot``: this checkout's ``TrainStep`` around :class:`mskd_fast.MSKD` (S-SD teacher = a copy of the
  parameters and floating buffers from before the last update, one copy per update, a separate no-grad forward
  of the ``B`` images through it);
* ``look-ahead``: ``mskd_fast/step.py`` of ``--ref`` (default ``448b3c5``, the last commit with it), read with
  ``git show``: the next batch's S-SD logits computed one step early, fused into the crop teacher forward.

Both with every MSKD term on and the same model, batches and settings. Reports the median step time over
``--rounds`` rounds of ``--steps`` steps, the ratio, each process's peak RSS (``ru_maxrss``) and the bytes the
snapshot holds (two copies) next to the model's. Timing on a shared machine is noisy: rounds alternate between
the two variants, and the median is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _old_step_module(ref: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "-C", root, "show", f"{ref}:mskd_fast/step.py"], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("lookahead_step", fh.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lookahead_step"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    os.unlink(fh.name)
    return module


def _model(args):
    from mskd_fast.models import create_model

    torch.manual_seed(0)
    model, _ = create_model(args.model, args.classes)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    return model


def _batches(args):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(args.batch, args.classes, generator=g) < 0.15).float()
        y[:, 0] = 1
        out.append((x, y))
    return out


def _make(variant: str, args):
    from mskd_fast.step import build_optimizer

    model = _model(args)
    opt = build_optimizer(model, 0.01)
    if variant == "snapshot":
        from mskd_fast import MSKD
        from mskd_fast.step import StepConfig, TrainStep

        mskd = MSKD(model, recipe="stable", generator=torch.Generator().manual_seed(2), channels_last=True)
        step = TrainStep(mskd, opt, None, StepConfig(amp_dtype=torch.bfloat16))
        return step, mskd, (lambda x, y, x_next: step(x, y))
    from mskd_fast.losses import MSKDLoss
    from mskd_fast.models import eval_twin

    old = _old_step_module(args.ref)
    config = old.StepConfig(amp_dtype=torch.bfloat16, channels_last=True)
    loss = MSKDLoss(recipe="stable")
    step = old.TrainStep(model, eval_twin(model), loss, opt, None, config, torch.Generator().manual_seed(2))
    return step, None, (lambda x, y, x_next: step(x, y, x_next))


def _worker(variant: str, args) -> dict:
    torch.set_num_threads(args.threads)
    step, mskd, call = _make(variant, args)
    batches = _batches(args)
    for i in range(args.warmup):
        call(*batches[i % 2], batches[(i + 1) % 2][0])
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for i in range(args.steps):
            out = call(*batches[i % 2], batches[(i + 1) % 2][0])
        times.append((time.perf_counter() - t0) / args.steps)
        assert out["ssd"] != 0
    model_bytes = sum(t.numel() * t.element_size() for t in step.model.state_dict().values())
    result = {"times": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "model_mib": model_bytes / 2**20}
    if mskd is not None:
        result["snapshot_mib"] = 2 * mskd.snapshot.nbytes() / 2**20
        t0 = time.perf_counter()
        for _ in range(20):
            mskd.snapshot._copy_live(mskd.snapshot.pending)
        result["copy_ms"] = (time.perf_counter() - t0) / 20 * 1e3
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5, help="rounds per variant (interleaved, one process each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ref", default="448b3c5", help="commit whose step.py has the look-ahead")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return 0
    results = {"snapshot": [], "look-ahead": []}
    extra = {}
    base = [sys.executable, os.path.abspath(__file__)] + [a for a in (argv or sys.argv[1:])]
    for _ in range(args.rounds):
        for variant in results:
            cmd = base + ["--worker", variant, "--rounds", "1"]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            results[variant].append(out["times"][0])
            extra.setdefault(variant, []).append(out)
    med = {v: statistics.median(t) for v, t in results.items()}
    cpu = "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else "?"
    print(f"{args.model} B{args.batch} {args.size}px C{args.classes} S4 bf16 eager, {args.threads} thread(s), "
          f"{os.cpu_count()} cores ({cpu})")
    for variant, t in med.items():
        rss = max(o["peak_rss_mib"] for o in extra[variant])
        print(f"  {variant:10s} median {t * 1e3:8.1f} ms/step over {len(results[variant])} rounds "
              f"(min {min(results[variant]) * 1e3:.1f}, max {max(results[variant]) * 1e3:.1f}); peak RSS {rss:.0f} MiB")
    snap = extra["snapshot"][0]
    print(f"  snapshot / look-ahead time: {med['snapshot'] / med['look-ahead']:.3f}; snapshot holds "
          f"{snap['snapshot_mib']:.1f} MiB (two copies of the {snap['model_mib']:.1f} MiB model state); "
          f"one refresh copy {statistics.median(o['copy_ms'] for o in extra['snapshot']):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
