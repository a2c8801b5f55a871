"""``load_index``: one call for every supported dataset, and each dataset's default split names."""

from __future__ import annotations

import numpy as np

from .coco import read_coco
from .fashion import FASHION_CLASSES, FashionMultiConfig, ensure_fashion_multi
from .index import DatasetIndex, check_on_bad_image
from .manifest import read_manifest
from .mirflickr import read_mirflickr
from .nuswide import read_nuswide
from .synthetic import SYNTHETIC_CLASSES, SyntheticConfig, ensure_synthetic
from .voc import VOC_DIFFICULT, read_voc

DATASETS = ("synthetic", "fashion-multi", "voc", "coco", "mirflickr", "nuswide", "manifest")
GENERATED = ("synthetic", "fashion-multi")
# The generated datasets' model-selection splits: ``val`` is the last 20% of ``train`` (by image
# number), ``train-fit`` the rest; the two are disjoint and together are exactly ``train``.
SYNTHETIC_SPLITS = ("train", "test", "train-fit", "val")
SYNTHETIC_VAL_FRACTION = 0.2
_TRAIN_SPLIT = {"voc": "trainval"}
_EVAL_SPLIT: dict[str, str] = {}


def synthetic_val_size(n_train: int) -> int:
    """Images of the ``val`` split (synthetic, fashion-multi) carved from a ``train`` split of ``n_train`` (0 when
    ``n_train < 2``)."""
    return max(1, round(SYNTHETIC_VAL_FRACTION * n_train)) if n_train > 1 else 0


def _synthetic_carve(train: DatasetIndex, split: str) -> DatasetIndex:
    """``train-fit`` or ``val`` of a generated dataset, carved from its ``train`` index (see SYNTHETIC_SPLITS)."""
    n = len(train)
    n_val = synthetic_val_size(n)
    is_val = np.arange(n) >= n - n_val
    if split == "val" and n_val == 0:
        raise ValueError(f"{train.name} split 'val' needs a train split of at least 2 images")
    carved = train.subset(is_val if split == "val" else ~is_val)
    carved.split = split
    return carved


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def train_split_name(dataset: str) -> str:
    """The training split of ``dataset``: ``"trainval"`` for VOC, ``"train"`` otherwise."""
    _check_dataset(dataset)
    return _TRAIN_SPLIT.get(dataset, "train")


def eval_split_name(dataset: str) -> str:
    """The evaluation split of ``dataset``: ``"test"`` (for COCO it reads val2014)."""
    _check_dataset(dataset)
    return _EVAL_SPLIT.get(dataset, "test")


def load_index(
    dataset: str,
    data_dir: str | None,
    split: str,
    *,
    on_bad_image: str = "error",
    voc_difficult: str = "positive",
    manifest_classes: str | None = None,
    synthetic: SyntheticConfig | None = None,
) -> DatasetIndex:
    """Read one split of ``dataset`` into a :class:`DatasetIndex` (see docs/DATA.md for each layout).

    ``data_dir`` is the dataset folder; for ``"synthetic"`` it is optional and, when given, is the
    cache folder (overriding ``synthetic.cache_dir``). ``on_bad_image``: ``"error"`` (raise on a
    missing or undecodable image, listing the first ones) or ``"skip"`` (leave them out, counted in
    ``index.skipped``). ``voc_difficult``: ``"positive"`` or ``"ignore"`` (VOC only).
    ``manifest_classes``: class-list file (manifest only). ``synthetic``: the generator config
    (default :class:`SyntheticConfig`); for ``"fashion-multi"`` its sizes, seed and cache folder are used
    and ``data_dir`` is the folder of the Fashion-MNIST IDX files (default: the Debian package's).
    """
    _check_dataset(dataset)
    check_on_bad_image(on_bad_image)
    if voc_difficult not in VOC_DIFFICULT:
        raise ValueError(f"voc_difficult must be one of {VOC_DIFFICULT}, got {voc_difficult!r}")
    if dataset in GENERATED:
        config = synthetic or SyntheticConfig()
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"{dataset} split must be one of {', '.join(SYNTHETIC_SPLITS)}, got {split!r}")
        if dataset == "synthetic":
            if data_dir is not None:
                config = SyntheticConfig(**{**config.__dict__, "cache_dir": data_dir})
            root, classes = ensure_synthetic(config), SYNTHETIC_CLASSES
        else:
            root = ensure_fashion_multi(FashionMultiConfig(
                train_size=config.train_size, test_size=config.test_size, img_size=config.img_size,
                seed=config.seed, cache_dir=config.cache_dir, source_dir=data_dir))
            classes = FASHION_CLASSES
        read = read_voc(root, split if split in ("train", "test") else "train", classes=classes, name=dataset,
                        on_bad_image=on_bad_image)
        return read if split in ("train", "test") else _synthetic_carve(read, split)
    if dataset == "voc":
        return read_voc(data_dir, split, difficult=voc_difficult, on_bad_image=on_bad_image)
    if dataset == "coco":
        return read_coco(data_dir, split, on_bad_image=on_bad_image)
    if dataset == "mirflickr":
        return read_mirflickr(data_dir, split, on_bad_image=on_bad_image)
    if dataset == "nuswide":
        return read_nuswide(data_dir, split, on_bad_image=on_bad_image)
    return read_manifest(data_dir, split, manifest_classes=manifest_classes, on_bad_image=on_bad_image)
