"""Trainer step throughput: the MSKD step vs the vanilla (BCE) step vs the "backbone floor", same settings.

Groups (one per setting; entries measured in the same run, ``floor`` is the baseline):

* ``step-resnet34-B64-224-C20-S4-bf16-compiled-cuda`` (the issue's target: MSKD <= 1.15x the floor's
  time, peak memory <= 1.3x vanilla's);
* ``step-resnet10t-B8-64-C20-S4-bf16-eager-cpu`` (a small CPU entry).

Entries (one full optimizer step each: forward, backward, clipping, fused SGD, LR schedule):

* ``vanilla``: ``TrainStep`` with ``method="vanilla"`` (BCE only, no crops, no teacher);
* ``floor``: the vanilla step plus a no-grad eval-mode forward of ``S*B`` crops and of the ``B``
  images (the teacher's work of the MSKD step; done as one forward of ``(S+1)*B`` inputs, its fastest
  form, compiled in the compiled setting). The crops are precomputed, so the floor excludes box sampling,
  ``crop_resize``, ROI pooling, the three self-distillation losses and the look-ahead bookkeeping: the
  MSKD step's overhead over the floor is exactly that;
* ``mskd``: ``TrainStep`` with every term on (S-SD active: ``q_prev`` from the look-ahead).

``extra_info`` records images/s (``B / mean``) and, on CUDA, peak memory (MiB) of the timed rounds.
"""

import pytest
import torch

from mskd_fast.losses import MSKDLoss
from mskd_fast.models import create_model, eval_twin
from mskd_fast.step import StepConfig, TrainStep, build_optimizer

SETTINGS = {
    "cuda": dict(model="resnet34", batch=64, size=224, classes=20, crops=4, compile=True, kwargs={}),
    "cpu": dict(model="resnet10t", batch=8, size=64, classes=20, crops=4, compile=False, kwargs={}),
}


def _make(kind, device, s):
    torch.manual_seed(0)
    model, _ = create_model(s["model"], s["classes"], **s["kwargs"])
    model = model.to(device).to(memory_format=torch.channels_last)
    teacher = eval_twin(model)
    model.train()
    method = "vanilla" if kind in ("vanilla", "floor") else "mskd"
    use = dict(use_lsd=method == "mskd", use_rsd=method == "mskd", use_ssd=method == "mskd")
    config = StepConfig(method=method, crops=s["crops"], amp_dtype=torch.bfloat16, channels_last=True, **use)
    opt = build_optimizer(model, 0.01)
    gen = torch.Generator(device=device).manual_seed(1)
    step = TrainStep(model, teacher, MSKDLoss(**use), opt, None, config, gen, compile=s["compile"])
    return step, teacher


def _inputs(device, s, seed):
    g = torch.Generator().manual_seed(seed)
    b, size, c = s["batch"], s["size"], s["classes"]
    images = torch.randn(b, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(b, c, generator=g) < 0.15).float().to(device)
    targets[:, 0] = 1
    return images, targets


@pytest.mark.parametrize("kind", ["floor", "vanilla", "mskd"])
def test_bench_train_step(benchmark, bench_run, device, kind):
    s = SETTINGS[device.type]
    mode = "compiled" if s["compile"] else "eager"
    benchmark.group = (f"step-{s['model']}-B{s['batch']}-{s['size']}-C{s['classes']}-S{s['crops']}-bf16-{mode}"
                       f"-{device.type}")
    torch._dynamo.reset()
    step, teacher = _make(kind, device, s)
    x1, y1 = _inputs(device, s, 1)
    x2, y2 = _inputs(device, s, 2)
    if kind == "floor":
        crops = torch.randn(s["batch"] * s["crops"], 3, s["size"], s["size"], device=device)
        teacher_in = torch.cat([crops.contiguous(memory_format=torch.channels_last), x1])

        def forward(x):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return teacher(x)

        teacher_fwd = torch.compile(forward, fullgraph=True, dynamic=False) if s["compile"] else forward

        def run():
            teacher_fwd(teacher_in)
            return step(x1, y1, x2)
    else:
        batches = [(x1, y1), (x2, y2)]
        state = {"i": 0}

        def run():  # alternate two batches, each the look-ahead of the other (S-SD stays active)
            i = state["i"]
            state["i"] = 1 - i
            (x, y), (x_next, _) = batches[i], batches[1 - i]
            return step(x, y, x_next)

    out = bench_run(benchmark, run, device=device, warmup=3, kind=kind, batch=s["batch"])
    assert torch.isfinite(out["total"])
    if kind == "mskd":
        assert out["ssd"] != 0  # S-SD was active in the timed steps
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        benchmark.extra_info["images_per_s"] = s["batch"] / benchmark.stats.stats.mean
    benchmark.extra_info["baseline"] = kind == "floor"
