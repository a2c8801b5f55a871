"""mskd_fast.ops.crop_resize (extension op mskd::crop_resize) against torchvision.ops.roi_align.

Every test runs with MSKD_FAST_POISON=1: the operator fills its output with NaN before the kernel
writes it, so an element the kernel misses fails the comparison. CUDA variants carry the ``cuda``
marker and skip without a GPU.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torchvision.ops import roi_align

from mskd_fast import reference
from mskd_fast.ops import crops
from mskd_fast.ops.crops import crop_resize, roi_pool
from mskd_fast.reference import boxes_to_rois as rois_of

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=(pytest.mark.cuda, NEEDS_CUDA))]
DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}

@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MSKD_FAST_POISON", "1")
    assert crops.extension_status()["poison"]


def random_images(b, c, h, w, dtype, device, channels_last=False):
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8)
    else:
        x = torch.rand(b, c, h, w, dtype=torch.float64).to(dtype)
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_boxes(b, s, h, w, device, dtype=torch.float32):
    """Boxes anywhere in [-0.3, 1.3] of the image, sizes from sub-pixel to larger than the image."""
    xy = torch.rand(b, s, 2, dtype=torch.float64) * torch.tensor([1.6 * w, 1.6 * h]) - torch.tensor([0.3 * w, 0.3 * h])
    wh = torch.rand(b, s, 2, dtype=torch.float64) ** 2 * torch.tensor([1.2 * w, 1.2 * h])
    return torch.cat([xy, xy + wh], -1).to(dtype=dtype, device=device)


def edge_boxes(h, w, device, dtype=torch.float32):
    """(2, 5, 4): full image, crossing both corners, sub-pixel, zero-size, wholly outside, border pixels."""
    boxes = [
        [0, 0, w, h],
        [-5, -4, 3, 2],
        [w - 3, h - 3, w + 8, h + 7],
        [3.2, 4.1, 3.7, 4.3],
        [5, 5, 5, 5],
        [w + 3, 1, w + 13, h - 1],
        [-10, -10, -2.5, -3],
        [-1.2, -0.7, 0.1, 0.2],
        [w - 0.5, h - 0.5, w + 0.5, h + 0.5],
        [0, h - 1, w, h],
    ]
    return torch.tensor(boxes, dtype=torch.float64).view(2, 5, 4).to(dtype=dtype, device=device)


def torchvision_crops(images, boxes, size, out_dtype, mean=None, std=None):
    work = images if images.dtype == torch.float64 else images.float()
    out = roi_align(work, rois_of(boxes.to(work.dtype)), size, 1.0, sampling_ratio=1, aligned=True)
    if mean is not None:
        out = out - torch.as_tensor(mean, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    if std is not None:
        out = out / torch.as_tensor(std, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
    return out.to(out_dtype)


def assert_matches(ours, expected):
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    atol = ATOL.get(ours.dtype)
    if atol is None:  # half precision: the same float32 value rounded once
        torch.testing.assert_close(ours, expected)
    else:
        torch.testing.assert_close(ours, expected, atol=atol * max(1.0, float(expected.abs().max())), rtol=atol)


def test_extension_is_built_and_active():
    status = crops.extension_status()
    assert status["available"] and "cpu" in status["devices"], status
    assert status["backend"] == "extension" and status["error"] is None


# ------------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", [1, 4, 5])
def test_matches_torchvision(device, channels_last, dtype, s):
    images = random_images(3, 3, 13, 19, dtype, device, channels_last)
    boxes = random_boxes(3, s, 13, 19, device)
    out = crop_resize(images, boxes, (7, 11))
    expected_dtype = dtype if dtype.is_floating_point else torch.float32
    assert out.is_contiguous()
    assert_matches(out, torchvision_crops(images, boxes, (7, 11), expected_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_boxes_follow_torchvision(device, dtype):
    images = random_images(2, 3, 13, 17, dtype, device)
    boxes = edge_boxes(13, 17, device)
    out = crop_resize(images, boxes, (5, 9), out_dtype=torch.float32)
    assert_matches(out, torchvision_crops(images, boxes, (5, 9), torch.float32))
    assert out[5].abs().max() == 0 and out[6].abs().max() == 0  # wholly outside: zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw_out", "nhwc_out"])
def test_out_dtype_layout_and_normalisation(device, out_dtype, channels_last):
    """uint8 images straight to normalised network input, and float32 images to any dtype/layout."""
    mean, std = [0.485 * 255, 0.456 * 255, 0.406 * 255], [0.229 * 255, 0.224 * 255, 0.225 * 255]
    images = random_images(2, 3, 21, 15, torch.uint8, device, channels_last=True)
    boxes = random_boxes(2, 4, 21, 15, device)
    out = crop_resize(images, boxes, (9, 8), out_dtype=out_dtype, channels_last=channels_last, mean=mean, std=std)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_matches(out, torchvision_crops(images, boxes, (9, 8), out_dtype, mean, std))
    images = random_images(2, 3, 21, 15, torch.float32, device)
    out = crop_resize(images, boxes, 6, out_dtype=out_dtype, channels_last=channels_last)
    assert_matches(out, torchvision_crops(images, boxes, (6, 6), out_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_mean_std_fusion_equals_normalising_afterwards(device):
    images = random_images(2, 3, 16, 16, torch.float32, device)
    boxes = random_boxes(2, 4, 16, 16, device)
    mean = torch.tensor([0.3, 0.5, 0.7], device=device)
    std = torch.tensor([0.2, 0.25, 0.5], device=device)
    plain = crop_resize(images, boxes, (8, 7))
    expected = (plain - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(crop_resize(images, boxes, (8, 7), mean=mean, std=std), expected, atol=0, rtol=0)
    # a single value broadcasts over channels; a sequence works like a tensor
    torch.testing.assert_close(crop_resize(images, boxes, (8, 7), mean=0.5, std=[0.25]), (plain - 0.5) / 0.25)
    torch.testing.assert_close(
        crop_resize(images, boxes, (8, 7), mean=mean.tolist(), std=std.tolist()), expected, atol=0, rtol=0
    )


@pytest.mark.parametrize("device", DEVICES)
def test_empty_crop_count(device):
    images = random_images(2, 3, 8, 8, torch.float32, device)
    out = crop_resize(images, torch.zeros(2, 0, 4, device=device), 4)
    assert out.shape == (0, 3, 4, 4)


# ------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_float64(device, channels_last):
    images = random_images(2, 2, 7, 9, torch.float64, device, channels_last).requires_grad_()
    edges = edge_boxes(7, 9, device, torch.float64)[:, :2]
    boxes = torch.cat([random_boxes(2, 2, 7, 9, device, torch.float64), edges], 1)
    assert torch.autograd.gradcheck(lambda x: crop_resize(x, boxes, (3, 4)), (images,))
    assert torch.autograd.gradcheck(
        lambda x: crop_resize(x, boxes, (2, 3), channels_last=True, mean=[0.1, -0.2], std=[0.5, 2.0]), (images,)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_backward_matches_torchvision(device, channels_last, dtype):
    images = random_images(2, 3, 11, 14, dtype, device, channels_last).requires_grad_()
    boxes = torch.cat([random_boxes(2, 3, 11, 14, device), edge_boxes(11, 14, device)], 1)
    out = crop_resize(images, boxes, (6, 5), out_dtype=torch.float32, std=[0.5, 1.0, 2.0])
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, images, grad_out)
    work = images.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    expected = torchvision_crops(work, boxes, (6, 5), work.dtype, std=[0.5, 1.0, 2.0])
    (grad_ref,) = torch.autograd.grad(expected, work, grad_out.to(work.dtype))
    assert grad.dtype == dtype
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_matches(grad, grad_ref.to(dtype))


# ------------------------------------------------------------------------------ opcheck, compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    images = random_images(2, 3, 9, 10, torch.float32, device).requires_grad_()
    boxes = random_boxes(2, 3, 9, 10, device)
    mean, std = torch.rand(3, device=device), torch.rand(3, device=device) + 0.5
    for args in [
        (images, boxes, 4, 5, torch.float32, False, None, None),
        (images, boxes, 3, 3, torch.bfloat16, True, mean, std),
        (images.detach().contiguous(memory_format=torch.channels_last).requires_grad_(), boxes, 5, 2,
         torch.float64, False, mean, None),
        (random_images(2, 3, 9, 10, torch.uint8, device), boxes, 4, 4, torch.bfloat16, True, mean, std),
    ]:
        torch.library.opcheck(torch.ops.mskd.crop_resize.default, args)
    grad = torch.randn(6, 3, 4, 5, device=device)
    torch.library.opcheck(
        torch.ops.mskd.crop_resize_backward.default, (grad, boxes, 2, 3, 9, 10, torch.bfloat16, True, std)
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    """Both extension ops inside one torch.compile(fullgraph=True) graph: forward and backward."""
    torch._dynamo.reset()

    def step(images, features, boxes):
        crops_ = crop_resize(images, boxes, (6, 5), channels_last=True, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
        pooled_max = roi_pool(features, boxes, 0.25, 1)
        pooled_avg = roi_pool(features, boxes, 0.25, (2, 3), mode="avg")
        return (crops_ * crops_).mean() + pooled_max.sin().sum() + pooled_avg.cos().sum()

    images = random_images(2, 3, 16, 20, torch.float32, device).requires_grad_()
    features = torch.randn(2, 8, 4, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    boxes = random_boxes(2, 3, 16, 20, device)
    compiled = torch.compile(step, fullgraph=True)
    loss, grads = [], []
    for fn in (step, compiled):
        value = fn(images, features, boxes)
        loss.append(value)
        grads.append(torch.autograd.grad(value, (images, features)))
    torch.testing.assert_close(loss[1], loss[0])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------- bad input


def _base():
    return random_images(2, 3, 8, 9, torch.float32, "cpu"), random_boxes(2, 2, 8, 9, "cpu")


def _with_box(value):
    images, boxes = _base()
    boxes[1, 0] = torch.tensor(value)
    return images, boxes


BAD_CALLS = [
    (lambda: crop_resize(_base()[0].numpy(), _base()[1], 4), TypeError, "images must be a torch.Tensor"),
    (lambda: crop_resize(_base()[0][0], _base()[1], 4), ValueError, "images must have shape"),
    (lambda: crop_resize(_base()[0].int(), _base()[1], 4), TypeError, "images must have dtype"),
    (lambda: crop_resize(_base()[0][:, :, :0], _base()[1], 4), ValueError, "images must have at least one"),
    (lambda: crop_resize(_base()[0], _base()[1][0], 4), ValueError, r"boxes must have shape \(B, S, 4\)"),
    (lambda: crop_resize(_base()[0], torch.zeros(2, 2, 5), 4), ValueError, r"boxes must have shape \(B, S, 4\)"),
    (lambda: crop_resize(_base()[0], _base()[1][:1], 4), ValueError, "boxes.shape.0. = 1 but images has batch size 2"),
    (lambda: crop_resize(_base()[0], _base()[1].long(), 4), TypeError, "boxes must be a floating"),
    (lambda: crop_resize(_base()[0], _base()[1].to("meta"), 4), ValueError, "boxes must be on the same device"),
    (lambda: crop_resize(*_with_box([1.0, float("nan"), 3.0, 4.0]), 4), ValueError, r"finite.*boxes\[1, 0\]"),
    (lambda: crop_resize(*_with_box([1.0, 1.0, float("inf"), 4.0]), 4), ValueError, "boxes must be finite"),
    (lambda: crop_resize(*_with_box([5.0, 1.0, 3.0, 4.0]), 4), ValueError, r"x2 >= x1 and y2 >= y1.*boxes\[1, 0\]"),
    (lambda: crop_resize(*_with_box([1.0, 5.0, 3.0, 4.0]), 4), ValueError, "x2 >= x1 and y2 >= y1"),
    (lambda: crop_resize(*_base(), 0), ValueError, "size must be >= 1"),
    (lambda: crop_resize(*_base(), (4, 0)), ValueError, "size must be >= 1"),
    (lambda: crop_resize(*_base(), "4"), TypeError, "size must be an int or a pair"),
    (lambda: crop_resize(*_base(), (4, 4, 4)), TypeError, "size must be an int or a pair"),
    (lambda: crop_resize(*_base(), 4, out_dtype=torch.int32), TypeError, "out_dtype must be a floating dtype"),
    (lambda: crop_resize(*_base(), 4, channels_last="yes"), TypeError, "channels_last must be a bool"),
    (lambda: crop_resize(*_base(), 4, mean=[0.1, 0.2]), ValueError, "mean must hold 1 or C = 3 values, got 2"),
    (lambda: crop_resize(*_base(), 4, mean=torch.zeros(4)), ValueError, "mean must hold 1 or C = 3 values"),
    (lambda: crop_resize(*_base(), 4, mean=torch.zeros(3, dtype=torch.int64)), TypeError, "mean must be a floating"),
    (lambda: crop_resize(*_base(), 4, mean=torch.zeros(3, device="meta")), ValueError, "mean must be on the images"),
    (lambda: crop_resize(*_base(), 4, mean="abc"), TypeError, "mean must be a number, a sequence"),
    (lambda: crop_resize(*_base(), 4, std=[1.0, 0.0, 1.0]), ValueError, "std must be non-zero"),
    (lambda: crop_resize(*_base(), 4, std=torch.tensor([1.0, 0.0, 1.0])), ValueError, "std must be non-zero"),
    (lambda: crop_resize(*_base(), 4, std=[1.0, float("nan"), 1.0]), ValueError, "std must be finite"),
    # the operator checks the same things when called directly
    (lambda: torch.ops.mskd.crop_resize(_base()[0], _base()[1][:1], 4, 4, torch.float32, False, None, None),
     ValueError, "boxes must hold one row of boxes per image"),
    (lambda: torch.ops.mskd.crop_resize(_base()[0], _base()[1], 4, 4, torch.int32, False, None, None),
     TypeError, "out_dtype must be a floating dtype"),
    (lambda: torch.ops.mskd.crop_resize(_base()[0], _base()[1], 4, 4, torch.float32, False, torch.zeros(2), None),
     ValueError, "mean must have one value per channel"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------ fallback, CUDA


def test_fallback_without_extension_warns_once_and_matches_reference(monkeypatch):
    images, boxes = _base()
    fast = crop_resize(images, boxes, (5, 4), out_dtype=torch.bfloat16, mean=[0.5] * 3, std=[0.2] * 3)
    fast_pool = roi_pool(images, boxes, 0.5, 2, mode="avg")
    monkeypatch.setitem(crops._STATUS, "devices", [])
    monkeypatch.setitem(crops._STATUS, "error", "simulated: extension missing")
    monkeypatch.setattr(crops, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="simulated: extension missing.*torchvision reference"):
        out = crop_resize(images, boxes, (5, 4), out_dtype=torch.bfloat16, mean=[0.5] * 3, std=[0.2] * 3)
    torch.testing.assert_close(out, fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(roi_pool(images, boxes, 0.5, 2, mode="avg"), fast_pool)
        with pytest.raises(ValueError, match="boxes must be finite"):
            crop_resize(*_with_box([1.0, float("nan"), 3.0, 4.0]), 4)
    assert crops.extension_status()["backend"] == "reference"


@pytest.mark.slow
def test_fallback_when_the_library_cannot_be_imported():
    code = (
        "import sys, warnings\n"
        "sys.modules['mskd_fast._C'] = None\n"
        "import torch, mskd_fast\n"
        "from mskd_fast.ops import crops\n"
        "status = mskd_fast.info()['extension']\n"
        "assert status['available'] is False and 'mskd_fast._C' in status['error'], status\n"
        "x, b = torch.rand(2, 3, 8, 9), torch.tensor([[[0.5, 1, 6, 7]], [[2, 2, 9, 8]]])\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out = crops.crop_resize(x, b, 4)\n"
        "    pooled = crops.roi_pool(x, b, 0.5, 2)\n"
        "assert sum('fall back' in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]\n"
        "torch.testing.assert_close(out, mskd_fast.reference.crop_resize(x, b, 4))\n"
        "torch.testing.assert_close(pooled, mskd_fast.reference.roi_pool(x, b, 0.5, 2))\n"
        "print('fallback ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MSKD_FAST_POISON"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.cuda
@NEEDS_CUDA
def test_cuda_invalid_boxes_give_nan_or_raise_in_strict_mode(monkeypatch):
    images = random_images(2, 3, 8, 9, torch.float32, "cuda")
    boxes = random_boxes(2, 2, 8, 9, "cuda")
    boxes[1, 0, 0] = float("nan")
    boxes[0, 1, 2] = -100.0
    out = crop_resize(images, boxes, 4)
    assert out[[1, 2]].isnan().all() and torch.isfinite(out[[0, 3]]).all()
    monkeypatch.setenv("MSKD_FAST_STRICT", "1")
    with pytest.raises(ValueError, match="boxes must"):
        crop_resize(images, boxes, 4)


def test_reference_module_is_the_documented_fallback():
    images, boxes = _base()
    torch.testing.assert_close(reference.crop_resize(images, boxes, 4), crop_resize(images, boxes, 4))
