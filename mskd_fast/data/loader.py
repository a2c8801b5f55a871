"""``build_loader``: the one entry point to the loaders, and the one place that picks the backend.

``loader="auto"`` uses DALI when it imports, else the torch loader; ``"dali"`` requires DALI;
``"torch"`` forces the fallback. :func:`dali_decode_device` alone decides whether DALI decodes on
the GPU (``"mixed"``) or runs every operator on the CPU (``"cpu"``, with ``device_id=None``).
"""

from __future__ import annotations

import torch

from .base import Loader, LoaderOptions
from .dali import DaliLoader, dali_import_error
from .index import DatasetIndex
from .torch_loader import TorchLoader

LOADERS = ("auto", "dali", "torch")


def dali_decode_device(device: torch.device | str) -> str:
    """``"mixed"`` (GPU decode, GPU augmentation) when ``device`` is a CUDA device that is present, else ``"cpu"``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return "mixed"
    return "cpu"


def resolve_backend(loader: str, device: torch.device | str) -> str:
    """The backend ``build_loader`` will use: ``"dali-mixed"``, ``"dali-cpu"`` or ``"torch"``."""
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    if loader == "torch":
        return "torch"
    reason = dali_import_error()
    if reason is not None:
        if loader == "dali":
            raise ImportError(f"loader='dali' but DALI cannot be imported ({reason}); use loader='torch' or 'auto'")
        return "torch"
    return f"dali-{dali_decode_device(device)}"


def build_loader(
    index: DatasetIndex,
    *,
    train: bool,
    batch_size: int,
    img_size: int,
    loader: str = "auto",
    num_workers: int = 2,
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    device: torch.device | str = "cpu",
    randaugment: bool = True,
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 9,
    crop_scale: tuple[float, float] = (0.7, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    on_bad_image: str = "error",
) -> Loader:
    """A loader over ``index`` yielding ``(images, targets, sample_ids)`` batches.

    ``images`` (B, 3, img_size, img_size) ImageNet-normalised in ``dtype`` on ``device``
    (channels_last memory format if ``channels_last``); ``targets`` (B, C) float32 on ``device``;
    ``sample_ids`` (B,) int64 on ``device`` (row in ``index``; ``-1`` marks evaluation padding).

    ``train=True``: random resized crop (area fraction ``crop_scale``, aspect ``crop_ratio``),
    horizontal flip and, if ``randaugment``, RandAugment(``randaugment_ops``,
    ``randaugment_magnitude``); order reshuffled per epoch from ``(seed, epoch)``; last partial
    batch dropped. ``train=False``: resize to ``img_size`` x ``img_size``; every sample exactly once
    over the ``num_shards`` shards, padding rows have id ``-1`` and zero targets. ``len(loader)`` is
    the number of batches per epoch (equal on all shards); ``loader.set_epoch(e)`` sets the epoch of
    the next iteration. ``num_workers`` is DataLoader workers (torch) or CPU threads (DALI).

    ``on_bad_image``: what happens to an image that passed the start check but cannot be decoded when it
    is met: ``"error"`` raises :class:`mskd_fast.data.index.ImageDecodeError` naming the file, ``"skip"``
    leaves the sample out (see :mod:`mskd_fast.data.base`).
    """
    device = torch.device(device)
    options = LoaderOptions(
        train=bool(train),
        batch_size=batch_size,
        img_size=img_size,
        num_workers=num_workers,
        shard_id=shard_id,
        num_shards=num_shards,
        seed=seed,
        dtype=dtype,
        channels_last=bool(channels_last),
        device=device,
        randaugment=bool(randaugment),
        randaugment_ops=randaugment_ops,
        randaugment_magnitude=randaugment_magnitude,
        crop_scale=tuple(crop_scale),
        crop_ratio=tuple(crop_ratio),
        on_bad_image=on_bad_image,
    )
    backend = resolve_backend(loader, device)
    if backend == "torch":
        return TorchLoader(index, options)
    return DaliLoader(index, options, decode_device=backend.removeprefix("dali-"))
