"""What the built-in generated datasets (``synthetic``, ``fashion-multi``) share: the VOC-layout writer and
the cache folder that is generated once, atomically, and checked against its recorded config on reuse.

A generator yields ``(image_id, image (H, W, 3) uint8, boxes (n, 4) int64, classes (n,) int64)`` per image,
boxes ``(x1, y1, x2, y2)`` in pixels with x2/y2 exclusive; :func:`write_voc_split` writes them as
``JPEGImages/ID.jpg`` + ``Annotations/ID.xml`` + ``ImageSets/Main/{SPLIT,CLASS_SPLIT}.txt``, the layout
:func:`mskd_fast.data.voc.read_voc` reads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .index import DatasetError

META_FILE = "mskd_generated.json"
JPEG_QUALITY = 90


def cache_root(cache_dir: str | None) -> str:
    """The cache folder: ``cache_dir``, else ``$MSKD_FAST_CACHE``, else ``~/.cache/mskd_fast`` (absolute)."""
    root = cache_dir or os.environ.get("MSKD_FAST_CACHE") or os.path.join("~", ".cache", "mskd_fast")
    return os.path.abspath(os.path.expanduser(root))


def annotation_xml(folder: str, image_id: str, width: int, height: int, boxes: np.ndarray, classes: np.ndarray,
                   class_names: Sequence[str]) -> str:
    """A VOC annotation; ``boxes`` are 0-based with x2/y2 exclusive (VOC's are 1-based inclusive)."""
    objects = "".join(
        f"  <object>\n    <name>{class_names[c]}</name>\n    <pose>Unspecified</pose>\n"
        f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{x1 + 1}</xmin>\n      <ymin>{y1 + 1}</ymin>\n      <xmax>{x2}</xmax>\n      <ymax>{y2}</ymax>\n"
        f"    </bndbox>\n  </object>\n"
        for (x1, y1, x2, y2), c in zip(np.asarray(boxes).tolist(), np.asarray(classes).tolist())
    )
    return (
        f"<annotation>\n  <folder>{folder}</folder>\n  <filename>{image_id}.jpg</filename>\n"
        f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
        f"{objects}</annotation>\n"
    )


def write_voc_split(out_dir: str, split: str, images: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                    class_names: Sequence[str], folder: str) -> int:
    """Write one split's images, annotations and image-set files into ``out_dir``; returns the image count."""
    jpeg_dir = os.path.join(out_dir, "JPEGImages")
    ann_dir = os.path.join(out_dir, "Annotations")
    sets_dir = os.path.join(out_dir, "ImageSets", "Main")
    for d in (jpeg_dir, ann_dir, sets_dir):
        os.makedirs(d, exist_ok=True)
    ids, present = [], []
    for image_id, image, boxes, classes in images:
        height, width = image.shape[:2]
        Image.fromarray(image, "RGB").save(os.path.join(jpeg_dir, f"{image_id}.jpg"), quality=JPEG_QUALITY)
        with open(os.path.join(ann_dir, f"{image_id}.xml"), "w", encoding="utf-8") as f:
            f.write(annotation_xml(folder, image_id, width, height, boxes, classes, class_names))
        ids.append(image_id)
        present.append(set(np.asarray(classes).tolist()))
    with open(os.path.join(sets_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{i}\n" for i in ids))
    for c, name in enumerate(class_names):
        with open(os.path.join(sets_dir, f"{name}_{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{i} {' 1' if c in p else '-1'}\n" for i, p in zip(ids, present)))
    return len(ids)


def _check_meta(root: str, meta: dict, meta_file: str) -> None:
    path = os.path.join(root, meta_file)
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(
            f"generated dataset folder {root} exists but {meta_file} cannot be read ({exc}); delete the folder "
            "to regenerate it"
        ) from None
    if found != meta:
        raise DatasetError(
            f"generated dataset folder {root} was generated with a different config ({found}); delete it to "
            "regenerate it"
        )


def ensure_generated(root: str, meta: dict, generate: Callable[[str], None], meta_file: str = META_FILE,
                     what: str = "generated dataset") -> str:
    """Return ``root``, first running ``generate(tmp_folder)`` and renaming it into place if it is missing.

    ``meta`` (JSON-serialisable: everything the images depend on) is written into the folder as
    ``meta_file`` and compared on reuse (a mismatch is a :class:`DatasetError` naming the folder). The
    folder appears complete or not at all; concurrent generators (e.g. DDP ranks) are safe, the first
    rename wins. A cache folder that cannot be written (read-only, a file in the way, a full disk) is a
    :class:`DatasetError` naming it and ``--synthetic-cache`` (``what`` names the dataset in the message).
    """
    if os.path.isdir(root):
        _check_meta(root, meta, meta_file)
        return root
    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(root)}-", dir=parent)
    except OSError as exc:
        raise DatasetError(_unwritable_cache(what, parent, exc)) from None
    os.chmod(tmp, 0o755)
    try:
        generate(tmp)
        with open(os.path.join(tmp, meta_file), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isdir(root):
                raise
    except OSError as exc:  # a full or failing cache disk
        raise DatasetError(_unwritable_cache(what, parent, exc)) from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _check_meta(root, meta, meta_file)
    return root


def _unwritable_cache(what: str, parent: str, exc: OSError) -> str:
    reason = "exists and is not a folder" if isinstance(exc, (FileExistsError, NotADirectoryError)) else (
        exc.strerror or str(exc))
    return (f"{what} cache {parent}: cannot write the dataset there ({reason}: {exc.filename or parent}); pass "
            "--synthetic-cache DIR (or set MSKD_FAST_CACHE) to a writable folder")
