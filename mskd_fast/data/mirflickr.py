"""MIRFLICKR-25k reader.

Layout under ``data_dir``: images ``im<n>.jpg`` (n = 1..25000) in ``data_dir/mirflickr/`` or
``data_dir`` itself, and one annotation file per concept, ``<concept>.txt`` listing the numbers
of the images that show it (one per line), in ``annotations/`` or ``mirflickr25k_annotations_v080/``
(under ``data_dir`` or ``data_dir/mirflickr``). The concept list is read from those files: every
``*.txt`` except ``README*`` and the ``*_r1.txt`` "relevant" subsets, in sorted order (24 concepts
in the official release).

Split (as the MSKD authors use it): with images numbered 1..N (N = the largest number among the
image files and annotations, 25,000 officially), ``train`` is ``1..floor(0.8 N)`` (the first 20,000)
and ``test`` the rest (the last 5,000). Numbers in that range without an image file count as
missing images; images without any concept are dropped and counted under ``skipped["no_labels"]``.
"""

from __future__ import annotations

import os
import re

from .index import DatasetError, DatasetIndex, finalize_index, labels_from_sets, raise_listing, read_text

_IMAGE_RE = re.compile(r"^im(\d+)\.jpg$")
_ANN_DIRS = ("annotations", "mirflickr25k_annotations_v080")
SPLITS = ("train", "test")
TRAIN_FRACTION = 0.8


def _find_dirs(data_dir: str) -> tuple[str, str]:
    bases = [data_dir, os.path.join(data_dir, "mirflickr")]
    image_dir = next((b for b in bases if os.path.isdir(b) and any(_IMAGE_RE.match(f) for f in os.listdir(b))), None)
    ann_dir = next((os.path.join(b, a) for b in bases for a in _ANN_DIRS if os.path.isdir(os.path.join(b, a))), None)
    if image_dir is None or ann_dir is None:
        raise DatasetError(
            f"data_dir {data_dir!r} is not a MIRFLICKR folder: expected im<n>.jpg images in it or in mirflickr/ "
            f"(found: {image_dir}) and an annotations folder named one of {_ANN_DIRS} (found: {ann_dir})"
        )
    return image_dir, ann_dir


def _read_concepts(ann_dir: str) -> dict[str, list[int]]:
    files = sorted(
        f for f in os.listdir(ann_dir)
        if f.endswith(".txt") and not f.lower().startswith("readme") and not f.endswith("_r1.txt")
    )  # fmt: skip
    if not files:
        raise DatasetError(f"{ann_dir}: no <concept>.txt annotation files")
    concepts: dict[str, list[int]] = {}
    problems: list[str] = []
    for name in files:
        path = os.path.join(ann_dir, name)
        numbers = []
        for line_no, line in enumerate(read_text(path).splitlines(), 1):
            text = line.strip()
            if not text:
                continue
            if not text.isdigit() or int(text) == 0:
                problems.append(f"{path}:{line_no}: expected a positive image number, got {text!r}")
                continue
            numbers.append(int(text))
        concepts[name[:-4]] = numbers
    if problems:
        raise_listing(f"{ann_dir}: malformed annotation lines", problems)
    return concepts


def read_mirflickr(data_dir: str, split: str, *, on_bad_image: str = "error") -> DatasetIndex:
    """Read the MIRFLICKR ``train`` or ``test`` split (positional 80/20 split, see the module docstring)."""
    if data_dir is None:
        raise ValueError("data_dir is required for MIRFLICKR (the folder holding the images and annotations/)")
    if split not in SPLITS:
        raise ValueError(f"MIRFLICKR split must be one of {SPLITS}, got {split!r}")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data_dir {data_dir!r} does not exist or is not a folder")
    image_dir, ann_dir = _find_dirs(data_dir)
    concepts = _read_concepts(ann_dir)
    class_names = list(concepts)
    on_disk = [int(m.group(1)) for f in os.listdir(image_dir) if (m := _IMAGE_RE.match(f))]
    total = max(max(on_disk), max((max(v) for v in concepts.values() if v), default=0))
    n_train = int(total * TRAIN_FRACTION)
    numbers = range(1, n_train + 1) if split == "train" else range(n_train + 1, total + 1)
    first = numbers.start
    label_sets = [set() for _ in numbers]
    for cls, (_, members) in enumerate(concepts.items()):
        for n in members:
            if n in numbers:
                label_sets[n - first].add(cls)
    index = DatasetIndex(
        name="mirflickr",
        split=split,
        root=os.path.abspath(data_dir),
        paths=[os.path.join(os.path.abspath(image_dir), f"im{n}.jpg") for n in numbers],
        labels=labels_from_sets(label_sets, len(class_names)),
        class_names=class_names,
    )
    return finalize_index(index, on_bad_image=on_bad_image)
