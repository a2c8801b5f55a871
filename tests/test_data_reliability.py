"""Dataset readers against real-world text and annotation faults (issue 18 items 6-8): byte-order marks,
boxes outside the real image, and errors that name the file, the record and the field."""

import json
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


# ---------------------------------------------------------------------------------------------- item 7
def _voc_with_xml(root, xml_by_id: dict, size=(40, 30)) -> str:
    make_voc(root, {i: [("dog", (1, 1, 5, 5), 0)] for i in xml_by_id}, {"test": list(xml_by_id)}, size=size)
    for image_id, xml in xml_by_id.items():
        with open(os.path.join(root, "VOCdevkit", "VOC2007", "Annotations", f"{image_id}.xml"), "w") as fh:
            fh.write(xml)
    return root


def _obj(name, box):
    return (f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>")


def test_voc_boxes_are_checked_against_the_real_image_size(tmp_path):
    """The images are 40x30. Without <size>, or with a wrong one, a box at 2,000 px used to pass (and gave the
    per-scale report bins at 2,000 px)."""
    root = _voc_with_xml(str(tmp_path), {
        "000001": f"<annotation>{_obj('dog', (1, 1, 20, 20))}</annotation>",  # no <size>: fine
        "000002": f"<annotation>{_obj('cat', (100, 100, 2000, 1500))}</annotation>",  # no <size>
        "000003": ("<annotation><size><width>4000</width><height>3000</height></size>"
                   f"{_obj('dog', (1, 1, 42, 30))}</annotation>"),  # wrong <size>; 2 px too wide
    })
    with pytest.raises(DatasetError, match="2 found") as info:
        load_index("voc", root, "test")
    text = str(info.value)
    assert "boxes outside their image" in text
    assert "000002.jpg: box 0 (99, 99, 2000, 1500) of class 'cat' lies outside the 40x30 image" in text
    assert "000003.jpg: box 0 (0, 0, 42, 30) of class 'dog' lies outside the 40x30 image" in text


def test_coco_boxes_outside_the_image_are_errors_and_rounding_is_clipped(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
              {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30}]
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [30.5, 20, 10.3, 10.4]},  # 0.8 / 0.4 px over
            {"id": 11, "image_id": 2, "category_id": 3, "bbox": [10, 10, 50, 5]}]  # 20 px over
    root = make_coco(str(tmp_path / "bad"), "val2014", images, anns, [{"id": 3, "name": "car"}])
    with pytest.raises(DatasetError, match=r"b\.jpg: box 0 \(10, 10, 60, 15\) of class 'car' lies outside the 40x30"):
        load_index("coco", root, "test")
    root = make_coco(str(tmp_path / "ok"), "val2014", images[:1], anns[:1], [{"id": 3, "name": "car"}])
    index = load_index("coco", root, "test")
    np.testing.assert_allclose(index.boxes[0], [[30.5, 20, 40, 30]])  # clipped to the image


# ---------------------------------------------------------------------------------------------- item 8
def _coco_json(tmp_path, images, anns, cats):
    root = make_coco(str(tmp_path), "val2014", [im for im in images if isinstance(im.get("file_name"), str)],
                     [], [])
    path = os.path.join(root, "annotations", "instances_val2014.json")
    with open(path, "w") as fh:
        json.dump({"images": images, "annotations": anns, "categories": cats}, fh)
    return root, path


def test_coco_errors_name_the_file_the_record_and_the_field(tmp_path):
    """Before: a bare KeyError ('bbox', 'file_name', 'name') or "'NoneType' object is not iterable"."""
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}, {"id": 2, "width": 40, "height": 30}]
    anns = [{"id": 10, "image_id": 1, "category_id": 3},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": None},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 2, "3", 4]},
            {"image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}]
    cats = [{"id": 3}, {"id": 4, "name": "dog"}]
    root, path = _coco_json(tmp_path, images, anns, cats)
    with pytest.raises(DatasetError) as info:
        load_index("coco", root, "test")
    text = str(info.value)
    assert f"{path}: malformed records: 6 found" in text
    for line in (f"{path}: images[1] (id 2): 'file_name' is missing",
                 f"{path}: categories[0] (id 3): 'name' is missing",
                 f"{path}: annotation 10 (annotations[0]): 'bbox' is missing",
                 f"{path}: annotation 11 (annotations[1]): 'bbox' is null, expected [x, y, width, height] of 4",
                 f"{path}: annotation 12 (annotations[2]): 'bbox' is [1, 2, '3', 4], expected"):
        assert line in text, line
    assert "... and 1 more" in text  # annotations[3]: a bbox of 3 numbers, beyond the first five listed


def test_voc_errors_name_the_file_and_the_field(tmp_path):
    """Before: "could not convert string to float: 'abc'" without a file."""
    root = _voc_with_xml(str(tmp_path), {
        "000001": f"<annotation><size><width>abc</width><height>30</height></size>{_obj('dog', (1, 1, 5, 5))}"
                  "</annotation>",
        "000002": f"<annotation>{_obj('dog', (1, 'x', 5, 5))}</annotation>",
        "000003": "<annotation><object><name>dog</name></object></annotation>",
    })
    with pytest.raises(DatasetError) as info:
        load_index("voc", root, "test")
    text = str(info.value)
    ann = os.path.join(root, "VOCdevkit", "VOC2007", "Annotations")
    assert f"{ann}/000001.xml: <size><width> is 'abc', expected a number" in text
    assert f"{ann}/000002.xml: object 'dog' <bndbox><ymin> is 'x', expected a number" in text
    assert f"{ann}/000003.xml: object 'dog' has no <bndbox>" in text
