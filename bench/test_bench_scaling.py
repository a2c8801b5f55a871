"""How the trainer step's time and peak memory grow with the batch (B) and the number of crops (S), MSKD vs
vanilla at the same settings (one full optimizer step each: forward, backward, clipping, fused SGD).

Groups (entries of a group are measured in the same run; ``vanilla`` is each group's baseline, so the report's
"speed-up vs baseline" column of an MSKD entry is ``vanilla time / MSKD time``):

* GPU (``resnet34``, 224 px, 20 classes, bf16 autocast, ``torch.compile``): one group per batch
  ``B in (32, 64, 128, 256)`` holding ``vanilla`` and ``mskd-S4``; the ``B=64`` group also holds ``mskd-S2`` and
  ``mskd-S8`` (the crop sweep). Ten compiled steps take several minutes of compilation, more than the benchmark
  step of ``bench/gpu_check.sh`` has, so this sweep is opt-in: ``MSKD_BENCH_SCALING=1``.
* CPU (a narrow ``resnet10t``, 64 px, bf16 autocast, eager, one thread): ``B in (8, 16)`` with ``vanilla`` and
  ``mskd-S4``; the ``B=8`` group also holds ``mskd-S2``.

MSKD entries run with every term on and S-SD active (two batches alternate; the S-SD teacher is the snapshot).
``extra_info``: ``batch``, ``crops``, ``kind``, ``images_per_s`` and, on CUDA, ``peak_mem_mb`` (peak allocated
memory over the timed rounds, model and optimizer state included). CPU peak memory is not measured (the CPU
allocator keeps no statistics). The step is built by ``bench/test_bench_step.py``'s helpers.
"""

import gc
import os

import pytest
import torch
from test_bench_step import _inputs, _make

GPU = dict(model="resnet34", size=224, classes=20, compile=True, kwargs={})
CPU = dict(model="resnet10t", size=64, classes=20, compile=False,
           kwargs=dict(channels=(16, 32, 64, 128), stem_width=16))


def _cases(batches, crops, crop_batch, default_crops=4):
    """(kind, B, S): vanilla + MSKD at the default S for every B, and MSKD at every other S for ``crop_batch``."""
    out = []
    for b in batches:
        out += [("vanilla", b, default_crops), ("mskd", b, default_crops)]
        if b == crop_batch:
            out += [("mskd", b, s) for s in crops if s != default_crops]
    return out


GPU_CASES = _cases((32, 64, 128, 256), (2, 4, 8), crop_batch=64)
CPU_CASES = _cases((8, 16), (2, 4), crop_batch=8)


def _case_id(case):
    kind, b, s = case
    return f"{kind}-B{b}" if kind == "vanilla" else f"{kind}-S{s}-B{b}"


def _measure(benchmark, bench_run, device, base, case):
    kind, batch, crops = case
    s = dict(base, batch=batch, crops=crops)
    mode = "compiled" if s["compile"] else "eager"
    benchmark.group = f"scaling-{s['model']}-{s['size']}px-B{batch:03d}-bf16-{mode}-{device.type}"
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step, _ = _make(kind, device, s)
    batches = [_inputs(device, s, 1), _inputs(device, s, 2)]
    state = {"i": 0}

    def run():  # alternate two batches (S-SD active from the second step on)
        i = state["i"]
        state["i"] = 1 - i
        x, y = batches[i]
        return step(x, y)

    out = bench_run(benchmark, run, device=device, warmup=3, kind=kind, batch=batch,
                    crops=crops if kind == "mskd" else 0)
    assert torch.isfinite(out["total"])
    if kind == "mskd":
        assert out["ssd"] != 0 and out["lsd"] != 0  # S-SD and the crop terms were active in the timed steps
    else:
        assert out["lsd"] == out["rsd"] == out["ssd"] == 0
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain correctness run)
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.mean
    benchmark.extra_info["baseline"] = kind == "vanilla"


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("MSKD_BENCH_SCALING") != "1",
                    reason="GPU scaling sweep: 10 compiled ResNet-34 steps (minutes of compilation); "
                           "opt in with MSKD_BENCH_SCALING=1")
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_bench_scaling_gpu(benchmark, bench_run, cuda_device, case):
    _measure(benchmark, bench_run, cuda_device, GPU, case)


@pytest.fixture
def one_thread():
    """Run CPU entries on one intra-op thread (restored afterwards): on a shared small machine, multi-threaded
    timings swing by an order of magnitude with other processes' load (OpenMP threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_bench_scaling_cpu(benchmark, bench_run, one_thread, case):
    _measure(benchmark, bench_run, torch.device("cpu"), CPU, case)
    benchmark.extra_info["threads"] = one_thread
