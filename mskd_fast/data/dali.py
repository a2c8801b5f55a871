"""NVIDIA DALI loader: ``fn.readers.file`` + decode + augment, on the GPU (``mixed``) or all on the CPU.

Training graph: ``readers.file(files, labels=sample index, shard_id, num_shards, pad_last_batch)``
-> ``decoders.image_random_crop`` (random resized crop fused into the decode; ``device="mixed"``
on a GPU, ``"cpu"`` otherwise) -> ``resize`` to ``img_size`` -> ``auto_aug.rand_augment`` (n, m,
fill 128) -> ``crop_mirror_normalize`` (random horizontal flip, ImageNet normalisation, fp16 or
fp32 output, ``CHW`` or ``HWC`` layout) with ``LastBatchPolicy.DROP``.
Evaluation graph: ``decoders.image`` -> ``resize`` -> ``crop_mirror_normalize``, with
``pad_last_batch=True`` and ``LastBatchPolicy.PARTIAL``.

Order and sharding (:mod:`mskd_fast.data.plan`): the file list given to the reader is the global
order of the epoch (training: a permutation drawn from ``(seed, epoch)``; evaluation: ids padded
per shard with ``-1``), and the reader's own ``shard_id``/``num_shards`` cut it into the same
equal contiguous chunks the torch loader reads. Because the reader fixes its file list when the
pipeline is built, the training pipeline is rebuilt for each epoch (about 0.7 s of graph
construction with RandAugment); the evaluation pipeline is built once. The reader's labels are
positions in that list; the sample ids and multi-hot targets are then gathered on the device.

bf16 output: DALI has no bfloat16, so the pipeline emits fp32 and the batch is cast on the device.
``channels_last``: the pipeline emits ``HWC``, and the (B, H, W, 3) batch viewed as (B, 3, H, W) is
channels_last without a copy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import numpy as np
import torch

from .base import IMAGENET_MEAN, IMAGENET_STD, Loader, LoaderOptions
from .index import DatasetIndex
from .plan import eval_order, train_order

DECODE_DEVICES = ("mixed", "cpu")


@functools.lru_cache(maxsize=1)
def dali_import_error() -> str | None:
    """``None`` if DALI (and its PyTorch plugin) can be imported, else the reason it cannot."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
        from nvidia.dali.auto_aug import rand_augment  # noqa: F401
    except Exception as exc:  # any failure (missing wheel, CUDA libraries) means: no DALI
        return f"{type(exc).__name__}: {exc}"
    return None


def _define_pipeline(options: LoaderOptions, decode_device: str, files: list[str], labels: list[int], seed: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.auto_aug import rand_augment

    o = options
    size = o.img_size
    out_dtype = types.FLOAT16 if o.dtype == torch.float16 else types.FLOAT
    layout = "HWC" if o.channels_last else "CHW"
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]

    @pipeline_def(enable_conditionals=o.train and o.randaugment and o.randaugment_ops > 0)
    def graph():
        encoded, positions = fn.readers.file(
            files=files,
            labels=labels,
            shard_id=o.shard_id,
            num_shards=o.num_shards,
            random_shuffle=False,
            pad_last_batch=True,
            name="Reader",
        )
        if o.train:
            images = fn.decoders.image_random_crop(
                encoded,
                device=decode_device,
                output_type=types.RGB,
                random_area=list(o.crop_scale),
                random_aspect_ratio=list(o.crop_ratio),
                num_attempts=10,
            )
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
            if o.randaugment and o.randaugment_ops > 0:
                images = rand_augment.rand_augment(
                    images, n=o.randaugment_ops, m=o.randaugment_magnitude, shape=[size, size], fill_value=128
                )
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, dtype=out_dtype, output_layout=layout, mean=mean, std=std, mirror=mirror
        )
        return images, positions

    device_id = None
    if decode_device == "mixed":
        device_id = o.device.index if o.device.index is not None else torch.cuda.current_device()
    pipe = graph(
        batch_size=o.batch_size,
        num_threads=max(1, o.num_workers),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe


@contextlib.contextmanager
def _quiet_dali_deprecations():
    """Drop the DeprecationWarnings DALI raises about its own aliases while tracing a graph.

    ``auto_aug.rand_augment`` calls ``fn.experimental.filter``/``equalize``, which DALI itself
    deprecates, and DALI forces such warnings on with ``simplefilter("default")``, so a filter
    cannot silence them; a ``showwarning`` hook that drops exactly those can.
    """
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DeprecationWarning) and os.path.join("nvidia", "dali") in filename:
                return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


class DaliLoader(Loader):
    """The DALI backend (see the module docstring). ``decode_device`` is ``"mixed"`` or ``"cpu"``."""

    def __init__(self, index: DatasetIndex, options: LoaderOptions, decode_device: str):
        if decode_device not in DECODE_DEVICES:
            raise ValueError(f"decode_device must be one of {DECODE_DEVICES}, got {decode_device!r}")
        reason = dali_import_error()
        if reason is not None:
            raise ImportError(f"the DALI loader needs nvidia-dali: {reason}")
        super().__init__(index, options)
        self.decode_device = decode_device
        self.backend = f"dali-{decode_device}"
        self._pipe = self._iterator = None
        self._exhausted = False
        if not options.train:
            order = eval_order(len(index), options.num_shards)
            self._eval_files = [index.paths[max(int(i), 0)] for i in order]
            self._position_ids = torch.from_numpy(order).to(options.device)

    def _release(self) -> None:
        self._iterator = self._pipe = None

    def close(self) -> None:
        """Drop the DALI pipeline and its threads (rebuilt on the next iteration)."""
        self._release()
        self._exhausted = False

    def _start(self, epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        o = self.options
        self._release()
        if o.train:
            order = train_order(len(self.index), o.num_shards, o.seed, epoch)
            files = [self.index.paths[i] for i in order]
            labels = order.tolist()
            seed = int(np.random.SeedSequence([o.seed, epoch, o.shard_id]).generate_state(1)[0] & 0x7FFFFFFF)
        else:
            files, labels, seed = self._eval_files, list(range(len(self._eval_files))), o.seed
        with _quiet_dali_deprecations():
            self._pipe = _define_pipeline(o, self.decode_device, files, labels, seed)
            self._iterator = DALIGenericIterator(
                self._pipe,
                ["images", "positions"],
                reader_name="Reader",
                last_batch_policy=LastBatchPolicy.DROP if o.train else LastBatchPolicy.PARTIAL,
                auto_reset=False,
            )
        if len(self._iterator) != len(self):
            raise RuntimeError(f"DALI iterator has {len(self._iterator)} batches, the plan {len(self)}")

    def __iter__(self):
        o = self.options
        epoch = self._take_epoch()
        if o.train or self._iterator is None or not self._exhausted:
            self._start(epoch)
        else:
            self._iterator.reset()
        self._exhausted = False
        for batch in self._iterator:
            images = batch[0]["images"]
            positions = batch[0]["positions"].view(-1).to(o.device, non_blocking=True).long()
            ids = positions if o.train else self._position_ids[positions]
            if o.channels_last:
                images = images.permute(0, 3, 1, 2)
            yield self.finish_images(images), self.targets_for(ids), ids
        self._exhausted = True
        if o.train:
            self._release()
