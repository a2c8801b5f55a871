"""``fashion-multi``: IDX reading and its errors, the composites, the disjoint item pools, the cached VOC layout
and the model-selection splits. Every test uses small IDX files it writes itself, never the Debian package."""

import gzip
import os

import numpy as np
import pytest
from data_helpers import make_fake_fashion_mnist, write_idx

from mskd_fast.data import DatasetError, SyntheticConfig, load_index
from mskd_fast.data.fashion import (
    DEBIAN_DIR,
    FASHION_CLASSES,
    POOLS,
    FashionMultiConfig,
    ensure_fashion_multi,
    find_fashion_mnist,
    load_items,
    read_idx,
    render_composite,
)


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    return make_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def test_read_idx_round_trip_gzip_and_raw(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(7, 3, 5), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(str(tmp_path / "a-images-idx3-ubyte.gz"), images)), images)
    assert np.array_equal(read_idx(write_idx(str(tmp_path / "a-labels-idx1-ubyte"), labels)), labels)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x08\x03", "too short"),
    (b"\x00\x00\x01\x02\x00\x00\x00\x01\x07", "not an IDX image or label file"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated or corrupt"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01\x00\x00\x00\x02", "16-byte header"),
])
def test_read_idx_rejects_malformed_files_naming_them(tmp_path, content, message):
    path = str(tmp_path / "bad-idx1-ubyte")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(DatasetError, match=message) as exc:
        read_idx(path)
    assert path in str(exc.value)


def test_read_idx_rejects_a_broken_gzip(tmp_path):
    path = str(tmp_path / "x-labels-idx1-ubyte.gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09" + bytes(9))[:-12])
    with pytest.raises(DatasetError, match="cannot read IDX file") as exc:
        read_idx(path)
    assert path in str(exc.value)


def test_missing_files_name_the_folder_and_the_package(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        find_fashion_mnist(str(tmp_path))
    text = str(exc.value)
    assert str(tmp_path) in text and "train-images-idx3-ubyte" in text and "--data-dir" in text
    assert DEBIAN_DIR in text and "dataset-fashion-mnist" in text


def test_pools_are_disjoint_and_load_the_right_items(fake_dir):
    assert POOLS["pretrain"][0] == POOLS["train"][0] == "train" and POOLS["test"][0] == "t10k"
    assert POOLS["pretrain"][2] <= POOLS["train"][1]  # pretraining items never appear in a composite
    items, labels = load_items("train", fake_dir)
    assert items.shape == (10_000, 6, 6) and labels.dtype == np.int64
    assert np.array_equal(labels, (np.arange(50_000, 60_000) % 10))
    with pytest.raises(ValueError, match="pool must be one of"):
        load_items("val", fake_dir)


def test_too_few_items_is_an_error_naming_the_file(tmp_path):
    make_fake_fashion_mnist(str(tmp_path), n_train=100, n_test=10)
    with pytest.raises(DatasetError, match="pool 'train' needs items 50000-59999") as exc:
        load_items("train", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(exc.value)


def test_composites_have_one_to_four_items_inside_the_canvas_largest_first():
    rng = np.random.default_rng(0)
    items = np.full((20, 28, 28), 255, dtype=np.uint8)
    labels = np.arange(20) % 10
    size, counts, sides = 64, set(), []
    for i in range(300):
        image, boxes, classes = render_composite(np.random.default_rng([0, i]), items, labels, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert 1 <= len(boxes) <= 4 and len(classes) == len(boxes)
        counts.add(len(boxes))
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        assert (boxes[:, 2] - boxes[:, 0] == boxes[:, 3] - boxes[:, 1]).all()  # pasted squares
        sides += (boxes[:, 2] - boxes[:, 0]).tolist()
        assert set(classes.tolist()) <= set(range(10))
    assert counts == {1, 2, 3, 4}
    assert min(sides) <= round(size / 6) + 1 and max(sides) >= round(2 * size / 3) - 2
    # deterministic in the generator
    a = render_composite(np.random.default_rng(5), items, labels, size)
    b = render_composite(np.random.default_rng(5), items, labels, size)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    del rng


def test_the_smallest_item_stays_visible():
    items = np.zeros((2, 8, 8), dtype=np.uint8)
    items[:, 2:6, 2:6] = 255
    for i in range(50):
        image, boxes, _ = render_composite(np.random.default_rng([1, i]), items, np.array([0, 1]), 48)
        k = int(np.argmin(boxes[:, 2] - boxes[:, 0]))
        x1, y1, x2, y2 = boxes[k]
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        assert image[cy, cx].max() > 100  # pasted last, on top of larger items


def test_dataset_splits_cache_and_reuse(fake_dir, tmp_path):
    config = SyntheticConfig(train_size=15, test_size=6, img_size=32, cache_dir=str(tmp_path / "cache"))
    train, fit, val, test = (load_index("fashion-multi", fake_dir, s, synthetic=config)
                             for s in ("train", "train-fit", "val", "test"))
    assert train.class_names == list(FASHION_CLASSES) and train.name == "fashion-multi"
    assert (len(train), len(fit), len(val), len(test)) == (15, 12, 3, 6)
    assert fit.paths + val.paths == train.paths and not set(test.paths) & set(train.paths)
    assert all(len(b) >= 1 for b in train.boxes) and (train.labels.sum(1) >= 1).all()
    for boxes, classes, row in zip(train.boxes, train.box_classes, train.labels):
        assert set(classes.tolist()) == set(np.flatnonzero(row).tolist())
        assert (boxes[:, 2:] <= 32).all()
    root = ensure_fashion_multi(FashionMultiConfig(15, 6, 32, cache_dir=str(tmp_path / "cache"), source_dir=fake_dir))
    stamp = os.path.getmtime(os.path.join(root, "Annotations", "train_000000.xml"))
    again = ensure_fashion_multi(FashionMultiConfig(15, 6, 32, cache_dir=str(tmp_path / "cache"), source_dir=fake_dir))
    assert again == root and os.path.getmtime(os.path.join(root, "Annotations", "train_000000.xml")) == stamp


def test_other_source_files_give_another_folder(fake_dir, tmp_path):
    other = make_fake_fashion_mnist(str(tmp_path / "other"), side=5)
    cache = str(tmp_path / "cache")
    a = ensure_fashion_multi(FashionMultiConfig(4, 2, 32, cache_dir=cache, source_dir=fake_dir))
    b = ensure_fashion_multi(FashionMultiConfig(4, 2, 32, cache_dir=cache, source_dir=other))
    assert a != b


def test_missing_package_through_load_index_names_it(tmp_path):
    config = SyntheticConfig(train_size=4, test_size=2, img_size=32, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist|--data-dir"):
        load_index("fashion-multi", str(tmp_path / "nowhere"), "train", synthetic=config)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="train_size"):
        FashionMultiConfig(train_size=0)
    with pytest.raises(ValueError, match="img_size"):
        FashionMultiConfig(img_size=16)
    with pytest.raises(TypeError, match="seed"):
        FashionMultiConfig(seed=1.5)
