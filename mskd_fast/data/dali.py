"""NVIDIA DALI loader: ``fn.readers.file`` + decode + augment, on the GPU (``mixed``) or all on the CPU.

Training runs two pipelines:

* a reader pipeline, ``readers.file(files, labels=sample index, shard_id, num_shards,
  pad_last_batch=True)`` over the epoch's global order (a permutation drawn from ``(seed, epoch)``,
  :mod:`mskd_fast.data.plan`), run for exactly ``len(loader)`` full batches, so the last partial
  batch is dropped. The reader fixes its file list when built, so this small pipeline is rebuilt
  for every epoch (milliseconds);
* a processing pipeline, built once: ``external_source`` (the reader's encoded bytes and sample
  indices) -> ``decoders.image_random_crop`` (random resized crop fused into the decode;
  ``device="mixed"`` on a GPU, ``"cpu"`` otherwise) -> ``resize`` -> ``auto_aug.rand_augment``
  (n, m, fill 128) -> ``crop_mirror_normalize`` (random horizontal flip, ImageNet normalisation,
  fp16 or fp32, ``CHW`` or ``HWC``), iterated with ``LastBatchPolicy.DROP``. Tracing RandAugment's
  conditional graph takes about a second, which is why it is not rebuilt per epoch.

Evaluation runs one pipeline, built once: ``readers.file(pad_last_batch=True)`` over the ids padded
per shard with ``-1`` (``eval_order``) -> ``decoders.image`` -> ``resize`` (float output, no uint8
rounding; the torch loader computes the same pixels, :mod:`mskd_fast.data.resize`) ->
``crop_mirror_normalize``, iterated with ``LastBatchPolicy.PARTIAL``.

In both cases the reader's ``shard_id``/``num_shards`` cut the global list into the same equal
contiguous chunks the torch loader reads, so both loaders visit the same samples in the same
order. The reader's labels are sample indices (training) or list positions (evaluation, mapped to
sample ids with ``-1`` padding); the multi-hot targets are gathered from a table on the device.
Augmentation randomness is seeded from ``(seed, shard_id)`` once and continues across epochs.

Images that cannot be decoded (``on_bad_image``): a DALI decoder error ends the pipeline, so the loader
finds the file(s) among the batches in flight (each decoded alone by a small pipeline with the same
decoder), then raises :class:`mskd_fast.data.index.ImageDecodeError` (``"error"``) or leaves them out
(``"skip"``) and rebuilds its pipelines where the failed batch was: a training sample is dropped from its
batch (the processing pipeline takes variable batches), an evaluation sample becomes a padding row.

bf16 output: DALI has no bfloat16, so the pipeline emits fp32 and the batch is cast on the device.
``channels_last``: the pipeline emits ``HWC``, and the (B, H, W, 3) batch viewed as (B, 3, H, W) is
channels_last without a copy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from collections import deque

import numpy as np
import torch

from .base import IMAGENET_MEAN, IMAGENET_STD, Loader, LoaderOptions
from .index import DatasetIndex, ImageDecodeError
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


def _normalize(images, options: LoaderOptions, mirror):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if options.dtype == torch.float16 else types.FLOAT,
        output_layout="HWC" if options.channels_last else "CHW",
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
        mirror=mirror,
    )


def _reader(files: list[str], labels: list[int], options: LoaderOptions):
    import nvidia.dali.fn as fn

    return fn.readers.file(
        files=files,
        labels=labels,
        shard_id=options.shard_id,
        num_shards=options.num_shards,
        random_shuffle=False,
        pad_last_batch=True,
        name="Reader",
    )


def _device_id(options: LoaderOptions, decode_device: str) -> int | None:
    if decode_device != "mixed":
        return None
    return options.device.index if options.device.index is not None else torch.cuda.current_device()


def reader_pipeline(options: LoaderOptions, files: list[str], labels: list[int]):
    """CPU pipeline emitting ``(encoded file bytes, label)`` batches of ``files`` for this shard."""
    from nvidia.dali import pipeline_def

    @pipeline_def
    def graph():
        encoded, indices = _reader(files, labels, options)
        return encoded, indices

    pipe = graph(batch_size=options.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=2)
    pipe.build()
    return pipe


def train_pipeline(options: LoaderOptions, decode_device: str, source, seed: int):
    """Decode + augment pipeline fed by ``source()`` -> ``(encoded batch, sample-index batch)``."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.auto_aug import rand_augment

    o = options
    use_ra = o.randaugment and o.randaugment_ops > 0

    @pipeline_def(enable_conditionals=use_ra)
    def graph():
        encoded, indices = fn.external_source(
            source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32]
        )
        images = fn.decoders.image_random_crop(
            encoded,
            device=decode_device,
            output_type=types.RGB,
            random_area=list(o.crop_scale),
            random_aspect_ratio=list(o.crop_ratio),
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=o.img_size, resize_y=o.img_size, antialias=True)
        if use_ra:
            images = rand_augment.rand_augment(
                images, n=o.randaugment_ops, m=o.randaugment_magnitude, shape=[o.img_size, o.img_size], fill_value=128
            )
        return _normalize(images, o, fn.random.coin_flip(probability=0.5)), indices

    pipe = graph(
        batch_size=o.batch_size,
        num_threads=max(1, o.num_workers),
        device_id=_device_id(o, decode_device),
        seed=seed,
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe


def eval_pipeline(options: LoaderOptions, decode_device: str, files: list[str]):
    """Reader + decode + resize + normalise pipeline; labels are positions in ``files``."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    o = options

    @pipeline_def
    def graph():
        encoded, positions = _reader(files, list(range(len(files))), o)
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        # float output, no rounding to uint8: the torch loader reproduces exactly this (data/resize.py)
        images = fn.resize(images, resize_x=o.img_size, resize_y=o.img_size, antialias=True, dtype=types.FLOAT)
        return _normalize(images, o, 0), positions

    pipe = graph(
        batch_size=o.batch_size,
        num_threads=max(1, o.num_workers),
        device_id=_device_id(o, decode_device),
        seed=o.seed,
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe


class _EpochBatches:
    """The processing pipeline's source: the current epoch's reader batches, then StopIteration.

    Samples in ``bad`` (sample indices that cannot be decoded, ``on_bad_image="skip"``) are dropped from the
    batches handed on; ``recent`` keeps the sample indices of the last batches handed on (the failed batch
    is among them when the processing pipeline stops on a decode error).
    """

    def __init__(self):
        self.reader = None
        self.remaining = 0
        self.bad: set[int] = set()
        self.recent: deque = deque(maxlen=8)

    def start(self, reader, num_batches: int, discard: int = 0) -> None:
        """Feed ``num_batches`` batches of ``reader``, the first ``discard`` of them read and dropped."""
        for _ in range(discard):
            reader.run()
        self.reader, self.remaining = reader, num_batches - discard
        self.recent.clear()

    def __call__(self):
        if self.remaining <= 0:
            self.reader = None
            raise StopIteration
        self.remaining -= 1
        encoded, indices = self.reader.run()
        ids = indices.as_array().reshape(-1)
        self.recent.append(ids.tolist())
        if self.bad and not self.bad.isdisjoint(ids.tolist()):
            keep = [k for k, i in enumerate(ids.tolist()) if i not in self.bad]
            encoded = [np.array(encoded[k]) for k in keep]
            indices = [np.array(indices[k]) for k in keep]
        return encoded, indices


def _is_decode_error(exc: BaseException) -> bool:
    text = str(exc)
    return "decod" in text and ("Failed to decode" in text or "decoders." in text)


def undecodable(paths: list[str], decode_device: str, device_id: int | None = None) -> dict[str, str]:
    """The files among ``paths`` that DALI's image decoder (``decode_device``) cannot decode -> reason.

    Each file is decoded on its own by a small synchronous pipeline; after a failure the pipeline is rebuilt
    for the files after it. Used only after a decode error, on the few batches in flight.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from .decode import decode_rgb8
    from .images import BadImage

    bad: dict[str, str] = {}
    remaining = list(dict.fromkeys(paths))
    while remaining:
        @pipeline_def
        def graph(files=tuple(remaining)):
            encoded, _ = fn.readers.file(files=list(files), labels=list(range(len(files))))
            return fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)

        pipe = graph(batch_size=1, num_threads=1, device_id=device_id, exec_pipelined=False, exec_async=False,
                     prefetch_queue_depth=1)
        pipe.build()
        failed = None
        for k in range(len(remaining)):
            try:
                pipe.run()
            except RuntimeError as exc:
                named = re.search(r"Failed to decode sample #\d+ : (.+)", str(exc))
                failed = k
                if named and named.group(1).strip() in remaining:
                    failed = remaining.index(named.group(1).strip())
                break
        if failed is None:
            break
        path = remaining[failed]
        try:
            decode_rgb8(path)
            reason = "cannot be decoded by DALI"
        except BadImage as exc:
            reason = exc.detail
        bad[path] = reason
        remaining = remaining[failed + 1 :]
    return bad


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
        self._in_epoch = False
        self._feed = _EpochBatches()
        self._eval_skipped: set[int] = set()
        if not options.train:
            order = eval_order(len(index), options.num_shards)
            self._eval_files = [index.paths[max(int(i), 0)] for i in order]
            self._position_ids = torch.from_numpy(order).to(options.device)

    def close(self) -> None:
        """Drop the DALI pipelines and their threads (rebuilt on the next iteration)."""
        self._iterator = self._pipe = None
        self._feed.reader = None
        self._in_epoch = False

    def _make_iterator(self, pipe, policy):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        kwargs = {"reader_name": "Reader"} if policy == "partial" else {}
        return DALIGenericIterator(
            pipe,
            ["images", "positions"],
            last_batch_policy=LastBatchPolicy.PARTIAL if policy == "partial" else LastBatchPolicy.DROP,
            auto_reset=False,
            **kwargs,
        )

    def _start_train(self, epoch: int, done: int = 0, rebuild: bool = False) -> None:
        """Start the epoch's reader after ``done`` batches; ``rebuild``: a restart after a decode error, which
        also rebuilds the processing pipeline (with a seed of its own)."""
        o = self.options
        order = train_order(len(self.index), o.num_shards, o.seed, epoch)
        with _quiet_dali_deprecations():
            self._feed.start(reader_pipeline(o, [self.index.paths[i] for i in order], order.tolist()), len(self),
                             discard=done)
            if self._iterator is None or rebuild:
                self._iterator = self._pipe = None
                key = [o.seed, o.shard_id] + ([epoch, done, len(self._feed.bad)] if rebuild else [])
                seed = int(np.random.SeedSequence(key).generate_state(1)[0] & 0x7FFFFFFF)
                self._pipe = train_pipeline(o, self.decode_device, self._feed, seed)
                self._iterator = self._make_iterator(self._pipe, "drop")
            else:
                self._iterator.reset()

    def _start_eval(self, done: int = 0, rebuild: bool = False) -> None:
        """Start an evaluation pass after ``done`` batches (``rebuild``: a restart after a decode error)."""
        if self._iterator is not None and not self._in_epoch and not rebuild:
            self._iterator.reset()
            return
        self.close()
        self._pipe = eval_pipeline(self.options, self.decode_device, self._eval_files)
        self._iterator = self._make_iterator(self._pipe, "partial")
        if len(self._iterator) != len(self):
            raise RuntimeError(f"DALI iterator has {len(self._iterator)} batches, the plan {len(self)}")
        for _ in range(done):
            next(self._iterator)

    def _in_flight(self, done: int) -> list[tuple[int, str]]:
        """``(position or sample index, path)`` of the batches that may hold the one DALI failed on."""
        o = self.options
        if o.train:
            return [(i, self.index.paths[i]) for batch in self._feed.recent for i in batch]
        per_shard = len(self._eval_files) // o.num_shards
        lo = o.shard_id * per_shard + done * o.batch_size
        hi = min(lo + 4 * o.batch_size, (o.shard_id + 1) * per_shard)
        return [(p, self._eval_files[p]) for p in range(lo, hi)]

    def _recover(self, exc: RuntimeError, done: int) -> None:
        """After a DALI decode error at batch ``done``: find the file(s), then raise or mark them to leave out
        (the caller restarts the pipelines)."""
        in_flight = self._in_flight(done)
        with _quiet_dali_deprecations():
            bad = undecodable([path for _, path in in_flight], self.decode_device,
                              _device_id(self.options, self.decode_device))
        if not bad:
            raise exc
        if self.options.on_bad_image == "error":
            path, reason = next(iter(bad.items()))
            raise ImageDecodeError(path, reason) from None
        if self.options.train:
            for i, path in in_flight:
                if path in bad:
                    self.bad_image(i, path, bad[path])
                    self._feed.bad.add(i)
            return
        good = next(path for _, path in in_flight if path not in bad) if len(bad) < len(in_flight) else None
        for p, path in enumerate(self._eval_files):
            if path in bad:
                sample = int(self._position_ids[p])
                if sample >= 0:
                    self.bad_image(sample, path, bad[path])
                    self._eval_skipped.add(sample)
                self._eval_files[p] = good or next(q for q in self.index.paths if q not in bad)
                self._position_ids[p] = -1

    def __iter__(self):
        o = self.options
        epoch = self._take_epoch()
        if self._in_epoch:  # the previous loop was left early: its pipelines hold a half-read epoch
            self.close()
        self.skipped_ids = set() if o.train else set(self._eval_skipped)  # earlier passes' stand-ins stay padding
        done, start, rebuild = 0, True, False
        while True:
            try:
                if start:  # (the DALI iterator runs the first batch when it is built)
                    if o.train:
                        self._start_train(epoch, done, rebuild)
                    else:
                        self._start_eval(done, rebuild)
                    self._in_epoch, start = True, False
                batch = next(self._iterator)
            except StopIteration:
                break
            except RuntimeError as exc:
                if not _is_decode_error(exc):
                    raise
                self._in_epoch = True
                self._recover(exc, done)
                start = rebuild = True
                continue
            done += 1
            images = batch[0]["images"]
            positions = batch[0]["positions"].view(-1).to(o.device, non_blocking=True).long()
            ids = positions if o.train else self._position_ids[positions]
            if o.channels_last:
                images = images.permute(0, 3, 1, 2)
            yield self.finish_images(images), self.targets_for(ids), ids
        self._in_epoch = False
