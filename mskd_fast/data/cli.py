"""Command-line flags for choosing and reading a dataset (used by the trainer and the evaluator)."""

from __future__ import annotations

import argparse

from .datasets import DATASETS, eval_split_name, load_index, train_split_name
from .index import ON_BAD_IMAGE, DatasetIndex
from .synthetic import SyntheticConfig
from .voc import VOC_DIFFICULT

ROLES = ("train", "eval")


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the dataset flags (group "data") to ``parser`` and return the group.

    Flags: ``--dataset --data-dir --train-split --eval-split --voc-difficult --on-bad-image
    --manifest-classes --synthetic-size --synthetic-test-size --synthetic-img-size --synthetic-seed
    --synthetic-cache``.
    """
    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="synthetic",
        help="dataset to train/evaluate on (synthetic: the built-in multi-scale dataset of coloured shapes; "
        "fashion-multi: the built-in real-object dataset, Fashion-MNIST composites, needs the Debian package "
        "dataset-fashion-mnist or --data-dir)",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="dataset folder (voc: holds VOCdevkit/ or is VOC2007/; coco: holds train2014/ val2014/ "
        "annotations/; mirflickr, nuswide, manifest: see docs/DATA.md; synthetic: cache folder; fashion-multi: "
        "folder of the Fashion-MNIST IDX files, if not /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument("--train-split", default=None, help="training split; unset: trainval for voc, train otherwise")
    g.add_argument("--eval-split", default=None, help="evaluation split; unset: test (for coco that is val2014)")
    g.add_argument(
        "--voc-difficult",
        choices=VOC_DIFFICULT,
        default="positive",
        help="VOC objects marked difficult: count them as positive or ignore them",
    )
    g.add_argument(
        "--on-bad-image",
        choices=ON_BAD_IMAGE,
        default="error",
        help="missing/undecodable images: stop with a list (error) or skip them and report the count (skip)",
    )
    g.add_argument(
        "--manifest-classes",
        default=None,
        help="manifest datasets: file with one class name per line (fixes the class order)",
    )
    g.add_argument(
        "--synthetic-size",
        type=int,
        default=SyntheticConfig.train_size,
        help="generated datasets (synthetic, fashion-multi): number of training images",
    )
    g.add_argument(
        "--synthetic-test-size",
        type=int,
        default=None,
        help="generated datasets: number of test images; unset: 30%% of --synthetic-size",
    )
    g.add_argument(
        "--synthetic-img-size",
        type=int,
        default=SyntheticConfig.img_size,
        help="generated datasets: image side in pixels",
    )
    g.add_argument(
        "--synthetic-seed",
        type=int,
        default=SyntheticConfig.seed,
        help="generated datasets: generator seed",
    )
    g.add_argument(
        "--synthetic-cache",
        default=None,
        help="generated datasets: cache folder; unset: $MSKD_FAST_CACHE or ~/.cache/mskd_fast",
    )
    return g


def synthetic_config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    """The :class:`SyntheticConfig` the ``--synthetic-*`` flags describe."""
    return SyntheticConfig(
        train_size=args.synthetic_size,
        test_size=args.synthetic_test_size,
        img_size=args.synthetic_img_size,
        seed=args.synthetic_seed,
        cache_dir=args.synthetic_cache,
    )


def split_from_args(args: argparse.Namespace, role: str) -> str:
    """The split name for ``role`` (``"train"`` or ``"eval"``): the flag if given, else the dataset default."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "train":
        return args.train_split or train_split_name(args.dataset)
    return args.eval_split or eval_split_name(args.dataset)


def index_from_args(args: argparse.Namespace, split: str) -> DatasetIndex:
    """Load the index the flags describe, for ``split`` = ``"train"`` or ``"eval"`` (a role).

    The role is mapped to a split name by :func:`split_from_args` (e.g. ``"train"`` is VOC's
    ``trainval``; ``--train-split``/``--eval-split`` override).
    """
    return load_index(
        args.dataset,
        args.data_dir,
        split_from_args(args, split),
        on_bad_image=args.on_bad_image,
        voc_difficult=args.voc_difficult,
        manifest_classes=args.manifest_classes,
        synthetic=synthetic_config_from_args(args),
    )
