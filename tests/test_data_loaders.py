"""DALI (CPU mode) and torch loaders: shapes, dtypes, layouts, label alignment, sharding guarantees.

Images of the solid-colour fixture encode their sample id in their colour, which survives crops,
flips and resizes (RandAugment is off where the colour is checked), so every row's pixels, target
and sample id can be checked against each other.
"""

import numpy as np
import pytest
import torch
from data_helpers import colour_id, id_colour, make_solid_manifest

from mskd_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SyntheticConfig,
    build_loader,
    dali_decode_device,
    dali_import_error,
    load_index,
    resolve_backend,
)

DALI_REASON = dali_import_error()
needs_dali = pytest.mark.skipif(DALI_REASON is not None, reason=f"DALI cannot be imported: {DALI_REASON}")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
N = 24


@pytest.fixture(scope="module")
def solid(tmp_path_factory):
    root, labels = make_solid_manifest(str(tmp_path_factory.mktemp("solid")), N)
    index = load_index("manifest", root, "train")
    np.testing.assert_array_equal(index.labels, labels)
    return index


def _colours(images: torch.Tensor) -> torch.Tensor:
    """(B, 3) mean RGB in 0..255 of normalised images, plus the largest in-image deviation."""
    x = images.float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    rgb = x * std + mean
    return rgb.mean(dim=(2, 3)), (rgb - rgb.mean(dim=(2, 3), keepdim=True)).abs().amax()


def _collect(loader, index, check_colour=True, colour_tol=3.0):
    """Iterate once, checking each row's colour/target/id agree; return the ids in order."""
    seen = []
    for images, targets, ids in loader:
        assert ids.dtype == torch.int64 and targets.dtype == torch.float32
        real = ids >= 0
        expected = torch.zeros_like(targets)
        expected[real] = torch.from_numpy(index.labels[ids[real].numpy()]).float()
        torch.testing.assert_close(targets, expected, rtol=0, atol=0)
        if check_colour:
            colours, spread = _colours(images)
            assert spread < colour_tol * 2
            for c, i in zip(colours[real], ids[real].tolist()):
                assert colour_id(c.tolist()) == i
                assert np.abs(c.numpy() - np.array(id_colour(i))).max() < colour_tol
        seen.extend(ids.tolist())
    return seen


def _loader(index, backend, **kw):
    kw.setdefault("num_workers", 0 if backend == "torch" else 1)
    kw.setdefault("img_size", 16)
    return build_loader(index, loader=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, channels_last", [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False)]
)
def test_train_batches_shapes_dtypes_and_alignment(solid, backend, dtype, channels_last):
    loader = _loader(solid, backend, train=True, batch_size=5, dtype=dtype, channels_last=channels_last,
                     randaugment=False, seed=1)  # fmt: skip
    assert len(loader) == N // 5 and loader.num_samples == 20
    for images, targets, ids in loader:
        assert images.shape == (5, 3, 16, 16) and images.dtype == dtype and images.device.type == "cpu"
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert targets.shape == (5, solid.num_classes) and ids.shape == (5,)
        break
    tol = 3.0 if dtype == torch.float32 else 4.0
    ids = _collect(loader, solid, colour_tol=tol)
    assert len(ids) == 20 and len(set(ids)) == 20 and ids != sorted(ids)  # shuffled, no repeats


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shards_disjoint_and_epoch_determinism(solid, backend):
    loaders = [_loader(solid, backend, train=True, batch_size=3, num_shards=2, shard_id=k, randaugment=False, seed=7)
               for k in range(2)]  # fmt: skip
    for loader in loaders:
        loader.set_epoch(2)
    parts = [_collect(loader, solid) for loader in loaders]
    assert len(parts[0]) == len(parts[1]) == 12 and not set(parts[0]) & set(parts[1])
    loaders[0].set_epoch(2)
    assert _collect(loaders[0], solid, check_colour=False) == parts[0]
    assert _collect(loaders[0], solid, check_colour=False) != parts[0]  # the epoch advanced to 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, shards, bs", [(13, 2, 4), (13, 3, 4), (3, 4, 2)])
