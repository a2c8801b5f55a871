"""Dataset readers against real-world text and annotation faults (issue 18 items 6-8): byte-order marks,
boxes outside the real image, and errors that name the file, the record and the field."""

import os

import numpy as np
import pytest
from data_helpers import make_coco, make_voc, write_image

from mskd_fast.data import DatasetError, load_index

BOM = "\ufeff"


def _manifest(root, text_by_file: dict) -> str:
    for name in ("img/a.png", "img/b.png", "img/c.png"):
        write_image(os.path.join(root, name))
    for name, text in text_by_file.items():
        with open(os.path.join(root, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    return str(root)


# ---------------------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_manifest_csv_saved_with_a_byte_order_mark(tmp_path, on_bad_image):
    """Excel's "CSV UTF-8" starts with a BOM: the header must still be recognised (before: read as a data row
    whose path is '\\ufeffpath', an error, and with skip a phantom class 'labels')."""
    rows = "path,labels\nimg/a.png,cat|dog\nimg/b.png,dog\n"
    root = _manifest(tmp_path, {"train.csv": BOM + rows})
    index = load_index("manifest", root, "train", on_bad_image=on_bad_image)
    assert index.class_names == ["cat", "dog"] and len(index) == 2
    np.testing.assert_array_equal(index.labels, [[1, 1], [0, 1]])
    assert sum(index.skipped.values()) == 0


def test_every_text_file_of_a_dataset_may_start_with_a_byte_order_mark(tmp_path):
    # manifest: JSON lines and the class list
    root = _manifest(tmp_path / "m", {
        "train.jsonl": BOM + '{"path": "img/a.png", "labels": ["cat"]}\n{"path": "img/b.png", "labels": "dog"}\n',
        "classes.txt": BOM + "dog\ncat\n",
    })
    index = load_index("manifest", root, "train")
    assert index.class_names == ["dog", "cat"]
    np.testing.assert_array_equal(index.labels, [[0, 1], [1, 0]])
    # VOC: a split file with a BOM (before: its first id read as '\ufeff000001', a "missing" annotation)
    voc = make_voc(str(tmp_path / "voc"), {"000001": [("dog", (1, 2, 20, 30), 0)],
                                           "000002": [("cat", (1, 1, 9, 9), 0)]}, {"test": ["000001", "000002"]})
    split = os.path.join(voc, "VOCdevkit", "VOC2007", "ImageSets", "Main", "test.txt")
    with open(split, encoding="utf-8") as fh:
        text = fh.read()
    with open(split, "w", encoding="utf-8") as fh:
        fh.write(BOM + text)
    index = load_index("voc", voc, "test")
    assert [os.path.basename(p) for p in index.paths] == ["000001.jpg", "000002.jpg"]
    # COCO: an annotation file with a BOM (json.load refuses one)
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}]
    coco = make_coco(str(tmp_path / "coco"), "val2014", images,
                     [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}], [{"id": 3, "name": "car"}])
    path = os.path.join(coco, "annotations", "instances_val2014.json")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(BOM + text)
    assert load_index("coco", coco, "test").class_names == ["car"]


def test_a_text_file_that_is_not_utf8_is_named(tmp_path):
    root = _manifest(tmp_path, {})
    with open(os.path.join(root, "train.csv"), "w", encoding="utf-16") as fh:  # Excel's "Unicode text"
        fh.write("path,labels\nimg/a.png,cat\n")
    with pytest.raises(DatasetError, match=r"train\.csv: not UTF-8 text \(it starts with a UTF-16 byte-order mark\)"):
        load_index("manifest", root, "train")
