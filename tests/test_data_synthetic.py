"""The built-in synthetic dataset: determinism, boxes, scale distribution, VOC read-back, caching."""

import filecmp
import json
import os

import numpy as np
import pytest

from mskd_fast.data import SYNTHETIC_CLASSES, DatasetError, SyntheticConfig, ensure_synthetic, load_index
from mskd_fast.data.synthetic import CLASS_TABLE, META_FILE, image_rng, render_image, synthetic_dir

SMALL = dict(train_size=12, test_size=5, img_size=64, seed=3)


def test_classes_are_unique_attribute_triples():
    assert len(SYNTHETIC_CLASSES) == len(set(SYNTHETIC_CLASSES)) == 20
    assert len(set(CLASS_TABLE)) == 20
    for attribute in range(3):  # no single attribute identifies a class
        values = [c[attribute] for c in CLASS_TABLE]
        assert all(values.count(v) > 1 for v in values)


def test_generation_is_deterministic(tmp_path):
    a = ensure_synthetic(SyntheticConfig(**SMALL, cache_dir=str(tmp_path / "a")))
    b = ensure_synthetic(SyntheticConfig(**SMALL, cache_dir=str(tmp_path / "b")))
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        files = sorted(os.listdir(os.path.join(a, sub)))
        assert files == sorted(os.listdir(os.path.join(b, sub))) and files
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(a, sub), os.path.join(b, sub), files, shallow=False)
        assert not mismatch and not errors
    other = ensure_synthetic(SyntheticConfig(**{**SMALL, "seed": 4}, cache_dir=str(tmp_path / "a")))
    assert other != a
    assert not filecmp.cmp(os.path.join(a, "Annotations", "train_000000.xml"),
                           os.path.join(other, "Annotations", "train_000000.xml"), shallow=False)  # fmt: skip


def test_render_boxes_inside_and_scales_span_tiny_to_half():
    size = 128
    sides, counts, classes = [], [], set()
    for i in range(300):
        image, boxes, cls = render_image(image_rng(0, "train", i), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert 1 <= len(boxes) <= 5 and boxes.dtype == np.int64 and cls.shape == (len(boxes),)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 3).all()
        sides.extend(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist())
        counts.append(len(boxes))
        classes.update(cls.tolist())
    sides = np.array(sides)
    assert sides.min() < 8 and sides.max() > 0.6 * size  # tiny (a few px) up to half the image area
    small, large = (sides < 16).mean(), (sides > 0.4 * size).mean()
    assert 0.25 < small < 0.5 and 0.1 < large < 0.3  # log-uniform area: both ends well populated
    assert set(counts) == {1, 2, 3, 4, 5} and classes == set(range(20))


def test_voc_read_back_gives_generated_labels_and_boxes(tmp_path):
    config = SyntheticConfig(**SMALL, cache_dir=str(tmp_path))
    for split, n in (("train", 12), ("test", 5)):
        idx = load_index("synthetic", None, split, synthetic=config)
        assert idx.name == "synthetic" and idx.split == split and len(idx) == n
        assert idx.class_names == list(SYNTHETIC_CLASSES) and idx.skipped == {"no_labels": 0}
        np.testing.assert_array_equal(idx.image_sizes, [[64, 64]] * n)
        for i in range(n):
            _, boxes, cls = render_image(image_rng(3, split, i), 64)
            np.testing.assert_array_equal(idx.boxes[i], boxes.astype(np.float32))
            np.testing.assert_array_equal(idx.box_classes[i], cls)
            expected = np.zeros(20, np.uint8)
            expected[cls] = 1
            np.testing.assert_array_equal(idx.labels[i], expected)
    main = os.path.join(synthetic_dir(config), "ImageSets", "Main")
    with open(os.path.join(main, f"{SYNTHETIC_CLASSES[0]}_test.txt")) as f:
        flags = [int(line.split()[1]) for line in f]
    assert flags == [1 if y else -1 for y in load_index("synthetic", None, "test", synthetic=config).labels[:, 0]]


def test_cache_reuse_env_and_meta_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("MSKD_FAST_CACHE", str(tmp_path / "env"))
    config = SyntheticConfig(**SMALL)
    root = ensure_synthetic(config)
    assert root.startswith(str(tmp_path / "env"))
    stamp = os.stat(os.path.join(root, "JPEGImages", "train_000000.jpg")).st_mtime_ns
    assert ensure_synthetic(config) == root
    assert os.stat(os.path.join(root, "JPEGImages", "train_000000.jpg")).st_mtime_ns == stamp  # reused
    assert not [d for d in os.listdir(os.path.dirname(root)) if d.startswith(".tmp")]  # no leftovers
    assert load_index("synthetic", str(tmp_path / "flag"), "test", synthetic=config).root.startswith(
        str(tmp_path / "flag")
    )  # data_dir overrides the cache folder
    with open(os.path.join(root, META_FILE)) as f:
        meta = json.load(f)
    meta["seed"] = 99
    with open(os.path.join(root, META_FILE), "w") as f:
        json.dump(meta, f)
    with pytest.raises(DatasetError, match="different config"):
        ensure_synthetic(config)


def test_config_validation():
    with pytest.raises(ValueError, match="train_size"):
        SyntheticConfig(train_size=0)
    with pytest.raises(ValueError, match="img_size"):
        SyntheticConfig(img_size=8)
    with pytest.raises(TypeError, match="seed"):
        SyntheticConfig(seed=1.5)
    assert SyntheticConfig(train_size=10).num_test == 3
    with pytest.raises(ValueError, match="synthetic split"):
        load_index("synthetic", None, "trainval", synthetic=SyntheticConfig(train_size=2))
