"""Dataset readers on tiny fixture datasets: exact labels/boxes, class order, bad inputs."""

import json
import os

import numpy as np
import pytest
from data_helpers import corrupt, make_coco, make_voc, write_image, write_noise_jpeg

from mskd_fast.data import VOC_CLASSES, DatasetError, eval_split_name, load_index, train_split_name

# ----------------------------------------------------------------------------------------------
# VOC
# ----------------------------------------------------------------------------------------------

VOC_ANN = {
    "000001": [("dog", (1, 2, 20, 30), 0), ("person", (5, 5, 40, 10), 1)],
    "000002": [("aeroplane", (10, 10, 11, 11), 0)],
    "000003": [("tvmonitor", (3, 4, 5, 6), 0), ("dog", (7, 8, 9, 10), 0)],
    "000004": [("cat", (1, 1, 2, 2), 1)],
}


@pytest.fixture
def voc(tmp_path):
    return make_voc(str(tmp_path), VOC_ANN, {"trainval": ["000001", "000002", "000004"], "test": ["000003"]})


def _row(*names):
    row = np.zeros(20, dtype=np.uint8)
    row[[VOC_CLASSES.index(n) for n in names]] = 1
    return row


def test_voc_labels_boxes_and_order(voc):
    idx = load_index("voc", voc, "trainval")
    assert idx.name == "voc" and idx.split == "trainval" and idx.class_names == list(VOC_CLASSES)
    assert [os.path.basename(p) for p in idx.paths] == ["000001.jpg", "000002.jpg", "000004.jpg"]
    np.testing.assert_array_equal(idx.labels, np.stack([_row("dog", "person"), _row("aeroplane"), _row("cat")]))
    np.testing.assert_array_equal(idx.boxes[0], np.array([[0, 1, 20, 30], [4, 4, 40, 10]], np.float32))
    np.testing.assert_array_equal(idx.box_classes[0], [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")])
    np.testing.assert_array_equal(idx.boxes[1], np.array([[9, 9, 11, 11]], np.float32))
    np.testing.assert_array_equal(idx.image_sizes, [[40, 30]] * 3)
    assert idx.skipped == {"no_labels": 0}
    idx.check()
    test = load_index("voc", voc, "test")
    np.testing.assert_array_equal(test.labels, [_row("tvmonitor", "dog")])


def test_voc_root_forms_and_split_names(voc):
    a = load_index("voc", voc, "test")
    b = load_index("voc", os.path.join(voc, "VOCdevkit", "VOC2007"), "test")
    assert a.paths == b.paths
    assert train_split_name("voc") == "trainval" and eval_split_name("voc") == "test"


def test_voc_difficult_ignore_drops_objects_and_empty_images(voc):
    idx = load_index("voc", voc, "trainval", voc_difficult="ignore")
    # 000004 has only a difficult object: its label set becomes empty and it is dropped, counted
    assert [os.path.basename(p) for p in idx.paths] == ["000001.jpg", "000002.jpg"]
    assert idx.skipped["no_labels"] == 1
    np.testing.assert_array_equal(idx.labels[0], _row("dog"))
    np.testing.assert_array_equal(idx.boxes[0], np.array([[0, 1, 20, 30]], np.float32))


def test_voc_unknown_class_and_missing_annotation(voc, tmp_path):
    ann = os.path.join(voc, "VOCdevkit", "VOC2007", "Annotations")
    with open(os.path.join(ann, "000002.xml"), "w") as f:
        f.write("<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
                "<ymax>2</ymax></bndbox></object></annotation>")  # fmt: skip
    with pytest.raises(DatasetError, match="unknown class 'unicorn'"):
        load_index("voc", voc, "trainval")
    os.remove(os.path.join(ann, "000002.xml"))
    with pytest.raises(DatasetError, match=r"000002.xml: annotation file missing"):
        load_index("voc", voc, "trainval")


def test_voc_bad_box_and_missing_split(voc):
    ann = os.path.join(voc, "VOCdevkit", "VOC2007", "Annotations", "000003.xml")
    with open(ann, "w") as f:
        f.write("<annotation><object><name>dog</name><bndbox><xmin>5</xmin><ymin>1</ymin><xmax>4</xmax>"
                "<ymax>2</ymax></bndbox></object></annotation>")  # fmt: skip
    with pytest.raises(DatasetError, match="empty or negative box"):
        load_index("voc", voc, "test")
    with pytest.raises(DatasetError, match=r"split 'val' not found.*trainval"):
        load_index("voc", voc, "val")
    with pytest.raises(DatasetError, match="not a VOC folder"):
        load_index("voc", os.path.dirname(voc), "test")


@pytest.mark.parametrize("how", ["missing", "garbage", "truncate"])
def test_voc_bad_images_error_or_skip(voc, how):
    path = os.path.join(voc, "VOCdevkit", "VOC2007", "JPEGImages", "000002.jpg")
    if how == "missing":
        os.remove(path)
    else:
        # a larger image, so that cutting it in half removes more than the 4 KiB tail window
        write_noise_jpeg(path, size=(120, 120))
        corrupt(path, how)
    with pytest.raises(DatasetError, match=r"1 found:\n  .*000002.jpg.*\n.*--on-bad-image skip"):
        load_index("voc", voc, "trainval")
    idx = load_index("voc", voc, "trainval", on_bad_image="skip")
    reason = "missing_image" if how == "missing" else "bad_image"
    assert idx.skipped[reason] == 1 and len(idx) == 2
    assert [os.path.basename(p) for p in idx.paths] == ["000001.jpg", "000004.jpg"]
    assert len(idx.boxes) == len(idx.box_classes) == 2 and idx.image_sizes.shape == (2, 2)


def test_load_index_argument_errors(voc):
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_index("imagenet", voc, "train")
    with pytest.raises(ValueError, match="on_bad_image"):
        load_index("voc", voc, "test", on_bad_image="ignore")
    with pytest.raises(ValueError, match="voc_difficult"):
        load_index("voc", voc, "test", voc_difficult="negative")


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------

COCO_CATS = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _coco(root):
    images = [
        {"id": 7, "file_name": "b.jpg", "width": 40, "height": 30},
        {"id": 2, "file_name": "a.jpg", "width": 50, "height": 20},
        {"id": 9, "file_name": "empty.jpg", "width": 10, "height": 10},
    ]
    anns = [
        {"id": 1, "image_id": 7, "category_id": 18, "bbox": [1.5, 2, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [4, 5, 6, 7], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [4, 5, 0, 7], "iscrowd": 0},
    ]
    make_coco(root, "train2014", images, anns, COCO_CATS)
    make_coco(root, "val2014", images[:2], anns, COCO_CATS)
    return root


def test_coco_labels_boxes_category_order(tmp_path):
    root = _coco(str(tmp_path))
    idx = load_index("coco", root, "train")
    assert idx.class_names == ["person", "car", "dog"]  # category-id order
    assert [os.path.basename(p) for p in idx.paths] == ["a.jpg", "b.jpg"]  # image-id order, empty dropped
    np.testing.assert_array_equal(idx.labels, [[0, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(idx.boxes[0], np.array([[4, 5, 10, 12]], np.float32))
    np.testing.assert_array_equal(idx.box_classes[0], [1])
    np.testing.assert_array_equal(idx.boxes[1], np.array([[1.5, 2, 11.5, 7]], np.float32))
    np.testing.assert_array_equal(idx.box_classes[1], [2])
    assert idx.skipped == {"crowd_box": 1, "degenerate_box": 1, "no_labels": 1}
    np.testing.assert_array_equal(idx.image_sizes, [[50, 20], [40, 30]])
    assert load_index("coco", root, "test").paths == load_index("coco", root, "val").paths
    assert os.path.dirname(load_index("coco", root, "test").paths[0]).endswith("val2014")


def test_coco_errors(tmp_path):
    root = _coco(str(tmp_path))
    path = os.path.join(root, "annotations", "instances_val2014.json")
    with open(path) as f:
        data = json.load(f)
    data["annotations"].append({"id": 99, "image_id": 2, "category_id": 77, "bbox": [0, 0, 1, 1]})
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError, match="category_id 77"):
        load_index("coco", root, "test")
    os.remove(path)
    with pytest.raises(DatasetError, match="instances_val2014.json"):
        load_index("coco", root, "test")
    os.remove(os.path.join(root, "train2014", "a.jpg"))
    with pytest.raises(DatasetError, match=r"a.jpg: file not found"):
        load_index("coco", root, "train")
    assert load_index("coco", root, "train", on_bad_image="skip").skipped["missing_image"] == 1


# ----------------------------------------------------------------------------------------------
# MIRFLICKR
# ----------------------------------------------------------------------------------------------


def _mirflickr(root, n=10):
    for i in range(1, n + 1):
        write_noise_jpeg(os.path.join(root, "mirflickr", f"im{i}.jpg"), size=(20, 16), seed=i)
    ann = os.path.join(root, "annotations")
    os.makedirs(ann)
    concepts = {"sky": [1, 2, 9], "dog": [2, 3, 10], "tree": [4, 5, 6, 7, 8, 10], "dog_r1": [2], "README": []}
    for name, members in concepts.items():
        with open(os.path.join(ann, f"{name}.txt"), "w") as f:
            f.write("".join(f"{m}\n" for m in members) + ("see the paper\n" if name == "README" else ""))
    return root


def test_mirflickr_split_and_labels(tmp_path):
    root = _mirflickr(str(tmp_path))
    train = load_index("mirflickr", root, "train")
    assert train.class_names == ["dog", "sky", "tree"]  # sorted; README and *_r1 ignored
    assert [os.path.basename(p) for p in train.paths] == [f"im{i}.jpg" for i in range(1, 9)]  # first 80%
    np.testing.assert_array_equal(
        train.labels, [[0, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]
    )
    test = load_index("mirflickr", root, "test")
    assert [os.path.basename(p) for p in test.paths] == ["im9.jpg", "im10.jpg"]
    np.testing.assert_array_equal(test.labels, [[0, 1, 0], [1, 0, 1]])
    assert train.boxes is None and test.skipped == {"no_labels": 0}


def test_mirflickr_unlabelled_and_bad_lines(tmp_path):
    root = _mirflickr(str(tmp_path))
    with open(os.path.join(root, "annotations", "sky.txt"), "w") as f:
        f.write("2\n")  # images 1 and 9 lose their only concept
    assert load_index("mirflickr", root, "train").skipped["no_labels"] == 1
    assert load_index("mirflickr", root, "test").skipped["no_labels"] == 1
    with open(os.path.join(root, "annotations", "sky.txt"), "w") as f:
        f.write("2\nim3\n")
    with pytest.raises(DatasetError, match=r"sky.txt:2: expected a positive image number"):
        load_index("mirflickr", root, "train")
    with pytest.raises(DatasetError, match="not a MIRFLICKR folder"):
        load_index("mirflickr", str(tmp_path / "mirflickr"), "train")


# ----------------------------------------------------------------------------------------------
# NUS-WIDE
# ----------------------------------------------------------------------------------------------


def _nuswide(root):
    files = {"train": ["actor\\0001_1.jpg", "actor\\0002_2.jpg", "beach\\0003_3.jpg"], "test": ["beach\\0004_4.jpg"]}
    for split, entries in files.items():
        for k, e in enumerate(entries):
            write_noise_jpeg(os.path.join(root, "Flickr", *e.split("\\")), size=(30, 20), seed=k)
        os.makedirs(os.path.join(root, "ImageList"), exist_ok=True)
        with open(os.path.join(root, "ImageList", f"{split.title()}Imagelist.txt"), "w") as f:
            f.write("".join(f"{e}\n" for e in entries))
    labels = {"water": {"Train": "1\n0\n0\n", "Test": "1\n"}, "animal": {"Train": "1\n1\n0\n", "Test": "0\n"}}
    os.makedirs(os.path.join(root, "TrainTestLabels"))
    for concept, per_split in labels.items():
        for tag, text in per_split.items():
            with open(os.path.join(root, "TrainTestLabels", f"Labels_{concept}_{tag}.txt"), "w") as f:
                f.write(text)
    return root


def test_nuswide_labels_paths_and_concept_order(tmp_path):
    root = _nuswide(str(tmp_path))
    train = load_index("nuswide", root, "train")
    assert train.class_names == ["animal", "water"]  # from the label files, sorted
    assert [p.split(os.sep)[-2:] for p in train.paths] == [["actor", "0001_1.jpg"], ["actor", "0002_2.jpg"]]
    np.testing.assert_array_equal(train.labels, [[1, 1], [1, 0]])
    assert train.skipped["no_labels"] == 1  # beach/0003_3 has no concept
    with open(os.path.join(root, "Concepts81.txt"), "w") as f:
        f.write("water\nanimal\n")
    test = load_index("nuswide", root, "test")
    assert test.class_names == ["water", "animal"]  # the official list fixes the order
    np.testing.assert_array_equal(test.labels, [[1, 0]])


def test_nuswide_malformed_labels(tmp_path):
    root = _nuswide(str(tmp_path))
    with open(os.path.join(root, "TrainTestLabels", "Labels_water_Train.txt"), "w") as f:
        f.write("1\n0\n")
    with pytest.raises(DatasetError, match="2 lines, expected 3"):
        load_index("nuswide", root, "train")
    with open(os.path.join(root, "TrainTestLabels", "Labels_water_Train.txt"), "w") as f:
        f.write("1\n0\n2\n")
    with pytest.raises(DatasetError, match=r"Labels_water_Train.txt:3: expected 0 or 1"):
        load_index("nuswide", root, "train")


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def _manifest(root):
    for name in ("a", "b", "c", "d"):
        write_image(os.path.join(root, "img", f"{name}.png"), size=(12, 9), fmt="PNG")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("path,labels\nimg/a.png,zebra|ant\nimg/b.png,ant\nimg/c.png,\n")
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        f.write(json.dumps({"path": "img/d.png", "labels": ["moth", "zebra"]}) + "\n\n")
        f.write(json.dumps({"path": os.path.join(root, "img", "a.png"), "labels": "ant|moth"}) + "\n")
    return root


def test_manifest_csv_jsonl_and_class_union(tmp_path):
    root = _manifest(str(tmp_path))
    train = load_index("manifest", root, "train")
    test = load_index("manifest", root, "test")
    assert train.class_names == test.class_names == ["ant", "moth", "zebra"]  # union over both manifests
    np.testing.assert_array_equal(train.labels, [[1, 0, 1], [1, 0, 0]])
    assert train.skipped["no_labels"] == 1  # img/c.png has an empty label set
    assert train.paths == [os.path.join(root, "img", "a.png"), os.path.join(root, "img", "b.png")]
    np.testing.assert_array_equal(test.labels, [[0, 1, 1], [1, 1, 0]])


def test_manifest_class_file_order_and_unknown_class(tmp_path):
    root = _manifest(str(tmp_path))
    classes = tmp_path / "classes.lst"
    classes.write_text("zebra\nmoth\nant\nbee\n")
    idx = load_index("manifest", root, "train", manifest_classes=str(classes))
    assert idx.class_names == ["zebra", "moth", "ant", "bee"]
    np.testing.assert_array_equal(idx.labels, [[1, 0, 1, 0], [0, 0, 1, 0]])
    classes.write_text("zebra\nant\n")
    with pytest.raises(DatasetError, match=r"test.jsonl:1: unknown class 'moth'"):
        load_index("manifest", root, "test", manifest_classes=str(classes))
    classes.write_text("zebra\nant\nzebra\n")
    with pytest.raises(DatasetError, match="more than once"):
        load_index("manifest", root, "test", manifest_classes=str(classes))


def test_manifest_malformed_rows(tmp_path):
    root = _manifest(str(tmp_path))
    with open(os.path.join(root, "train.csv"), "a") as f:
        f.write("img/a.png,ant\n")
    with pytest.raises(DatasetError, match="already listed"):
        load_index("manifest", root, "train")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("img/a.png,ant,extra\n")
    with pytest.raises(DatasetError, match=r"train.csv:1: expected 2 columns"):
        load_index("manifest", root, "train")
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        f.write('{"path": "img/a.png"}\n')
    with pytest.raises(DatasetError, match="'path' and 'labels'"):
        load_index("manifest", root, "test", manifest_classes=None)
    with pytest.raises(DatasetError, match=r"no manifest for split 'val'"):
        load_index("manifest", root, "val")
