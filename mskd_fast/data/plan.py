"""Which samples each shard reads, in which order: one definition shared by the DALI and torch loaders.

Training, epoch ``e``: a permutation of all N samples drawn from ``(seed, e)`` (identical on every
shard), cut to ``num_shards * floor(N / num_shards)`` samples (the few left over differ every
epoch, as with ``DistributedSampler(drop_last=True)``), then split into ``num_shards`` contiguous
equal chunks; shard ``k`` reads chunk ``k`` in order and drops its last partial batch. Every shard
therefore has the same number of batches.

Evaluation: sample ids ``0..N-1`` split into ``num_shards`` contiguous chunks of
``L = ceil(N / num_shards)`` (the last ones shorter), each padded to ``L`` with id ``-1``; shard
``k`` reads chunk ``k``, and its last batch may be partial. Every sample appears exactly once over
all shards, padding rows carry id ``-1``, and every shard has the same number of batches.
"""

from __future__ import annotations

import numpy as np


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_shard(shard_id: int, num_shards: int) -> None:
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    if not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an int in [0, {num_shards}), got {shard_id!r}")


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation (N,) int64 of all samples for ``epoch`` (same on every shard)."""
    return np.random.default_rng([seed, epoch, 0x5A3D]).permutation(num_samples).astype(np.int64)


def train_order(num_samples: int, num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """All shards' training samples for ``epoch``: (num_shards * floor(N / num_shards),) int64."""
    per_shard = num_samples // num_shards
    return epoch_permutation(num_samples, seed, epoch)[: per_shard * num_shards]


def train_shard(num_samples: int, shard_id: int, num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """Shard ``shard_id``'s training samples for ``epoch``, in reading order: (floor(N / num_shards),) int64."""
    check_shard(shard_id, num_shards)
    per_shard = num_samples // num_shards
    return train_order(num_samples, num_shards, seed, epoch)[shard_id * per_shard : (shard_id + 1) * per_shard]


def eval_order(num_samples: int, num_shards: int) -> np.ndarray:
    """All shards' evaluation ids, shard-major with ``-1`` padding: (num_shards * ceil(N / num_shards),) int64."""
    per_shard = ceil_div(num_samples, num_shards)
    order = np.full(per_shard * num_shards, -1, dtype=np.int64)
    for k in range(num_shards):
        ids = np.arange(k * per_shard, min(num_samples, (k + 1) * per_shard), dtype=np.int64)
        order[k * per_shard : k * per_shard + len(ids)] = ids
    return order


def eval_shard(num_samples: int, shard_id: int, num_shards: int) -> np.ndarray:
    """Shard ``shard_id``'s evaluation ids in reading order, ``-1`` for padding: (ceil(N / num_shards),) int64."""
    check_shard(shard_id, num_shards)
    per_shard = ceil_div(num_samples, num_shards)
    return eval_order(num_samples, num_shards)[shard_id * per_shard : (shard_id + 1) * per_shard]


def num_batches(train: bool, num_samples: int, batch_size: int, num_shards: int) -> int:
    """Batches per epoch on every shard (train: partial batch dropped; eval: kept)."""
    if train:
        return (num_samples // num_shards) // batch_size
    return ceil_div(ceil_div(num_samples, num_shards), batch_size)
