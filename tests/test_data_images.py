"""Header validation of JPEG/PNG files (mskd_fast.data.images)."""

import os

import pytest
from data_helpers import corrupt, write_image, write_noise_jpeg
from PIL import Image

from mskd_fast.data.images import BadImage, image_size, scan_images


def test_jpeg_and_png_sizes(tmp_path):
    assert image_size(write_noise_jpeg(str(tmp_path / "a.jpg"), size=(37, 21))) == (37, 21)
    assert image_size(write_image(str(tmp_path / "b.png"), size=(5, 300))) == (5, 300)
    progressive = str(tmp_path / "p.jpg")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(progressive, progressive=True)
    assert image_size(progressive) == (64, 48)
    grey = str(tmp_path / "g.jpg")
    Image.new("L", (19, 23), 7).save(grey)
    assert image_size(grey) == (19, 23)


@pytest.mark.parametrize(
    "make, reason, words",
    [
        (lambda p: corrupt(write_noise_jpeg(p), "garbage"), "bad_image", "signature"),
        (lambda p: corrupt(write_noise_jpeg(p, size=(200, 200)), "truncate"), "bad_image", "truncated"),
        (lambda p: corrupt(write_image(p, fmt="PNG"), "truncate"), "bad_image", "PNG"),
        (lambda p: open(p, "wb").close() or p, "bad_image", "empty"),
        (lambda p: write_image(p, fmt="GIF"), "bad_image", "not a JPEG or PNG"),
        (lambda p: p, "missing_image", "not found"),
        (lambda p: os.makedirs(p) or p, "bad_image", "directory"),
    ],
)
def test_bad_images_are_reported_with_reason(tmp_path, make, reason, words):
    path = make(str(tmp_path / "x.jpg"))
    with pytest.raises(BadImage) as info:
        image_size(path)
    assert info.value.reason == reason
    assert words in str(info.value) and path in str(info.value)


def test_jpeg_without_frame_header(tmp_path):
    path = str(tmp_path / "nosof.jpg")
    with open(path, "wb") as f:  # SOI, an APP0 segment, then SOS and EOI: no SOF
        f.write(b"\xff\xd8\xff\xe0\x00\x04ab\xff\xda\x00\x02\xff\xd9")
    with pytest.raises(BadImage, match="no frame header"):
        image_size(path)


def test_scan_images_keeps_order_and_collects_bad(tmp_path):
    good = [write_noise_jpeg(str(tmp_path / f"{i}.jpg"), size=(10 + i, 12)) for i in range(70)]
    paths = good[:3] + [str(tmp_path / "missing.jpg")] + good[3:]
    sizes, bad = scan_images(paths)
    assert sizes[3] is None and [b.path for b in bad] == [paths[3]]
    assert [s for s in sizes if s is not None] == [(10 + i, 12) for i in range(70)]
