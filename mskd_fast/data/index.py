"""The dataset index shared by every reader and loader, and the checks every reader runs.

A reader collects image paths, a multi-hot label matrix and (where the format has them) boxes,
then calls :func:`finalize_index`, which applies the uniform rules:

1. images whose label set is empty are dropped and counted under ``skipped["no_labels"]``;
2. every remaining image is header-checked (:mod:`mskd_fast.data.images`); missing or undecodable
   files raise :class:`DatasetError` listing the first paths and the count, or, with
   ``on_bad_image="skip"``, are dropped and counted under ``skipped["missing_image"]`` /
   ``skipped["bad_image"]``;
3. every box must lie inside its image as the file gives it (the header's size, EXIF orientation
   applied), not only inside the size an annotation claims: up to ``BOX_TOLERANCE_PX`` outside is
   float rounding and is clipped, more is a :class:`DatasetError` listing the boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .images import scan_images

ON_BAD_IMAGE = ("error", "skip")
BOX_TOLERANCE_PX = 1.0
_LIST_FIRST = 5


class DatasetError(ValueError):
    """A dataset on disk does not match its documented layout (missing/corrupt files, unknown classes)."""


class ImageDecodeError(DatasetError):
    """An image that passed the start check (its header) could not be decoded when a loader met it.

    Raised by the loaders with ``on_bad_image="error"``; ``path`` and ``detail`` say which file and why.
    """

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail} (the file passed the header check at start but cannot be decoded; fix "
                         "or remove it, or pass --on-bad-image skip to leave it out)")
        self.path = path
        self.detail = detail


@dataclass
class DatasetIndex:
    """Everything the loaders and the evaluator need to know about one split of a dataset.

    ``paths`` (N absolute image paths), ``labels`` (N, C) uint8 multi-hot, ``class_names`` (C),
    ``boxes`` per image (n_i, 4) float32 ``(x1, y1, x2, y2)`` in original pixels (x2/y2
    exclusive) and ``box_classes`` per image (n_i,) int64, or both ``None`` when the format has no
    boxes; ``image_sizes`` (N, 2) int64 ``(width, height)`` from the image headers; ``skipped``
    maps a reason to the number of images (or, for ``*_box`` reasons, objects) left out.
    """

    name: str
    split: str
    root: str
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    boxes: list[np.ndarray] | None = None
    box_classes: list[np.ndarray] | None = None
    image_sizes: np.ndarray | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check(self) -> None:
        """Raise ``ValueError`` if the fields are inconsistent (shapes, dtypes, lengths)."""
        n, c = len(self.paths), len(self.class_names)
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.uint8 or self.labels.shape != (n, c):
            raise ValueError(
                f"labels must be a uint8 array of shape ({n}, {c}), got "
                f"{getattr(self.labels, 'dtype', type(self.labels))} {getattr(self.labels, 'shape', '')}"
            )
        if len(set(self.class_names)) != c:
            raise ValueError(f"class_names must be unique, got {self.class_names}")
        if (self.boxes is None) != (self.box_classes is None):
            raise ValueError("boxes and box_classes must both be given or both be None")
        if self.boxes is not None:
            if len(self.boxes) != n or len(self.box_classes) != n:
                raise ValueError(f"boxes and box_classes must have one entry per image ({n})")
            for b, k in zip(self.boxes, self.box_classes):
                if b.dtype != np.float32 or b.ndim != 2 or b.shape[1] != 4:
                    raise ValueError(f"each boxes entry must be float32 (n_i, 4), got {b.dtype} {b.shape}")
                if k.dtype != np.int64 or k.shape != (b.shape[0],):
                    raise ValueError(f"each box_classes entry must be int64 ({b.shape[0]},), got {k.dtype} {k.shape}")
        if self.image_sizes is not None and (self.image_sizes.dtype != np.int64 or self.image_sizes.shape != (n, 2)):
            raise ValueError(
                f"image_sizes must be int64 ({n}, 2), got {self.image_sizes.dtype} {self.image_sizes.shape}"
            )

    def subset(self, keep: np.ndarray) -> DatasetIndex:
        """A new index with the images where the boolean mask ``keep`` (N,) is True (``skipped`` copied)."""
        keep = np.asarray(keep, dtype=bool)
        rows = np.flatnonzero(keep)
        return DatasetIndex(
            name=self.name,
            split=self.split,
            root=self.root,
            paths=[self.paths[i] for i in rows],
            labels=self.labels[rows],
            class_names=list(self.class_names),
            boxes=None if self.boxes is None else [self.boxes[i] for i in rows],
            box_classes=None if self.box_classes is None else [self.box_classes[i] for i in rows],
            image_sizes=None if self.image_sizes is None else self.image_sizes[rows],
            skipped=dict(self.skipped),
        )

    def summary(self) -> str:
        """One line: name/split, image and class counts, and what was skipped."""
        line = f"{self.name}/{self.split}: {len(self)} images, {self.num_classes} classes"
        if self.boxes is not None:
            line += f", {sum(len(b) for b in self.boxes)} boxes"
        skipped = {k: v for k, v in self.skipped.items() if v}
        if skipped:
            line += "; skipped " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
        return line


def read_text(path: str) -> str:
    """The content of the text file ``path``, decoded as UTF-8 with or without a byte-order mark.

    Spreadsheet programs save "CSV UTF-8" with a BOM (``EF BB BF``); read as plain UTF-8 it would stick to
    the first field (a header ``\ufeffpath`` read as a data row, a first image id that does not exist).
    Raises :class:`DatasetError` naming the file when it is not UTF-8 (e.g. UTF-16 "Unicode text").
    """
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        hint = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DatasetError(f"{path}: not UTF-8 text{hint}: {exc.reason} at byte {exc.start}; save it as UTF-8 "
                           "(e.g. \"CSV UTF-8\")") from None


def check_on_bad_image(on_bad_image: str) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")


def raise_listing(what: str, items: list[str], hint: str = "") -> None:
    """Raise :class:`DatasetError` naming how many ``items`` are wrong and showing the first few."""
    shown = "\n  ".join(items[:_LIST_FIRST])
    more = f"\n  ... and {len(items) - _LIST_FIRST} more" if len(items) > _LIST_FIRST else ""
    raise DatasetError(f"{what}: {len(items)} found:\n  {shown}{more}" + (f"\n{hint}" if hint else ""))


def labels_from_sets(label_sets: list[list[int]] | list[set[int]], num_classes: int) -> np.ndarray:
    """(N, C) uint8 multi-hot matrix from per-image collections of class indices."""
    labels = np.zeros((len(label_sets), num_classes), dtype=np.uint8)
    for i, classes in enumerate(label_sets):
        if classes:
            labels[i, list(classes)] = 1
    return labels


def finalize_index(index: DatasetIndex, *, on_bad_image: str) -> DatasetIndex:
    """Apply the uniform rules (drop empty label sets, header-check images) and fill ``image_sizes``.

    Raises :class:`DatasetError` for bad images unless ``on_bad_image="skip"``, and when nothing
    is left.
    """
    check_on_bad_image(on_bad_image)
    index.check()
    where = f"{index.name} split {index.split!r} under {index.root}"
    has_labels = index.labels.any(axis=1)
    index.skipped["no_labels"] = index.skipped.get("no_labels", 0) + int((~has_labels).sum())
    if not has_labels.all():
        index = index.subset(has_labels)
    sizes, bad = scan_images(index.paths)
    if bad:
        if on_bad_image == "error":
            raise_listing(
                f"{where}: images that are missing or cannot be decoded",
                [f"{b.path}: {b.detail}" for b in bad],
                "Fix or remove them, or pass --on-bad-image skip (on_bad_image='skip') to leave them out "
                "(the count is reported).",
            )
        for b in bad:
            index.skipped[b.reason] = index.skipped.get(b.reason, 0) + 1
        keep = np.array([s is not None for s in sizes], dtype=bool)
        index = index.subset(keep)
        sizes = [s for s in sizes if s is not None]
    index.image_sizes = np.asarray(sizes, dtype=np.int64).reshape(len(sizes), 2)
    if len(index) == 0:
        raise DatasetError(f"{where}: no usable images (skipped: {index.skipped})")
    outside = boxes_outside_images(index)
    if outside:
        raise_listing(f"{where}: boxes outside their image (image sizes read from the image files)", outside,
                      "Fix the annotations (coordinates, or the image they belong to); sizes recorded in an "
                      "annotation are not used for this check. Boxes refer to the image as displayed (EXIF "
                      "orientation applied).")
    index.check()
    return index


def boxes_outside_images(index: DatasetIndex, tolerance: float = BOX_TOLERANCE_PX) -> list[str]:
    """Check every box against its image's real ``(width, height)``; returns one line per box outside.

    A box ``(x1, y1, x2, y2)`` (x2/y2 exclusive) is inside when ``x1, y1 >= 0``, ``x2 <= width`` and
    ``y2 <= height``; boxes at most ``tolerance`` pixels outside are clipped in place (float rounding of
    ``x + w`` in COCO files), the others are reported with the image path, the box and the image size.
    """
    if index.boxes is None or index.image_sizes is None:
        return []
    problems = []
    for k, (boxes, classes) in enumerate(zip(index.boxes, index.box_classes)):
        if not len(boxes):
            continue
        width, height = (float(v) for v in index.image_sizes[k])
        below = boxes[:, :2] < -tolerance
        above = boxes[:, 2:] > np.array([width, height], dtype=np.float32) + tolerance
        for j in np.flatnonzero(below.any(axis=1) | above.any(axis=1)):
            x1, y1, x2, y2 = (float(v) for v in boxes[j])
            problems.append(f"{index.paths[k]}: box {j} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) of class "
                            f"{index.class_names[int(classes[j])]!r} lies outside the {width:g}x{height:g} image")
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, height)
    return problems
