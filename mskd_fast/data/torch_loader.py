"""Torch fallback loader: :func:`mskd_fast.data.decode.decode_rgb8` + ``transforms.v2`` in a multi-worker DataLoader.

Every image is decoded to 8-bit RGB with its EXIF orientation applied, whatever its bit depth (16-bit PNGs
are scaled as DALI scales them), so both loaders see the same pixels.

Training transform (per image, uint8 CHW): ``RandomResizedCrop(img_size, scale=crop_scale,
ratio=crop_ratio)``, ``RandomHorizontalFlip``, ``RandAugment(num_ops, magnitude, fill=128)``.
Evaluation: resize to ``img_size x img_size`` in float with DALI's filter
(:mod:`mskd_fast.data.resize`), so both loaders evaluate on the same pixels. Then ImageNet
normalisation: in the workers when the output device is the CPU, else on the device (training
batches cross as uint8, 4x fewer bytes to copy; evaluation batches as float 0..255).

Sharding and order follow :mod:`mskd_fast.data.plan`, exactly as in the DALI loader: a batch
sampler (in the main process) yields ``(sample index, sample id)`` pairs, so evaluation padding
rows (id ``-1``, image of sample 0) never duplicate a counted sample.

Augmentation is reproducible: each sample's transform runs right after ``torch.manual_seed`` with
a seed drawn from ``(seed, epoch, shard_id)`` for its position in the epoch, so a batch depends
on ``(seed, epoch, shard, batch index)`` only, not on the number of workers or on what ran before
(a resumed run sees the very batches of an uninterrupted one). With ``num_workers=0`` the work
runs under ``torch.random.fork_rng``, so the caller's global RNG is untouched.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .base import IMAGENET_MEAN, IMAGENET_STD, Loader, LoaderOptions
from .decode import decode_rgb8
from .images import BadImage
from .index import DatasetIndex, ImageDecodeError
from .plan import eval_shard, train_shard
from .resize import resize_image


def build_transform(options: LoaderOptions, normalize: bool) -> v2.Compose:
    """The per-image transform for ``options`` (uint8 CHW in; float32 normalised or uint8 out)."""
    o = options
    if o.train:
        steps = [
            v2.RandomResizedCrop(o.img_size, scale=o.crop_scale, ratio=o.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if o.randaugment and o.randaugment_ops > 0:
            steps.append(v2.RandAugment(num_ops=o.randaugment_ops, magnitude=o.randaugment_magnitude, fill=128))
        if normalize:
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    else:  # float 0..255, the very pixels DALI's eval pipeline produces (mskd_fast.data.resize)
        steps = [EvalResize(o.img_size)]
        if normalize:
            steps.append(v2.Normalize([255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]))
    return v2.Compose(steps)


class EvalResize:
    """``(C, H, W)`` uint8 -> ``(C, size, size)`` float32 in 0..255 with :func:`mskd_fast.data.resize.resize_image`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return resize_image(image, self.size)


class _ImageFiles(Dataset):
    """Decodes ``paths[i]`` for an item ``(i, sample_id, seed)``; returns ``(image, sample_id, failure)``.

    A file that cannot be decoded does not raise here (in a worker process the exception would reach the
    main process as a bare text): it gives a grey stand-in image and ``failure = "PATH\tREASON"`` (else
    ``""``), and the loader decides in the main process (``on_bad_image``).
    """

    def __init__(self, paths: list[str], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int, int]):
        i, sample_id, aug_seed = item
        path = self.paths[i]
        failure = ""
        try:
            image = decode_rgb8(path)
        except BadImage as exc:
            image, failure = torch.full((3, 8, 8), 128, dtype=torch.uint8), f"{path}\t{exc.detail}"
        torch.manual_seed(aug_seed)
        return self.transform(image), sample_id, failure


