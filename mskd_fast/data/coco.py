"""MS-COCO reader (2014 layout; 2017 is used when the 2014 files are absent).

Layout under ``data_dir``: ``train2014/``, ``val2014/``, ``annotations/instances_{train,val}2014.json``.
Splits: ``train`` reads train2014; ``test`` (alias ``val``) reads val2014, as multi-label papers do.

Classes: the 80 categories ordered by category id. Labels: every annotation (crowd included)
marks its category positive. Boxes: COCO ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``; crowd
regions are left out of the boxes (they are groups, not objects) and counted under
``skipped["crowd_box"]``, boxes with ``w <= 0`` or ``h <= 0`` under ``skipped["degenerate_box"]``
(both count objects, not images). Images without annotations are dropped and counted under
``skipped["no_labels"]``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from .index import DatasetError, DatasetIndex, finalize_index, labels_from_sets, raise_listing, read_text

_SPLITS = {"train": "train", "test": "val", "val": "val"}


def _locate(data_dir: str, split: str) -> tuple[str, str]:
    part = _SPLITS[split]
    tried = []
    for year in ("2014", "2017"):
        images = os.path.join(data_dir, f"{part}{year}")
        ann = os.path.join(data_dir, "annotations", f"instances_{part}{year}.json")
        if os.path.isdir(images) and os.path.isfile(ann):
            return images, ann
        tried.append(f"{images}/ + {ann}")
    raise DatasetError(f"COCO split {split!r} not found under {data_dir!r}: expected " + " or ".join(tried))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_records(ann_path: str, data: dict) -> None:
    """Every image, category and annotation record has the fields the reader uses, with usable values.

    Raises :class:`DatasetError` listing ``FILE: images[K] (id ID): 'file_name' is missing``-style lines.
    """
    problems: list[str] = []

    def need(record, where: str, field: str, ok, expected: str) -> None:
        if not isinstance(record, dict):
            problems.append(f"{where}: is {type(record).__name__}, expected an object")
        elif field not in record:
            problems.append(f"{where}: {field!r} is missing")
        elif not ok(record[field]):
            value = "null" if record[field] is None else repr(record[field])[:60]
            problems.append(f"{where}: {field!r} is {value}, expected {expected}")

    int_id = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for key, fields in (("images", (("id", int_id, "an integer"),
                                    ("file_name", lambda v: isinstance(v, str) and v, "a file name"))),
                        ("categories", (("id", int_id, "an integer"),
                                        ("name", lambda v: isinstance(v, str) and v, "a name")))):
        seen = {}
        for k, record in enumerate(data[key]):
            rid = record.get("id") if isinstance(record, dict) else None
            where = f"{ann_path}: {key}[{k}]" + (f" (id {rid})" if rid is not None else "")
            for field, ok, expected in fields:
                need(record, where, field, ok, expected)
            if int_id(rid):
                if rid in seen:
                    problems.append(f"{where}: id {rid} repeats {key}[{seen[rid]}]")
                seen.setdefault(rid, k)
    bbox_ok = lambda v: isinstance(v, (list, tuple)) and len(v) == 4 and all(_is_number(x) for x in v)  # noqa: E731
    for k, ann in enumerate(data["annotations"]):
        rid = ann.get("id") if isinstance(ann, dict) else None
        where = f"{ann_path}: annotation {rid} (annotations[{k}])" if rid is not None else \
            f"{ann_path}: annotations[{k}]"
        for field in ("image_id", "category_id"):
            need(ann, where, field, lambda v: True, "")
        need(ann, where, "bbox", bbox_ok, "[x, y, width, height] of 4 finite numbers")
    if problems:
        raise_listing(f"{ann_path}: malformed records", problems)


def read_coco(data_dir: str, split: str, *, on_bad_image: str = "error") -> DatasetIndex:
    """Read the COCO ``train`` or ``test``/``val`` split into a :class:`DatasetIndex` with boxes."""
    if data_dir is None:
        raise ValueError("data_dir is required for COCO (the folder holding train2014/, val2014/, annotations/)")
    if split not in _SPLITS:
        raise ValueError(f"COCO split must be one of {sorted(_SPLITS)}, got {split!r}")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data_dir {data_dir!r} does not exist or is not a folder")
    image_dir, ann_path = _locate(data_dir, split)
    try:
        data = json.loads(read_text(ann_path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{ann_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_path}: missing the {key!r} list of a COCO instances file")
    _check_records(ann_path, data)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_names = [c["name"] for c in categories]
    cat_to_idx = {c["id"]: i for i, c in enumerate(categories)}
    images = sorted(data["images"], key=lambda im: im["id"])
    row_of = {im["id"]: r for r, im in enumerate(images)}
    label_sets = [set() for _ in images]
    boxes = [[] for _ in images]
    box_classes = [[] for _ in images]
    problems: list[str] = []
    skipped = {"crowd_box": 0, "degenerate_box": 0}
    for ann in data["annotations"]:
        row = row_of.get(ann.get("image_id"))
        cls = cat_to_idx.get(ann.get("category_id"))
        if row is None or cls is None:
            problems.append(
                f"annotation {ann.get('id')}: unknown image_id {ann.get('image_id')!r} or "
                f"category_id {ann.get('category_id')!r}"
            )
            continue
        label_sets[row].add(cls)
        if ann.get("iscrowd", 0):
            skipped["crowd_box"] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])  # checked by _check_records
        if w <= 0 or h <= 0:
            skipped["degenerate_box"] += 1
            continue
        boxes[row].append((x, y, x + w, y + h))
        box_classes[row].append(cls)
    if problems:
        raise_listing(f"{ann_path}: annotations referring to unknown images or categories", problems)
    index = DatasetIndex(
        name="coco",
        split=split,
        root=os.path.abspath(data_dir),
        paths=[os.path.join(os.path.abspath(image_dir), im["file_name"]) for im in images],
        labels=labels_from_sets(label_sets, len(class_names)),
        class_names=class_names,
        boxes=[np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes],
        box_classes=[np.asarray(k, dtype=np.int64) for k in box_classes],
        skipped=skipped,
    )
    return finalize_index(index, on_bad_image=on_bad_image)
