"""Benchmark fixtures (pytest-benchmark).

* ``device``: parametrised over ``cpu`` and ``cuda``; CUDA entries skip without a GPU.
* ``bench_run(benchmark, fn, *args)``: times ``fn`` with a device synchronisation inside the
  timed region (CUDA work is asynchronous) and warm-up rounds so compiled and Triton entries are
  measured after compilation. The result is returned for sanity checks.

Entries of one comparison share a benchmark ``group`` so the report can form ratios against the
baseline measured in the same run (see ``bench/report.py``).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NEEDS_CUDA = "needs a CUDA GPU (none on this machine)"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip(NEEDS_CUDA)
    return torch.device(request.param)


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip(NEEDS_CUDA)
    return torch.device("cuda")


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def bench_run():
    def run(benchmark, fn, *args, device="cpu", warmup=3, rounds=None, **extra_info):
        for _ in range(warmup):
            fn(*args)
        synchronize(device)

        def timed():
            out = fn(*args)
            synchronize(device)
            return out

        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        kwargs = {"rounds": rounds, "iterations": 1, "warmup_rounds": 0} if rounds else None
        out = benchmark.pedantic(timed, **kwargs) if kwargs else benchmark(timed)
        benchmark.extra_info["device"] = (
            torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
        )
        if torch.device(device).type == "cuda":
            benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        benchmark.extra_info.update(extra_info)
        return out

    return run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NEEDS_CUDA)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