class _PlanBatches:
    """Batch sampler over the current epoch's plan: lists of ``(sample index, sample id, augmentation seed)``.

    It holds the plan itself (set by the loader before each epoch), not the loader: a reference
    cycle through the DataLoader would leave its worker shutdown to the garbage collector, which
    then waits out the join timeouts.
    """

    def __init__(self, batch_size: int, num_batches: int):
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.plan = None
        self.seeds = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        bs = self.batch_size
        for b in range(self.num_batches):
            ids = self.plan[b * bs : (b + 1) * bs].tolist()
            seeds = self.seeds[b * bs : (b + 1) * bs].tolist()
            yield [(max(s, 0), s, seed) for s, seed in zip(ids, seeds)]


def _worker_init(_worker_id: int) -> None:
    """One intra-op thread per worker; stop signals are left to the main process.

    Ctrl-C in a terminal, or ``torchrun`` forwarding it, signals the whole process group, workers included.
    A worker that died of it would end the main process's next fetch with an error at a step that differs
    between DDP ranks; ignoring the signal here lets the trainer stop where it decides (after the step, or
    at the log interval all ranks agree on). Workers still end with the main process (the DataLoader's
    watchdog) and on its shutdown.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader(Loader):
    """The torch DataLoader backend (see the module docstring)."""

    backend = "torch"

    def __init__(self, index: DatasetIndex, options: LoaderOptions):
        super().__init__(index, options)
        self._normalize_in_workers = options.device.type == "cpu"
        self._batches = _PlanBatches(options.batch_size, len(self))
        workers = options.num_workers
        self._dataloader = DataLoader(
            _ImageFiles(index.paths, build_transform(options, self._normalize_in_workers)),
            batch_sampler=self._batches,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=options.device.type == "cuda",
            worker_init_fn=_worker_init if workers > 0 else None,
            generator=torch.Generator().manual_seed(options.seed),
        )
        mean = torch.tensor(IMAGENET_MEAN, device=options.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=options.device).view(1, 3, 1, 1) * 255
        self._mean, self._inv_std = mean, 1.0 / std

    def _plan_for(self, epoch: int):
        o, n = self.options, len(self.index)
        if o.train:
            return train_shard(n, o.shard_id, o.num_shards, o.seed, epoch)
        return eval_shard(n, o.shard_id, o.num_shards)

    def __iter__(self):
        epoch = self._take_epoch()
        o = self.options
        plan = self._plan_for(epoch)
        self._batches.plan = plan
        self._batches.seeds = np.random.default_rng([o.seed, epoch, o.shard_id, 0xA06]).integers(0, 2**62, len(plan))
        batches = iter(self._dataloader)
        self.skipped_ids = set()
        for _ in range(len(self)):
            if o.num_workers == 0:
                with torch.random.fork_rng(devices=[]):
                    images, ids, failures = next(batches)
            else:
                images, ids, failures = next(batches)
            if any(failures):
                images, ids = self._leave_out(images, ids, failures)
            ids = ids.to(o.device, non_blocking=True)
            if not self._normalize_in_workers:
                images = images.to(o.device, non_blocking=True).float().sub_(self._mean).mul_(self._inv_std)
            yield self.finish_images(images), self.targets_for(ids), ids

    def _leave_out(self, images: torch.Tensor, ids: torch.Tensor, failures: list[str]):
        """Rows whose image could not be decoded: raise, or drop them (training) / make them padding (eval)."""
        bad = [k for k, failure in enumerate(failures) if failure and int(ids[k]) >= 0]  # padding rows: no sample
        for k in bad:
            path, _, detail = failures[k].partition("\t")
            self.bad_image(int(ids[k]), path, detail)
        if not self.options.train:
            ids = ids.clone()
            ids[bad] = -1
            return images, ids
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[[k for k, failure in enumerate(failures) if failure]] = False
        if not keep.any():
            raise ImageDecodeError(failures[0].partition("\t")[0], "every image of this training batch failed to "
                                   "decode (--on-bad-image skip cannot leave a batch empty)")
        return images[keep], ids[keep]

    def close(self) -> None:
        """Shut the worker processes down now (they are also shut down when the loader is deleted)."""
        iterator = getattr(self._dataloader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._dataloader._iterator = None
