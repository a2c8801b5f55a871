"""``fashion-multi``: a built-in multi-label dataset of real objects, composited from Fashion-MNIST.

Fashion-MNIST (Xiao et al., 2017; 70,000 28x28 grey photographs of Zalando products in 10 classes) is read
from its IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``), by default from the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or from ``--data-dir``.

Each composite is a square canvas of ``img_size`` pixels: a dark background (a random grey level per
channel, 0-40) with Gaussian noise, and 1-4 items (uniform), each an item photograph resized to a square
whose side is log-uniform between ``img_size / 6`` (tiny) and ``2 * img_size / 3``, placed uniformly inside
the canvas and pasted largest first (so small items stay visible), with the item's grey level as opacity
and a random tint (each channel x U(0.6, 1.0)). Labels: the set of the items' classes. Boxes: the pasted
squares (per-scale recall bins them by side).

Item pools are disjoint (:data:`POOLS`): the ``train`` composites (and the ``train-fit`` / ``val`` splits
carved from them) use training items 50,000-59,999; ``test`` uses the official test set; training items
0-49,999 are left for pretraining a backbone on single items (the accuracy study's harness does that with
:func:`render_composite`). Image ``i`` of a split is drawn by ``numpy.random.default_rng([seed, split, i])``.

The dataset is written once in VOC layout into ``<cache>/fashion-multi-v<version>-train<n>-test<m>-px<size>
-seed<seed>-src<hash>/`` (``src`` identifies the IDX files) and read by the VOC reader, like ``synthetic``.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .generated import cache_root, ensure_generated, write_voc_split
from .index import DatasetError

__all__ = [
    "DEBIAN_DIR",
    "FASHION_CLASSES",
    "FashionMultiConfig",
    "POOLS",
    "ensure_fashion_multi",
    "fashion_multi_dir",
    "find_fashion_mnist",
    "load_items",
    "read_idx",
    "render_composite",
]

GENERATOR_VERSION = 1
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot")
SPLITS = ("train", "test")
# pool name -> (IDX file set, first item, end item)
POOLS = {"pretrain": ("train", 0, 50_000), "train": ("train", 50_000, 60_000), "test": ("t10k", 0, 10_000)}
MIN_ITEMS, MAX_ITEMS = 1, 4
MIN_SIDE_FRAC, MAX_SIDE_FRAC = 1 / 6, 2 / 3
_FILES = {kind: (f"{kind}-images-idx3-ubyte", f"{kind}-labels-idx1-ubyte") for kind in ("train", "t10k")}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not): images ``(n, rows, cols)`` or labels ``(n,)``, uint8.

    Raises :class:`DatasetError` naming ``path`` for a missing, truncated or malformed file.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 8:
        raise DatasetError(f"IDX file {path} is too short ({len(data)} bytes) for a header")
    magic, count = struct.unpack(">II", data[:8])
    if magic == _IMAGE_MAGIC:
        if len(data) < 16:
            raise DatasetError(f"IDX image file {path} is too short ({len(data)} bytes) for its 16-byte header")
        rows, cols = struct.unpack(">II", data[8:16])
        shape, offset = (count, rows, cols), 16
    elif magic == _LABEL_MAGIC:
        shape, offset = (count,), 8
    else:
        raise DatasetError(f"{path} is not an IDX image or label file (magic number {magic}, expected "
                           f"{_IMAGE_MAGIC} or {_LABEL_MAGIC})")
    expected = offset + math.prod(shape)
    if len(data) != expected:
        raise DatasetError(f"IDX file {path} has {len(data)} bytes, its header {shape} says {expected}: truncated "
                           "or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _idx_path(folder: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def find_fashion_mnist(data_dir: str | None = None) -> dict[str, tuple[str, str]]:
    """The IDX files ``{"train": (images, labels), "t10k": (images, labels)}`` in ``data_dir`` (default: the
    Debian package's folder); raises ``FileNotFoundError`` naming the folder and the package when one is missing."""
    folder = os.path.abspath(os.path.expanduser(data_dir or DEBIAN_DIR))
    found, missing = {}, []
    for kind, stems in _FILES.items():
        paths = tuple(_idx_path(folder, stem) for stem in stems)
        missing += [stem + "[.gz]" for stem, p in zip(stems, paths) if p is None]
        found[kind] = paths
    if missing:
        hint = ("install the Debian package (apt-get install dataset-fashion-mnist)" if data_dir is None else
                f"point --data-dir at the folder that holds them (default: {DEBIAN_DIR}, from the Debian package "
                f"{DEBIAN_PACKAGE})")
        raise FileNotFoundError(f"fashion-multi needs the Fashion-MNIST IDX files; searched {folder} and did not "
                                f"find {', '.join(missing)}: {hint}")
    return found


def _source_id(files: dict[str, tuple[str, str]]) -> str:
    digest = hashlib.sha1()
    for kind in sorted(files):
        for path in files[kind]:
            with open(path, "rb") as fh:
                digest.update(hashlib.sha1(fh.read()).digest())
    return digest.hexdigest()[:10]


def load_items(pool: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The item photographs ``(n, 28, 28)`` uint8 and labels ``(n,)`` int64 of one of :data:`POOLS`."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    kind, lo, hi = POOLS[pool]
    images_path, labels_path = find_fashion_mnist(data_dir)[kind]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{images_path} / {labels_path}: expected an image file and a label file")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(images) < hi:
        raise DatasetError(f"{images_path} has {len(images)} items; pool {pool!r} needs items {lo}-{hi - 1}")
    if labels.max(initial=0) >= len(FASHION_CLASSES):
        raise DatasetError(f"{labels_path}: label {int(labels.max())} outside the 10 Fashion-MNIST classes")
    return images[lo:hi], labels[lo:hi].astype(np.int64)


def render_composite(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int, *,
                     min_items: int = MIN_ITEMS, max_items: int = MAX_ITEMS, min_side_frac: float = MIN_SIDE_FRAC,
                     max_side_frac: float = MAX_SIDE_FRAC) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one composite (see the module docstring) from ``items (n, h, w)`` uint8 / ``labels (n,)``.

    Returns ``(image (size, size, 3) uint8, boxes (k, 4) int64 (x1, y1, x2, y2) with x2/y2 exclusive,
    classes (k,) int64)``, ``k`` items in ``[min_items, max_items]``.
    """
    k = int(rng.integers(min_items, max_items + 1))
    picks = rng.integers(0, len(items), size=k)
    lo, hi = math.log(max(2.0, min_side_frac * size)), math.log(max(2.0, max_side_frac * size))
    sides = np.clip(np.rint(np.exp(rng.uniform(lo, hi, size=k))), 2, size).astype(np.int64)
    xs = np.array([rng.integers(0, size - s + 1) for s in sides], dtype=np.int64)
    ys = np.array([rng.integers(0, size - s + 1) for s in sides], dtype=np.int64)
    tints = rng.uniform(0.6, 1.0, size=(k, 3))
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = rng.uniform(0.0, 40.0, size=3).astype(np.float32)
    for j in np.argsort(-sides, kind="stable"):
        s, x, y = int(sides[j]), int(xs[j]), int(ys[j])
        item = Image.fromarray(items[picks[j]], "L").resize((s, s), Image.BILINEAR)
        alpha = np.asarray(item, dtype=np.float32)[..., None] / 255.0
        region = canvas[y : y + s, x : x + s]
        region[:] = region * (1.0 - alpha) + alpha * (255.0 * tints[j]).astype(np.float32)
    canvas += rng.normal(0.0, 6.0, size=canvas.shape).astype(np.float32)
    boxes = np.stack([xs, ys, xs + sides, ys + sides], axis=1)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), boxes, labels[picks].astype(np.int64)


@dataclass(frozen=True)
class FashionMultiConfig:
    """Size, resolution, seed, cache folder and IDX source of ``fashion-multi``.

    ``train_size`` composites in ``train`` (items 50,000-59,999), ``test_size`` in ``test`` (official test
    items; ``None``: 30 % of ``train_size``, at least 1), ``img_size`` pixels square; ``cache_dir`` ``None``
    means ``$MSKD_FAST_CACHE`` or ``~/.cache/mskd_fast``; ``source_dir`` ``None`` means the Debian package.
    """

    train_size: int = 2000
    test_size: int | None = None
    img_size: int = 64
    seed: int = 0
    cache_dir: str | None = None
    source_dir: str | None = None

    def __post_init__(self):
        for name in ("train_size", "img_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"fashion-multi {name} must be an int, got {type(value).__name__}")
        if self.train_size < 1:
            raise ValueError(f"fashion-multi train_size must be >= 1, got {self.train_size}")
        if self.test_size is not None and (not isinstance(self.test_size, int) or self.test_size < 1):
            raise ValueError(f"fashion-multi test_size must be an int >= 1 or None, got {self.test_size!r}")
        if self.img_size < 24:
            raise ValueError(f"fashion-multi img_size must be >= 24 pixels, got {self.img_size}")
        if self.seed < 0:
            raise ValueError(f"fashion-multi seed must be >= 0, got {self.seed}")

    @property
    def num_test(self) -> int:
        return self.test_size if self.test_size is not None else max(1, round(0.3 * self.train_size))

    def split_size(self, split: str) -> int:
        return self.train_size if split == "train" else self.num_test

    def meta(self, source_id: str) -> dict:
        return {
            "generator_version": GENERATOR_VERSION, "train_size": self.train_size, "test_size": self.num_test,
            "img_size": self.img_size, "seed": self.seed, "classes": list(FASHION_CLASSES),
            "pools": {k: list(v) for k, v in POOLS.items()},
            "items": [MIN_ITEMS, MAX_ITEMS], "side_frac": [MIN_SIDE_FRAC, MAX_SIDE_FRAC], "source": source_id,
        }


def fashion_multi_dir(config: FashionMultiConfig, source_id: str) -> str:
    """The dataset folder of ``config`` built from the IDX files identified by ``source_id``."""
    name = (f"fashion-multi-v{GENERATOR_VERSION}-train{config.train_size}-test{config.num_test}"
            f"-px{config.img_size}-seed{config.seed}-src{source_id}")
    return os.path.join(cache_root(config.cache_dir), name)


def _split_images(config: FashionMultiConfig, split: str, items: np.ndarray, labels: np.ndarray):
    code = SPLITS.index(split)
    for i in range(config.split_size(split)):
        image, boxes, classes = render_composite(np.random.default_rng([config.seed, code, i]), items, labels,
                                                 config.img_size)
        yield f"{split}_{i:06d}", image, boxes, classes


def ensure_fashion_multi(config: FashionMultiConfig) -> str:
    """Return the dataset folder of ``config``, generating it first if it is not in the cache."""
    files = find_fashion_mnist(config.source_dir)
    source_id = _source_id(files)

    def generate(out_dir: str) -> None:
        for split in SPLITS:
            items, labels = load_items(split, config.source_dir)
            write_voc_split(out_dir, split, _split_images(config, split, items, labels), FASHION_CLASSES,
                            "fashion-multi")

    return ensure_generated(fashion_multi_dir(config, source_id), config.meta(source_id), generate,
                            what="fashion-multi dataset")
