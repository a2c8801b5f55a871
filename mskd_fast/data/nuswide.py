"""NUS-WIDE reader (the official ``ImageList/`` + ``TrainTestLabels/`` layout, 81 concepts).

Layout under ``data_dir``:

* ``ImageList/TrainImagelist.txt`` and ``ImageList/TestImagelist.txt``: one image per line, a
  relative path such as ``actor\\0001_2124494179.jpg`` (backslashes are accepted);
* ``TrainTestLabels/Labels_<concept>_Train.txt`` / ``..._Test.txt``: one ``0``/``1`` per line,
  aligned with the image list of the split;
* the concept order: ``Concepts81.txt`` (in ``data_dir`` or ``data_dir/ConceptsList``) when present,
  else the concept names of the label files in sorted order;
* the images: ``<image root>/<folder>/<file>``, where the image root is ``data_dir/Flickr``,
  ``data_dir/images`` or ``data_dir`` (the first that exists, in that order).

Splits ``train``/``test``. Images without any concept are dropped and counted under
``skipped["no_labels"]``; images missing on disk are bad images (see ``on_bad_image``).
"""

from __future__ import annotations

import os
import re

import numpy as np

from .index import DatasetError, DatasetIndex, finalize_index, raise_listing, read_text

SPLITS = {"train": "Train", "test": "Test"}
_LABEL_RE = re.compile(r"^Labels_(.+)_(Train|Test)\.txt$")


def _concepts(data_dir: str, label_dir: str) -> list[str]:
    from_files = sorted({m.group(1) for f in os.listdir(label_dir) if (m := _LABEL_RE.match(f))})
    for path in (os.path.join(data_dir, "Concepts81.txt"), os.path.join(data_dir, "ConceptsList", "Concepts81.txt")):
        if os.path.isfile(path):
            names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
            if len(set(names)) != len(names):
                raise DatasetError(f"{path} lists some concepts more than once")
            return names
    if not from_files:
        raise DatasetError(f"{label_dir}: no Labels_<concept>_Train.txt / _Test.txt files")
    return from_files


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DatasetError(f"NUS-WIDE file missing: {path}")
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_nuswide(data_dir: str, split: str, *, on_bad_image: str = "error") -> DatasetIndex:
    """Read the NUS-WIDE ``train`` or ``test`` split into a :class:`DatasetIndex` (no boxes)."""
    if data_dir is None:
        raise ValueError("data_dir is required for NUS-WIDE (the folder holding ImageList/ and TrainTestLabels/)")
    if split not in SPLITS:
        raise ValueError(f"NUS-WIDE split must be one of {sorted(SPLITS)}, got {split!r}")
    label_dir = os.path.join(data_dir, "TrainTestLabels")
    if not os.path.isdir(data_dir) or not os.path.isdir(label_dir):
        raise DatasetError(f"data_dir {data_dir!r} is not a NUS-WIDE folder: {label_dir} is missing")
    tag = SPLITS[split]
    entries = _read_lines(os.path.join(data_dir, "ImageList", f"{tag}Imagelist.txt"))
    class_names = _concepts(data_dir, label_dir)
    labels = np.zeros((len(entries), len(class_names)), dtype=np.uint8)
    problems: list[str] = []
    for c, concept in enumerate(class_names):
        path = os.path.join(label_dir, f"Labels_{concept}_{tag}.txt")
        values = _read_lines(path)
        if len(values) != len(entries):
            problems.append(f"{path}: {len(values)} lines, expected {len(entries)} (one per image in the list)")
            continue
        bad = [i for i, v in enumerate(values) if v not in ("0", "1")]
        if bad:
            problems.append(f"{path}:{bad[0] + 1}: expected 0 or 1, got {values[bad[0]]!r}")
            continue
        labels[:, c] = np.asarray(values) == "1"
    if problems:
        raise_listing(f"NUS-WIDE {split} labels under {label_dir}: malformed label files", problems)
    image_root = next(
        (d for d in (os.path.join(data_dir, "Flickr"), os.path.join(data_dir, "images")) if os.path.isdir(d)), data_dir
    )
    image_root = os.path.abspath(image_root)
    paths = [os.path.join(image_root, *e.replace("\\", "/").split("/")[-2:]) for e in entries]
    index = DatasetIndex(
        name="nuswide",
        split=split,
        root=os.path.abspath(data_dir),
        paths=paths,
        labels=labels,
        class_names=class_names,
    )
    return finalize_index(index, on_bad_image=on_bad_image)