def test_eval_shards_cover_every_sample_exactly_once(solid, backend, n, shards, bs):
    index = solid.subset(np.arange(N) < n)
    loaders = [
        _loader(index, backend, train=False, batch_size=bs, num_shards=shards, shard_id=k) for k in range(shards)
    ]
    assert len({len(loader) for loader in loaders}) == 1
    ids = []
    for loader in loaders:
        got = _collect(loader, index)
        assert len(got) == -(-n // shards) and sum(i >= 0 for i in got) == loader.num_samples
        ids.extend(got)
    real = [i for i in ids if i >= 0]
    assert sorted(real) == list(range(n))  # no duplicate, nothing missing
    assert all(i == -1 for i in ids if i < 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_repeats_and_survives_a_broken_loop(solid, backend):
    loader = _loader(solid, backend, train=False, batch_size=5)
    first = _collect(loader, solid)
    assert first == list(range(N))
    for _ in loader:
        break
    assert _collect(loader, solid) == first
    assert _collect(loader, solid) == first


@pytest.mark.slow  # DALI: tracing RandAugment's conditional graph takes seconds on 2 cores
@pytest.mark.parametrize("backend", BACKENDS)
def test_randaugment_on_synthetic_jpegs(tmp_path, backend):
    config = SyntheticConfig(train_size=16, test_size=4, img_size=64, seed=0, cache_dir=str(tmp_path))
    index = load_index("synthetic", None, "train", synthetic=config)
    loader = _loader(index, backend, train=True, batch_size=8, img_size=48, randaugment=True, seed=3)
    batches = list(loader)
    assert len(batches) == 2
    seen = []
    for images, targets, ids in batches:
        assert images.shape == (8, 3, 48, 48) and torch.isfinite(images).all()
        torch.testing.assert_close(targets, torch.from_numpy(index.labels[ids.numpy()]).float())
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(16))


def test_torch_augmentation_reproducible_across_workers_and_resume(solid):
    """A torch-loader batch depends on (seed, epoch, shard, batch) only: not on workers or history."""

    def epoch_batches(workers, epoch, warm_up=False):
        loader = build_loader(solid, train=True, batch_size=4, img_size=16, loader="torch", num_workers=workers,
                              randaugment=True, seed=5)  # fmt: skip
        if warm_up:
            list(loader)  # run epoch 0 first: the RNG state it leaves behind must not matter
        loader.set_epoch(epoch)
        out = [(x.clone(), i.clone()) for x, _, i in loader]
        loader.close()
        return out

    a, b, c = epoch_batches(0, 3), epoch_batches(2, 3), epoch_batches(2, 3, warm_up=True)
    for (xa, ia), (xb, ib), (xc, ic) in zip(a, b, c):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(xa, xc, rtol=0, atol=0)
        assert ia.tolist() == ib.tolist() == ic.tolist()
    assert not torch.equal(a[0][0], epoch_batches(0, 4)[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_stay_valid_while_the_next_is_fetched(solid, backend):
    """The trainer holds batch i while fetching batch i+1 (also across the epoch boundary)."""
    loader = _loader(solid, backend, train=True, batch_size=6, randaugment=False)

    def stream():
        for _ in range(2):
            yield from loader

    held = None
    for batch in stream():
        if held is not None:
            images, ids = held[0], held[2]
            colours, _ = _colours(images)
            assert [colour_id(c.tolist()) for c in colours] == ids.tolist()
        held = batch


def test_torch_loader_leaves_global_rng_alone(solid):
    loader = _loader(solid, "torch", train=True, batch_size=4, randaugment=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(loader)
    torch.testing.assert_close(torch.rand(3), expected)


@needs_dali
def test_dali_and_torch_read_the_same_order(solid):
    """Same plan on both backends, over consecutive epochs and after a training loop left early."""
    orders = {}
    for backend in ("torch", "dali"):
        loader = _loader(solid, backend, train=True, batch_size=4, num_shards=2, shard_id=1, randaugment=False, seed=9)
        loader.set_epoch(4)
        epochs = [_collect(loader, solid), _collect(loader, solid)]
        for _ in loader:  # epoch 6, abandoned after one batch
            break
        epochs.append(_collect(loader, solid))  # epoch 7
        loader.set_epoch(4)
        epochs.append(_collect(loader, solid))
        orders[backend] = epochs
    assert orders["torch"] == orders["dali"]
    assert orders["dali"][3] == orders["dali"][0] != orders["dali"][1]


def test_backend_choice_and_argument_errors(solid):
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == ("torch" if DALI_REASON else "dali-cpu")
    expected = "mixed" if torch.cuda.is_available() else "cpu"
    assert dali_decode_device("cuda") == expected and dali_decode_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="loader must be one of"):
        build_loader(solid, train=True, batch_size=2, img_size=8, loader="pil")
    with pytest.raises(ValueError, match="batch_size 30 is larger"):
        build_loader(solid, train=True, batch_size=30, img_size=8, loader="torch")
    with pytest.raises(ValueError, match="shard_id"):
        build_loader(solid, train=False, batch_size=2, img_size=8, loader="torch", num_shards=2, shard_id=2)
    with pytest.raises(TypeError, match="dtype"):
        build_loader(solid, train=False, batch_size=2, img_size=8, loader="torch", dtype=torch.int8)
    with pytest.raises(ValueError, match="crop_scale"):
        build_loader(solid, train=True, batch_size=2, img_size=8, loader="torch", crop_scale=(0.5, 1.5))
