"""Loader throughput: images per second of one epoch, torch DataLoader (baseline) vs DALI (CPU mode).

Dataset: the built-in synthetic dataset at its defaults (1,000 training / 300 test JPEGs of
128 x 128, generated once into the cache), output 128 x 128 float32 NCHW on the CPU, batch 64,
2 workers (torch) or 2 threads (DALI). ``train`` includes random resized crop, flip and
RandAugment(2, 9) (and, for DALI, the per-epoch pipeline rebuild); ``eval`` is resize only.
Each round is one full epoch with the loader already built (worker start-up excluded).
On a CUDA machine the torch loader is also timed with ``device="cuda"`` (uint8 transfer, GPU
normalisation); DALI's GPU path needs DALI installed on that machine.
"""

import pytest
import torch

from mskd_fast.data import SyntheticConfig, build_loader, dali_import_error, load_index

DALI_REASON = dali_import_error()
BATCH, IMG, WORKERS = 64, 128, 2


@pytest.fixture(scope="module")
def synthetic():
    config = SyntheticConfig()
    return {split: load_index("synthetic", None, split, synthetic=config) for split in ("train", "test")}


def _epoch(loader, device):
    n = 0
    for images, _targets, _ids in loader:
        n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "backend, device",
    [
        ("torch", "cpu"),
        pytest.param(
            "dali", "cpu", marks=pytest.mark.skipif(DALI_REASON is not None, reason=f"no DALI: {DALI_REASON}")
        ),
        pytest.param("torch", "cuda", marks=pytest.mark.cuda),
    ],
)
def test_loader_epoch(benchmark, synthetic, backend, device, mode):
    device = torch.device(device)
    train = mode == "train"
    index = synthetic["train" if train else "test"]
    loader = build_loader(index, train=train, batch_size=BATCH, img_size=IMG, loader=backend,
                          num_workers=WORKERS, device=device)  # fmt: skip
    benchmark.group = f"loaders-{mode}"
    images = _epoch(loader, device)  # warm-up: worker start-up, first DALI graph trace
    assert images == loader.num_samples == (len(index) // BATCH * BATCH if train else len(index))
    got = benchmark.pedantic(_epoch, args=(loader, device), rounds=3, iterations=1)
    assert got == images
    loader.close()
    benchmark.extra_info.update(
        baseline=backend == "torch" and device.type == "cpu",
        backend=loader.backend,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        images=images,
    )
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        benchmark.extra_info["images_per_s"] = round(images / benchmark.stats.stats.mean, 1)
