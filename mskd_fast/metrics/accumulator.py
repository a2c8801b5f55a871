"""Streaming multi-label evaluation: accumulate (logits, targets, sample ids), compute at the end."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ._checks import as_tensor, check_threshold
from .classification import threshold_metrics, top1_metrics
from .distributed import all_gather_int64, all_gather_rows
from .ranking import average_precision_per_class

_MODE_NONE, _MODE_IDS, _MODE_ANON = 0, 1, 2


class MultiLabelMetrics:
    """Accumulates per-sample rows over batches (and DDP ranks) and computes multi-label metrics.

    ``update()`` only validates shapes and appends detached float32 copies (on the inputs' device, so
    no host synchronisation happens per batch); value checks for device tensors, padding removal and
    de-duplication run once in ``compute()``/``sync()``/``state()``. CPU inputs are value-checked
    immediately.

    Rows are keyed by sample id: rows with id < 0 are padding and dropped; a sample id seen several
    times (e.g. a distributed sampler's wrap-around) counts once, keeping its first row (its targets
    must agree across the copies). Without ``sample_ids`` every row is a distinct sample.

    Args:
        num_classes: C.
        threshold: probability threshold for OP/OR/OF1/CP/CR/CF1 (predicted = sigmoid(logit) >= threshold).
        class_names: optional C names, used to report excluded classes.
    """

    def __init__(self, num_classes: int, threshold: float = 0.5, class_names: Sequence[str] | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.threshold = check_threshold(threshold)
        if class_names is not None:
            class_names = [str(n) for n in class_names]
            if len(class_names) != self.num_classes:
                raise ValueError(
                    f"class_names must hold num_classes={self.num_classes} names, got {len(class_names)}"
                )
        self.class_names = class_names
        self.reset()

    # ------------------------------------------------------------------ accumulation
    def reset(self) -> None:
        """Forget every accumulated row."""
        self._ids: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._calls: list[int] = []  # update() call number of each block (-1: already validated)
        self._num_calls = 0
        self._mode = _MODE_NONE
        self._next_anon_id = 0
        self._synced = False

    def update(self, logits, targets, sample_ids=None) -> None:
        """Add one batch.

        Args:
            logits: (B, C) floating tensor/array of raw scores (pre-sigmoid), any device.
            targets: (B, C) multi-hot labels in {0, 1} (bool, integer or floating dtype).
            sample_ids: optional (B,) integer ids; id < 0 marks a padding row. Either always or never
                give ids within one accumulation.
        """
        if self._synced:
            raise RuntimeError("update() after sync(): call reset() before accumulating a new evaluation")
        logits = as_tensor(logits, "logits")
        targets = as_tensor(targets, "targets")
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape (B, C), got shape {tuple(logits.shape)}")
        batch, classes = logits.shape
        if classes != self.num_classes:
            raise ValueError(f"logits has {classes} classes (dim 1) but num_classes={self.num_classes}")
        if not logits.dtype.is_floating_point:
            raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
        if tuple(targets.shape) != (batch, classes):
            raise ValueError(
                f"targets must have shape {(batch, classes)} like logits, got {tuple(targets.shape)}"
            )
        if targets.dtype.is_complex:
            raise TypeError(f"targets must be real (bool, integer or float), got {targets.dtype}")
        mode = _MODE_ANON if sample_ids is None else _MODE_IDS
        if self._mode not in (_MODE_NONE, mode):
            raise ValueError(
                "sample_ids must be given in every update() call or in none (this call "
                f"{'omits' if sample_ids is None else 'gives'} them, earlier calls did not)"
            )
        if sample_ids is None:
            ids = torch.arange(self._next_anon_id, self._next_anon_id + batch, dtype=torch.int64)
            self._next_anon_id += batch
        else:
            ids = as_tensor(sample_ids, "sample_ids")
            if ids.dim() != 1 or ids.shape[0] != batch:
                raise ValueError(f"sample_ids must have shape ({batch},), got {tuple(ids.shape)}")
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"sample_ids must have an integer dtype, got {ids.dtype}")
            ids = ids.detach().to(torch.int64, copy=True)
        self._mode = mode
        block_logits = logits.detach().to(torch.float32, copy=True)
        block_targets = targets.detach().to(torch.float32, copy=True)
        self._num_calls += 1
        if all(t.device.type == "cpu" for t in (ids, block_logits, block_targets)):
            _validate_rows(ids, block_logits, block_targets, call=self._num_calls)
        self._ids.append(ids)
        self._logits.append(block_logits)
        self._targets.append(block_targets)
        self._calls.append(self._num_calls)

    # ------------------------------------------------------------------ consolidation
    def _consolidate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate, drop padding, de-duplicate; replace the blocks by one CPU block and return it.

        Returns (ids (N,) int64, logits (N, C) float32, targets (N, C) float32 in {0, 1}); ids sorted
        ascending when sample ids were given.
        """
        if not self._ids:
            empty = torch.empty((0, self.num_classes), dtype=torch.float32)
            return torch.empty(0, dtype=torch.int64), empty, empty.clone()
        for ids, logits, targets, call in zip(self._ids, self._logits, self._targets, self._calls):
            on_device = any(t.device.type != "cpu" for t in (ids, logits, targets))
            if call >= 0 and on_device:  # CPU blocks were checked in update()
                _validate_rows(ids.cpu(), logits.cpu(), targets.cpu(), call=call)
        ids = torch.cat([t.cpu() for t in self._ids])
        logits = torch.cat([t.cpu() for t in self._logits])
        targets = torch.cat([t.cpu() for t in self._targets])
        keep = ids >= 0
        ids, logits, targets = ids[keep], logits[keep], targets[keep]
        if self._mode == _MODE_IDS and ids.numel() > 0:
            ids, logits, targets = _deduplicate(ids, logits, targets)
        self._ids, self._logits, self._targets, self._calls = [ids], [logits], [targets], [-1]
        return ids, logits, targets

    def state(self) -> dict[str, torch.Tensor]:
        """Kept rows as CPU tensors (padding dropped, duplicates merged).

        Returns "sample_ids" (N,) int64, "logits" (N, C) float32, "targets" (N, C) uint8 and
        "anonymous" (0-dim bool: True when no sample ids were given).
        """
        ids, logits, targets = self._consolidate()
        return {
            "sample_ids": ids.clone(),
            "logits": logits.clone(),
            "targets": targets.to(torch.uint8),
            "anonymous": torch.tensor(self._mode == _MODE_ANON),
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the accumulated rows by ``state`` (as returned by :meth:`state`, possibly merged)."""
        missing = {"sample_ids", "logits", "targets", "anonymous"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        anonymous = bool(state["anonymous"])
        self.reset()
        self.update(state["logits"], state["targets"], None if anonymous else state["sample_ids"])

    # ------------------------------------------------------------------ distributed
    def sync(self, dist_group=None) -> None:
        """All-gather the kept rows of every rank so each rank holds every sample exactly once.

        A no-op when torch.distributed is not initialised or the group has one rank. Collective:
        every rank of ``dist_group`` must call it. Works with gloo (CPU) and NCCL (CUDA) groups;
        row counts may differ between ranks. After it, ``update()`` requires ``reset()``; calling
        ``sync()`` again does nothing.
        """
        if self._synced or not dist.is_available() or not dist.is_initialized():
            return
        if dist.get_world_size(dist_group) == 1:
            self._synced = True
            return
        error = None
        try:
            ids, logits, targets = self._consolidate()
        except ValueError as exc:  # report it on every rank instead of leaving the others blocked
            error = exc
            ids = torch.empty(0, dtype=torch.int64)
            logits = targets = torch.empty((0, self.num_classes), dtype=torch.float32)
        local_info = [ids.shape[0], self.num_classes, self._mode, int(error is not None)]
        info = all_gather_int64(local_info, dist_group)
        failed = [rank for rank, row in enumerate(info) if row[3]]
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"sync(): rows on rank(s) {failed} failed validation (see those ranks)")
        if len({row[1] for row in info}) != 1:
            raise ValueError(f"sync(): num_classes differs between ranks: {[row[1] for row in info]}")
        modes = {row[2] for row in info} - {_MODE_NONE}
        if len(modes) > 1:
            raise ValueError("sync(): some ranks passed sample_ids to update() and others did not")
        sizes = [row[0] for row in info]
        ids, logits, targets = all_gather_rows([ids, logits, targets.to(torch.uint8)], sizes, dist_group)
        mode = modes.pop() if modes else _MODE_NONE
        if mode == _MODE_ANON:
            ids = torch.arange(ids.shape[0], dtype=torch.int64)
        self._ids, self._logits, self._calls = [ids], [logits], [-1]
        self._targets = [targets.to(torch.float32)]
        self._mode = mode
        self._consolidate()
        self._synced = True

    # ------------------------------------------------------------------ results
    def rows(self) -> dict[str, np.ndarray]:
        """Kept rows as numpy arrays: "sample_ids" (N,) int64, "logits" (N, C) float32,
        "probs" (N, C) float32 = sigmoid(logits) (as thresholded by compute()), "targets" (N, C) uint8."""
        ids, logits, targets = self._consolidate()
        return {
            "sample_ids": ids.numpy().copy(),
            "logits": logits.numpy().copy(),
            "probs": torch.sigmoid(logits).numpy(),
            "targets": targets.to(torch.uint8).numpy(),
        }

    def compute(self) -> dict:
        """Metrics over every kept sample.

        Returns:
            dict with "mAP", "OP", "OR", "OF1", "CP", "CR", "CF1", "P@1", "R@1" (floats, percent);
            "AP": (C,) float64 per-class AP in percent, NaN for classes without a positive (those are
            excluded from mAP, which is NaN if every class is excluded); "excluded_classes": the names
            (or indices, without class_names) of classes without a positive; "num_samples": int.
            Ranking metrics use the float32 logits (same order as sigmoid, without its float32
            saturation ties); thresholded metrics use sigmoid(logit) >= threshold. Zero divisions
            follow scikit-learn's zero_division=0 (see mskd_fast.metrics.classification).
        """
        ids, logits, targets = self._consolidate()
        if ids.numel() == 0:
            raise RuntimeError("compute() called with no accumulated samples (none given, or all padding)")
        scores = logits.numpy()
        positives = targets.numpy().astype(bool)
        ap = average_precision_per_class(scores, positives) * 100.0
        excluded = np.flatnonzero(np.isnan(ap)).tolist()
        valid = ~np.isnan(ap)
        result = {"mAP": float(ap[valid].mean()) if valid.any() else float("nan")}
        predicted = (torch.sigmoid(logits) >= self.threshold).numpy()
        for key, value in threshold_metrics(predicted, positives).items():
            result[key] = value * 100.0
        for key, value in top1_metrics(scores, positives).items():
            result[key] = value * 100.0
        result["AP"] = ap
        result["excluded_classes"] = [self.class_names[c] for c in excluded] if self.class_names else excluded
        result["num_samples"] = int(ids.numel())
        return result


def _validate_rows(ids: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, call: int) -> None:
    """Value checks of one CPU block; padding rows (id < 0) are not checked (they are dropped)."""
    where = f"in update() call #{call}" if call >= 0 else "in the accumulated rows"
    real = ids >= 0
    bad = ~torch.isfinite(logits) & real[:, None]
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"logits must be finite; {where} row {row} class {col} is {float(logits[row, col])}")
    bad = (targets != 0) & (targets != 1) & real[:, None]
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        value = float(targets[row, col])
        raise ValueError(f"targets must be 0 or 1; {where} row {row} class {col} is {value}")


def _deduplicate(ids: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor):
    """Keep the first row of each sample id (result sorted by id); targets of duplicates must agree."""
    ids_np = ids.numpy()
    unique, first, inverse = np.unique(ids_np, return_index=True, return_inverse=True)
    if unique.shape[0] != ids_np.shape[0]:
        first_t = torch.from_numpy(first)
        differs = (targets != targets[first_t][torch.from_numpy(inverse)]).any(dim=1)
        if differs.any():
            sample = int(ids[differs.nonzero()[0, 0]])
            raise ValueError(f"targets differ between duplicate rows of sample_id {sample}")
    index = torch.from_numpy(first)
    return ids[index], logits[index], targets[index]
