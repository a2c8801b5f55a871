"""Evaluation preprocessing is the same in both loaders: DALI (CPU mode) and torch give the same eval tensors.

Stated tolerance: at most 0.01 of a grey level (of 255) per pixel, i.e. ``0.01 / (255 * 0.225)``
~ 1.8e-4 after ImageNet normalisation, for float32 output (measured: about 0.002 grey levels; float
rounding of two summation orders). Before both loaders resized in float with DALI's filter they
differed by up to 5-8 grey levels (torchvision's antialias truncates the filter at the border and
rounds to uint8).
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mskd_fast.data import IMAGENET_STD, build_loader, dali_import_error, load_index
from mskd_fast.data.resize import resize_image, resize_matrix, resize_taps

DALI_REASON = dali_import_error()
needs_dali = pytest.mark.skipif(DALI_REASON is not None, reason=f"DALI cannot be imported: {DALI_REASON}")
GREY_LEVEL_TOL = 0.01
SIZES = [(75, 50), (40, 90), (300, 200), (33, 33), (17, 120)]  # (width, height): down- and upscaled


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """A manifest of random-texture JPEGs of several aspect ratios (edges everywhere, so resize differences show)."""
    root = str(tmp_path_factory.mktemp("textured"))
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"))
    rows = []
    for i, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(os.path.join(root, "img", f"{i}.jpg"), quality=90)
        rows.append(f"img/{i}.jpg,{'a' if i % 2 else 'b'}\n")
    for split in ("train", "test"):
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("path,labels\n" + "".join(rows))
    return load_index("manifest", root, "test")


def _eval_tensors(index, backend, img_size, **kw):
    workers = 0 if backend == "torch" else 1
    loader = build_loader(index, train=False, batch_size=2, img_size=img_size, loader=backend,
                          num_workers=workers, **kw)
    images, ids = [], []
    for x, _, i in loader:
        images.append(x.float().contiguous())
        ids.append(i)
    ids = torch.cat(ids)
    return torch.cat(images)[ids >= 0], ids[ids >= 0]


@needs_dali
@pytest.mark.parametrize("img_size", [24, 64, 160])
def test_dali_and_torch_eval_tensors_match(textured, img_size):
    torch_images, torch_ids = _eval_tensors(textured, "torch", img_size)
    dali_images, dali_ids = _eval_tensors(textured, "dali", img_size)
    assert torch.equal(torch_ids, dali_ids)
    grey = (torch_images - dali_images).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert grey.max().item() <= GREY_LEVEL_TOL


@needs_dali
def test_dali_fp16_channels_last_eval_matches_torch(textured):
    torch_images, _ = _eval_tensors(textured, "torch", 48, dtype=torch.float16, channels_last=True)
    dali_images, _ = _eval_tensors(textured, "dali", 48, dtype=torch.float16, channels_last=True)
    torch.testing.assert_close(dali_images, torch_images, rtol=0, atol=2e-3)  # fp16 rounding of values up to ~2.6


def _slow_resize_1d(signal: np.ndarray, n_out: int) -> np.ndarray:
    """DALI's linear antialias filter written out per output pixel (triangle of half-width max(scale, 1), clamped)."""
    n_in = len(signal)
    scale = n_in / n_out
    support = max(scale, 1.0)
    out = np.zeros(n_out)
    for i in range(n_out):
        centre = (i + 0.5) * scale - 0.5
        taps = range(int(np.floor(centre - support)), int(np.ceil(centre + support)) + 1)
        weights = np.array([max(0.0, 1 - abs(j - centre) / support) for j in taps])
        values = np.array([signal[min(max(j, 0), n_in - 1)] for j in taps])
        out[i] = (weights * values).sum() / weights.sum()
    return out


@pytest.mark.parametrize("n_in, n_out", [(50, 24), (90, 24), (7, 20), (120, 64), (33, 33), (1, 5), (5, 1)])
def test_resize_filter_matches_the_written_out_definition(n_in, n_out):
    signal = np.random.default_rng(n_in * 100 + n_out).uniform(0, 255, n_in)
    expected = _slow_resize_1d(signal, n_out)
    matrix = resize_matrix(n_in, n_out).double().numpy()
    np.testing.assert_allclose(matrix @ signal, expected, rtol=0, atol=1e-3)
    indices, weights = resize_taps(n_in, n_out)
    assert int(indices.min()) >= 0 and int(indices.max()) <= n_in - 1
    torch.testing.assert_close(weights.sum(1), torch.ones(n_out))


def test_resize_image_equals_the_separable_matrix_form():
    image = torch.randint(0, 256, (3, 37, 91), dtype=torch.uint8)
    expected = resize_matrix(37, 29) @ image.float() @ resize_matrix(91, 29).T
    torch.testing.assert_close(resize_image(image, 29), expected, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match=r"image must have shape \(C, H, W\)"):
        resize_image(image[0], 29)
