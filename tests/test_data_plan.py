"""Shard/order plans shared by both loaders (mskd_fast.data.plan)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mskd_fast.data.plan import eval_shard, num_batches, train_shard


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), shards=st.integers(1, 9), bs=st.integers(1, 17))
def test_eval_every_sample_exactly_once(n, shards, bs):
    parts = [eval_shard(n, k, shards) for k in range(shards)]
    assert len({len(p) for p in parts}) == 1  # same batches on every shard
    ids = np.concatenate(parts)
    real = ids[ids >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(n))
    assert (ids[ids < 0] == -1).all() and len(ids) - n < shards
    assert num_batches(False, n, bs, shards) == -(-len(parts[0]) // bs)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), shards=st.integers(1, 9), seed=st.integers(0, 2**31), epoch=st.integers(0, 1000))
def test_train_shards_disjoint_equal_and_seeded(n, shards, seed, epoch):
    parts = [train_shard(n, k, shards, seed, epoch) for k in range(shards)]
    assert {len(p) for p in parts} == {n // shards}
    ids = np.concatenate(parts)
    assert len(np.unique(ids)) == len(ids) and ((ids >= 0) & (ids < n)).all()
    np.testing.assert_array_equal(parts[0], train_shard(n, 0, shards, seed, epoch))


def test_train_order_changes_with_epoch_and_seed():
    a = train_shard(1000, 0, 2, seed=0, epoch=0)
    assert not np.array_equal(a, train_shard(1000, 0, 2, seed=0, epoch=1))
    assert not np.array_equal(a, train_shard(1000, 0, 2, seed=1, epoch=0))
    # the leftover (N mod shards) samples differ between epochs, so none is left out for good
    left = [set(range(1001)) - set(np.concatenate([train_shard(1001, k, 2, 0, e) for k in range(2)])) for e in range(8)]
    assert len(set.union(*left)) > 1


def test_shard_argument_checks():
    with pytest.raises(ValueError, match="shard_id"):
        eval_shard(10, 2, 2)
    with pytest.raises(ValueError, match="num_shards"):
        train_shard(10, 0, 0, 0, 0)
