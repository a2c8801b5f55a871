"""What both loaders share: the options, the batch contract and the device-side label table.

A loader yields ``(images, targets, sample_ids)``:

* ``images`` (B, 3, img_size, img_size) ImageNet-normalised, in ``dtype`` on ``device``
  (``channels_last`` memory format if asked);
* ``targets`` (B, C) float32 on ``device``: the multi-hot rows of the batch's samples (zeros for
  padding rows);
* ``sample_ids`` (B,) int64 on ``device``: row indices into the :class:`DatasetIndex`, ``-1`` for
  evaluation padding rows.

Targets are gathered on the device from a table of all label rows (one extra zero row, which
index ``-1`` selects), so no label crosses the host per batch.

An image that passed the start check but cannot be decoded when a loader meets it (``on_bad_image``):
``"error"`` raises :class:`mskd_fast.data.index.ImageDecodeError` naming the file; ``"skip"`` leaves the
sample out where it is met: a training batch is one row shorter, an evaluation sample becomes a padding
row (id ``-1``, not counted). Skipped samples are recorded in ``decode_failures`` (path -> reason, over
the loader's life) and ``skipped_ids`` (sample ids left out by the current or last pass), and each
file is reported once on stderr (``warning: skipped PATH ...``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .index import ON_BAD_IMAGE, DatasetIndex, ImageDecodeError
from .plan import check_shard, num_batches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoaderOptions:
    """Validated arguments of :func:`mskd_fast.data.build_loader` (see there for their meaning)."""

    train: bool
    batch_size: int
    img_size: int
    num_workers: int = 2
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    device: torch.device = torch.device("cpu")
    randaugment: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    on_bad_image: str = "error"

    def __post_init__(self):
        for name in ("batch_size", "img_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        check_shard(self.shard_id, self.num_shards)
        if self.dtype not in OUTPUT_DTYPES:
            raise TypeError(f"dtype must be one of {OUTPUT_DTYPES}, got {self.dtype!r}")
        if not 0 <= self.randaugment_magnitude <= 30 or self.randaugment_ops < 0:
            raise ValueError(
                f"randaugment_magnitude must be in [0, 30] and randaugment_ops >= 0, got "
                f"{self.randaugment_magnitude}, {self.randaugment_ops}"
            )
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {self.on_bad_image!r}")


class Loader:
    """Base of the DALI and torch loaders: epoch bookkeeping, ``len``, and the device label table.

    ``set_epoch(e)`` fixes the epoch of the next iteration (the training order and augmentation
    depend on ``(seed, epoch)``); each iteration then advances it by one, so a loop that never
    calls ``set_epoch`` still reshuffles.
    """

    backend = "base"

    def __init__(self, index: DatasetIndex, options: LoaderOptions):
        index.check()
        self.index = index
        self.options = options
        self._next_epoch = 0
        self.decode_failures: dict[str, str] = {}
        self.skipped_ids: set[int] = set()
        n, per_shard = len(index), len(index) // options.num_shards
        if options.train and per_shard < options.batch_size:
            raise ValueError(
                f"batch_size {options.batch_size} is larger than the {per_shard} training samples per shard "
                f"({n} samples over {options.num_shards} shards): no full batch to train on"
            )
        table = torch.zeros((n + 1, index.num_classes), dtype=torch.float32)
        table[:n] = torch.from_numpy(index.labels).float()
        self._targets = table.to(options.device)

    def bad_image(self, sample_id: int, path: str, detail: str) -> None:
        """A sample that cannot be decoded: raise (``on_bad_image="error"``) or record it and warn once."""
        if self.options.on_bad_image == "error":
            raise ImageDecodeError(path, detail)
        self.skipped_ids.add(int(sample_id))
        if path not in self.decode_failures:
            self.decode_failures[path] = detail
            o = self.options
            where = f"{'training' if o.train else 'evaluation'}" + (f", shard {o.shard_id}" if o.num_shards > 1 else "")
            print(f"warning: skipped {path}: {detail} (--on-bad-image skip; {len(self.decode_failures)} image(s) "
                  f"skipped so far in {where})", file=sys.stderr, flush=True)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (order and augmentation are functions of (seed, epoch))."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._next_epoch = epoch

    def _take_epoch(self) -> int:
        epoch = self._next_epoch
        self._next_epoch += 1
        return epoch

    def __len__(self) -> int:
        o = self.options
        return num_batches(o.train, len(self.index), o.batch_size, o.num_shards)

    @property
    def num_samples(self) -> int:
        """Real (non-padding) samples this shard yields per epoch."""
        o = self.options
        n = len(self.index)
        if o.train:
            return (n // o.num_shards) // o.batch_size * o.batch_size
        per_shard = -(-n // o.num_shards)
        return max(0, min(n, (o.shard_id + 1) * per_shard) - o.shard_id * per_shard)

    def targets_for(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 label rows for ``sample_ids`` (B,) int64 on the device; ``-1`` gives zeros."""
        return self._targets[sample_ids]

    def finish_images(self, images: torch.Tensor) -> torch.Tensor:
        """Move a normalised (B, 3, H, W) batch to the device, cast it and set the memory format."""
        o = self.options
        images = images.to(o.device, non_blocking=True).to(o.dtype)
        if o.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes/threads now (the loader can still be iterated again afterwards)."""

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        o = self.options
        return (
            f"{type(self).__name__}(backend={self.backend!r}, {self.index.name}/{self.index.split}, "
            f"train={o.train}, batch_size={o.batch_size}, img_size={o.img_size}, shard={o.shard_id}/{o.num_shards}, "
            f"batches={len(self)})"
        )
