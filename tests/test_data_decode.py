"""Decoding to 8-bit RGB (issue 18 item 2): 16-bit PNGs, EXIF orientation, other formats, corrupt PNGs.

Both loaders must give a 16-bit PNG the pixels of its 8-bit version (``round(v * 255 / 65535)``, DALI's
rule), apply the EXIF orientation alike, and the start check must report the displayed size.
"""

import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from data_helpers import break_huffman_table, png_bytes, write_noise_jpeg
from PIL import Image

from mskd_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    ImageDecodeError,
    build_loader,
    dali_import_error,
    load_index,
)
from mskd_fast.data.decode import decode_rgb8, uint16_to_uint8
from mskd_fast.data.images import BadImage, image_size

DALI_REASON = dali_import_error()
needs_dali = pytest.mark.skipif(DALI_REASON is not None, reason=f"DALI cannot be imported: {DALI_REASON}")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]


def _write(path, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def _manifest(root, names):
    with open(os.path.join(root, "test.csv"), "w") as fh:
        fh.write("".join(f"{n},a\n" for n in names))
    return load_index("manifest", str(root), "test")


def _eval_images(index, backend, img_size=32):
    with build_loader(index, train=False, batch_size=len(index), img_size=img_size, loader=backend,
                      num_workers=0) as loader:
        images, _, ids = next(iter(loader))
    assert ids.tolist() == list(range(len(index)))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images.float() * std + mean  # grey levels 0..255


def test_uint16_to_uint8_is_dalis_rounding():
    v = np.arange(65536)
    expected = np.floor(v * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(uint16_to_uint8(v), expected)
    assert torch.equal(uint16_to_uint8(torch.from_numpy(v).to(torch.uint16)), torch.from_numpy(expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_pngs_give_the_pixels_of_their_8bit_versions(tmp_path, backend):
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    grey8 = rgb8[..., 1].copy()
    # 16-bit samples whose 8-bit value is the reference: v8 * 257 plus less than half a step
    wide = lambda a: np.minimum(a.astype(np.int64) * 257 + rng.integers(0, 129, a.shape), 65535)  # noqa: E731
    alpha16 = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    files = {
        "rgb8.png": png_bytes(rgb8, 8, 2),
        "rgb16.png": png_bytes(wide(rgb8), 16, 2),
        "rgba16.png": png_bytes(np.dstack([wide(rgb8), alpha16]), 16, 6),
        "grey8.png": png_bytes(grey8, 8, 0),
        "grey16.png": png_bytes(wide(grey8), 16, 0),
        "greyalpha16.png": png_bytes(np.dstack([wide(grey8), alpha16]), 16, 4),
    }
    for name, data in files.items():
        _write(tmp_path / name, data)
    index = _manifest(tmp_path, list(files))
    images = _eval_images(index, backend)
    assert float(images.max()) < 256  # before the fix: 16-bit values kept their 0..65535 scale
    for k, ref in ((1, 0), (2, 0), (4, 3), (5, 3)):
        torch.testing.assert_close(images[k], images[ref], rtol=0, atol=1e-3, msg=f"{list(files)[k]}")
    for name in files:  # the decoder itself, exactly
        expected = rgb8 if name.startswith("rgb") else np.repeat(grey8[..., None], 3, axis=2)
        assert torch.equal(decode_rgb8(str(tmp_path / name)), torch.from_numpy(expected).permute(2, 0, 1)), name


def _two_colour(path, exif_orientation=None, fmt=None):
    """A 40x30 image, left half red and right half blue, optionally with an EXIF orientation tag."""
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (220, 20, 20)
    pixels[:, 20:] = (20, 20, 220)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(pixels).save(path, format=fmt, quality=95, **kwargs)
    return str(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exif_orientation_is_applied_in_both_loaders_and_the_start_check(tmp_path, backend):
    names = ["plain.jpg", "rot6.jpg", "rot6.png", "rot8.jpg"]
    _two_colour(tmp_path / "plain.jpg")
    _two_colour(tmp_path / "rot6.jpg", 6)  # displayed turned 90 degrees clockwise: the left half on top
    _two_colour(tmp_path / "rot6.png", 6)
    _two_colour(tmp_path / "rot8.jpg", 8)  # turned counter-clockwise: the left half at the bottom
    index = _manifest(tmp_path, names)
    assert index.image_sizes.tolist() == [[40, 30], [30, 40], [30, 40], [30, 40]]
    assert image_size(str(tmp_path / "rot6.jpg")) == (30, 40)
    images = _eval_images(index, backend)
    red_minus_blue = images[:, 0] - images[:, 2]  # (N, H, W)
    left, right = red_minus_blue[:, :, :12].mean((1, 2)), red_minus_blue[:, :, -12:].mean((1, 2))
    top, bottom = red_minus_blue[:, :12].mean((1, 2)), red_minus_blue[:, -12:].mean((1, 2))
    assert left[0] > 150 and right[0] < -150  # plain: red left, blue right
    for k in (1, 2):
        assert top[k] > 150 and bottom[k] < -150, names[k]
    assert top[3] < -150 and bottom[3] > 150
    decoded = decode_rgb8(str(tmp_path / "rot6.jpg"))
    assert tuple(decoded.shape) == (3, 40, 30)
    assert torch.equal(decoded, torch.rot90(decode_rgb8(str(tmp_path / "plain.jpg")), -1, (1, 2)))


@pytest.mark.parametrize("mode, name", [("F", "float32"), ("I;16", "uint16")])
def test_tiff_images_are_refused_at_the_start_check_naming_the_format(tmp_path, mode, name):
    array = np.linspace(0, 1 if mode == "F" else 65535, 40 * 30).reshape(30, 40)
    Image.fromarray(array.astype(np.float32 if mode == "F" else np.uint16)).save(tmp_path / "x.tif")
    write_noise_jpeg(str(tmp_path / "ok.jpg"))
    with pytest.raises(DatasetError, match=r"x\.tif: not a JPEG or PNG file but a TIFF file \(only JPEG and PNG"):
        _manifest(tmp_path, ["ok.jpg", "x.tif"])
    with pytest.raises(BadImage, match="TIFF"):
        image_size(str(tmp_path / "x.tif"))


def _corrupt_pngs(folder) -> dict:
    rng = np.random.default_rng(1)
    rgb16 = png_bytes(rng.integers(0, 65536, (30, 40, 3), dtype=np.uint16), 16, 2)
    bad_crc = bytearray(rgb16)
    at = bad_crc.index(b"IDAT")
    (length,) = struct.unpack(">I", bad_crc[at - 4 : at])
    bad_crc[at + 4 + length] ^= 0xFF  # the IDAT chunk's CRC
    bad_filter = bytearray(png_bytes(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), 8, 2))
    at = bad_filter.index(b"IDAT")
    bad_filter[at + 10 : at + 40] = bytes(30)  # inside the compressed stream
    bad_stream16 = bytearray(rgb16)
    at = bad_stream16.index(b"IDAT")
    (length,) = struct.unpack(">I", bad_stream16[at - 4 : at])
    for k in range(at + 10, at + 60):
        bad_stream16[k] ^= 0x5A
    body = bytes(bad_stream16[at : at + 4 + length])
    bad_stream16[at + 4 + length : at + 8 + length] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return {name: _write(os.path.join(folder, name), bytes(data)) for name, data in
            (("badcrc16.png", bad_crc), ("badstream8.png", bad_filter), ("badstream16.png", bad_stream16))}


def test_corrupt_pngs_raise_naming_the_file_instead_of_crashing_the_process(tmp_path):
    """libpng inside torchvision ends the process with a segmentation fault on these files; the decoder must
    raise instead (checked in a child process, so that a crash fails this test rather than ending pytest)."""
    paths = _corrupt_pngs(tmp_path)
    for path in paths.values():
        assert image_size(path) == (40, 30)  # the header check cannot see it: only decoding does
    script = textwrap.dedent(f"""
        from mskd_fast.data.decode import decode_rgb8
        from mskd_fast.data.images import BadImage
        for path in {list(paths.values())!r}:
            try:
                decode_rgb8(path)
                print("decoded", path)
            except BadImage as exc:
                print("refused", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"decoder crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused ") for line in lines), lines
    assert "badcrc16.png: PNG chunk 'IDAT' has a wrong CRC" in proc.stdout


# ---------------------------------------------------------------------------------------------- item 4
def _noise_manifest(root, n=12, bad=(5,)):
    names = []
    for k in range(n):
        path = write_noise_jpeg(os.path.join(root, f"img{k:02d}.jpg"), seed=k)
        if k in bad:
            break_huffman_table(path)
        names.append(os.path.basename(path))
    with open(os.path.join(root, "test.csv"), "w") as fh:
        fh.write("".join(f"{name},{'ab'[k % 2]}\n" for k, name in enumerate(names)))
    return load_index("manifest", str(root), "test")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_an_image_that_fails_to_decode_raises_or_is_skipped_where_met(tmp_path, backend, train):
    """Header fine, Huffman table corrupt: the start check passes, decoding fails in the loader."""
    index = _noise_manifest(tmp_path)
    bad_path = index.paths[5]
    common = dict(train=train, batch_size=4, img_size=32, loader=backend, num_workers=0, seed=3)
    with build_loader(index, on_bad_image="error", **common) as loader:
        with pytest.raises(ImageDecodeError, match=rf"{bad_path}: cannot be decoded") as info:
            for _ in loader:
                pass
        assert info.value.path == bad_path
    with build_loader(index, on_bad_image="skip", **common) as loader:
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = [ids.tolist() for _, _, ids in loader]
            assert len(batches) == len(loader) == 3
            seen = [i for ids in batches for i in ids if i >= 0]
            assert sorted(seen) == [i for i in range(12) if i != 5], batches  # every other sample exactly once
            if train:
                assert sorted(len(ids) for ids in batches) == [3, 4, 4]  # its batch is one row shorter
            else:
                assert loader.skipped_ids == {5} and [ids[1] for ids in batches][1] == -1  # a padding row
        assert loader.decode_failures == {bad_path: loader.decode_failures[bad_path]}
        assert "Bogus Huffman table" in loader.decode_failures[bad_path]
