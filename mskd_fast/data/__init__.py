"""Datasets and loaders for multi-label training.

Readers (VOC, COCO, MIRFLICKR, NUS-WIDE, CSV/JSON-lines manifests, and the built-in synthetic
multi-scale dataset) produce a :class:`DatasetIndex`; :func:`build_loader` turns it into batches of
``(images, targets, sample_ids)`` with NVIDIA DALI (GPU or CPU) or a torch DataLoader. Layouts,
split rules and what is dropped are documented in docs/DATA.md.
"""

from __future__ import annotations

from .base import IMAGENET_MEAN, IMAGENET_STD, Loader
from .cli import add_data_args, index_from_args, split_from_args, synthetic_config_from_args
from .dali import dali_import_error
from .datasets import DATASETS, eval_split_name, load_index, train_split_name
from .index import DatasetError, DatasetIndex, ImageDecodeError
from .loader import LOADERS, build_loader, dali_decode_device, resolve_backend
from .synthetic import SYNTHETIC_CLASSES, SyntheticConfig, ensure_synthetic
from .voc import VOC_CLASSES

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOADERS",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "DatasetError",
    "DatasetIndex",
    "ImageDecodeError",
    "Loader",
    "SyntheticConfig",
    "add_data_args",
    "build_loader",
    "dali_decode_device",
    "dali_import_error",
    "ensure_synthetic",
    "eval_split_name",
    "index_from_args",
    "load_index",
    "resolve_backend",
    "split_from_args",
    "synthetic_config_from_args",
    "train_split_name",
]
