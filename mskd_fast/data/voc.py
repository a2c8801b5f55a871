"""Pascal VOC reader (VOC 2007 layout; also reads the built-in synthetic dataset).

Layout: ``<root>/{JPEGImages,Annotations,ImageSets/Main}``, where ``root`` is ``data_dir`` itself,
``data_dir/VOC2007`` or ``data_dir/VOCdevkit/VOC2007``. A split is the list of image ids in
``ImageSets/Main/<split>.txt`` (``trainval`` and ``test`` for VOC 2007). Each id has
``JPEGImages/<id>.jpg`` and ``Annotations/<id>.xml``.

Labels: a class is positive when the image has at least one object of it. ``difficult="positive"``
(default) counts difficult objects like any other; ``difficult="ignore"`` drops them (label and
box). Boxes: VOC's 1-based inclusive ``xmin..xmax`` become ``x1 = xmin - 1, x2 = xmax`` (0-based,
x2 exclusive), so ``x2 - x1`` is the width in pixels.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from .index import DatasetError, DatasetIndex, finalize_index, labels_from_sets, raise_listing, read_text

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VOC_DIFFICULT = ("positive", "ignore")
_PARTS = ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main"))


def resolve_voc_root(data_dir: str) -> str:
    """The folder holding ``JPEGImages/``, ``Annotations/`` and ``ImageSets/Main/`` for ``data_dir``."""
    if data_dir is None:
        raise ValueError("data_dir is required for a VOC dataset (the folder holding VOCdevkit/ or VOC2007/)")
    candidates = [data_dir, os.path.join(data_dir, "VOC2007"), os.path.join(data_dir, "VOCdevkit", "VOC2007")]
    for root in candidates:
        if all(os.path.isdir(os.path.join(root, part)) for part in _PARTS):
            return os.path.abspath(root)
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data_dir {data_dir!r} does not exist or is not a folder")
    raise DatasetError(
        f"data_dir {data_dir!r} is not a VOC folder: expected JPEGImages/, Annotations/ and ImageSets/Main/ "
        f"in one of {candidates}"
    )


def read_split_ids(root: str, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt`` (first field of each non-empty line)."""
    main = os.path.join(root, "ImageSets", "Main")
    path = os.path.join(main, f"{split}.txt")
    if not os.path.isfile(path):
        available = sorted(f[:-4] for f in os.listdir(main) if f.endswith(".txt") and "_" not in f)
        raise DatasetError(f"split {split!r} not found: {path} is missing (split files present: {available})")
    ids = [line.split()[0] for line in read_text(path).splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file {path} lists no images")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"split file {path} lists some image ids more than once")
    return ids


def _number(parent, tag: str, where: str, problems: list[str]) -> float | None:
    """``float`` of ``parent``'s ``<tag>`` text, or ``None`` and a problem naming the field (absent, not a number)."""
    text = parent.findtext(tag)
    if text is None or not text.strip():
        problems.append(f"{where}<{tag}> is missing")
        return None
    try:
        value = float(text)
    except ValueError:
        problems.append(f"{where}<{tag}> is {text.strip()!r}, expected a number")
        return None
    if value != value or value in (float("inf"), float("-inf")):
        problems.append(f"{where}<{tag}> is {text.strip()!r}, expected a finite number")
        return None
    return value


def _parse_annotation(path: str, class_to_idx: dict[str, int], difficult: str, problems: list[str]):
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        problems.append(f"{path}: annotation file missing")
        return None
    except ET.ParseError as exc:
        problems.append(f"{path}: malformed XML ({exc})")
        return None
    root = tree.getroot()
    size = root.find("size")
    width = height = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        width = _number(size, "width", f"{path}: <size>", problems)
        height = _number(size, "height", f"{path}: <size>", problems)
        if width is None or height is None:
            width = height = None
    boxes, classes = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_to_idx:
            problems.append(f"{path}: unknown class {name!r}")
            continue
        if difficult == "ignore" and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        bnd = obj.find("bndbox")
        if bnd is None:
            problems.append(f"{path}: object {name!r} has no <bndbox>")
            continue
        where = f"{path}: object {name!r} <bndbox>"
        values = [_number(bnd, k, where, problems) for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in values):
            continue
        xmin, ymin, xmax, ymax = values
        x1, y1, x2, y2 = xmin - 1.0, ymin - 1.0, xmax, ymax
        if not (x2 > x1 and y2 > y1 and x1 >= 0 and y1 >= 0):
            problems.append(f"{path}: object {name!r} has an empty or negative box {(xmin, ymin, xmax, ymax)}")
            continue
        if width is not None and (x2 > width or y2 > height):
            problems.append(
                f"{path}: object {name!r} box {(xmin, ymin, xmax, ymax)} exceeds the image {width}x{height}"
            )
            continue
        boxes.append((x1, y1, x2, y2))
        classes.append(class_to_idx[name])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes, dtype=np.int64)


def read_voc(
    data_dir: str,
    split: str,
    *,
    classes: tuple[str, ...] | list[str] = VOC_CLASSES,
    name: str = "voc",
    difficult: str = "positive",
    on_bad_image: str = "error",
) -> DatasetIndex:
    """Read one split of a VOC-layout dataset into a :class:`DatasetIndex` with boxes.

    ``classes`` fixes the class order (VOC's 20 classes, alphabetical, by default). Unknown class
    names, missing or malformed annotations and invalid boxes raise :class:`DatasetError` listing
    the first offending files; images are checked as :func:`finalize_index` describes.
    """
    if difficult not in VOC_DIFFICULT:
        raise ValueError(f"voc_difficult must be one of {VOC_DIFFICULT}, got {difficult!r}")
    root = resolve_voc_root(data_dir)
    ids = read_split_ids(root, split)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    problems: list[str] = []
    boxes, box_classes, label_sets = [], [], []
    for image_id in ids:
        parsed = _parse_annotation(
            os.path.join(root, "Annotations", f"{image_id}.xml"), class_to_idx, difficult, problems
        )
        if parsed is None:
            continue
        boxes.append(parsed[0])
        box_classes.append(parsed[1])
        label_sets.append(set(parsed[1].tolist()))
    if problems:
        raise_listing(f"{name} split {split!r} under {root}: annotation problems", problems)
    index = DatasetIndex(
        name=name,
        split=split,
        root=root,
        paths=[os.path.join(root, "JPEGImages", f"{i}.jpg") for i in ids],
        labels=labels_from_sets(label_sets, len(classes)),
        class_names=list(classes),
        boxes=boxes,
        box_classes=box_classes,
    )
    return finalize_index(index, on_bad_image=on_bad_image)


__all__ = ["VOC_CLASSES", "VOC_DIFFICULT", "read_voc", "resolve_voc_root", "read_split_ids", "DatasetError"]
