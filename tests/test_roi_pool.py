"""mskd_fast.ops.roi_pool (extension op mskd::roi_pool) against torchvision.

``mode="max"`` is compared with ``torchvision.ops.roi_pool`` (values and argmax), ``mode="avg"``
with ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)``. Every test runs with
MSKD_FAST_POISON=1 (outputs and argmax are poisoned before the kernels write them). CUDA variants
carry the ``cuda`` marker and skip without a GPU.
"""

import pytest
import torch
from torchvision.ops import roi_align

from mskd_fast.ops import crops
from mskd_fast.ops.crops import roi_pool
from mskd_fast.reference import boxes_to_rois as rois_of

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=(pytest.mark.cuda, NEEDS_CUDA))]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MSKD_FAST_POISON", "1")
    assert crops.extension_status()["poison"]


def random_features(b, d, h, w, dtype, device, channels_last=False):
    x = torch.randn(b, d, h, w, dtype=torch.float64).to(dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def image_boxes(b, s, img_h, img_w, device, dtype=torch.float32):
    """Boxes in input-image pixels: anywhere in [-0.3, 1.3] of the image, tiny to larger than it,
    plus (when s >= 4) a full-image box, one wholly outside and a zero-size one."""
    xy = torch.rand(b, s, 2, dtype=torch.float64) * torch.tensor([1.6 * img_w, 1.6 * img_h])
    xy -= torch.tensor([0.3 * img_w, 0.3 * img_h])
    wh = torch.rand(b, s, 2, dtype=torch.float64) ** 2 * torch.tensor([1.2 * img_w, 1.2 * img_h])
    boxes = torch.cat([xy, xy + wh], -1)
    if s >= 4:
        boxes[0, 0] = torch.tensor([0.0, 0.0, img_w, img_h])
        boxes[-1, 1] = torch.tensor([img_w + 40.0, 3.0, img_w + 90.0, img_h - 3.0])
        boxes[0, 2] = torch.tensor([10.0, 12.0, 10.0, 12.0])
    return boxes.to(dtype=dtype, device=device)


def torchvision_pool(features, boxes, scale, size, mode):
    work = features if features.dtype == torch.float64 else features.float()
    rois = rois_of(boxes.to(work.dtype))
    if mode == "max":
        return torch.ops.torchvision.roi_pool(work, rois, scale, *size)
    return roi_align(work, rois, size, scale, sampling_ratio=-1, aligned=True), None


def assert_close_in(dtype, got, want):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    elif dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got, want)


# -------------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", [1, 4, 5])
def test_matches_torchvision(device, mode, channels_last, dtype, s):
    features = random_features(3, 6, 7, 9, dtype, device, channels_last)
    boxes = image_boxes(3, s, 224, 288, device)
    for size in [(1, 1), (2, 3), (7, 5)]:
        out = roi_pool(features, boxes, 1 / 32, size, mode=mode)
        expected, expected_argmax = torchvision_pool(features, boxes, 1 / 32, size, mode)
        assert out.dtype == dtype and out.shape == (3 * s, 6, *size)
        if channels_last and size != (1, 1):
            assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close_in(dtype, out, expected.to(dtype))
        if mode == "max":
            _, argmax = torch.ops.mskd.roi_pool(features, boxes, 1 / 32, *size, "max")
            assert torch.equal(argmax.long(), expected_argmax.long())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_scales_and_sub_pixel_boxes(device, mode):
    features = random_features(2, 5, 13, 11, torch.float32, device)
    boxes = image_boxes(2, 5, 26, 22, device)
    boxes[1, 3] = torch.tensor([3.3, 4.1, 3.6, 4.4])  # smaller than a feature pixel
    boxes[1, 4] = torch.tensor([-0.9, -0.6, 0.2, 0.3])  # straddling the top-left border
    for scale in [0.5, 1.0, 0.37]:
        out = roi_pool(features, boxes, scale, (3, 2), mode=mode)
        assert_close_in(torch.float32, out, torchvision_pool(features, boxes, scale, (3, 2), mode)[0])


# ------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_float64(device, mode, channels_last):
    features = random_features(2, 3, 5, 6, torch.float64, device, channels_last).requires_grad_()
    boxes = image_boxes(2, 4, 20, 24, device, torch.float64)
    assert torch.autograd.gradcheck(lambda x: roi_pool(x, boxes, 0.25, (2, 3), mode=mode), (features,))
    assert torch.autograd.gradcheck(lambda x: roi_pool(x, boxes, 0.25, 1, mode=mode), (features,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_backward_matches_torchvision(device, mode, channels_last, dtype):
    features = random_features(3, 8, 7, 7, dtype, device, channels_last).requires_grad_()
    boxes = image_boxes(3, 5, 224, 224, device)
    out = roi_pool(features, boxes, 1 / 32, (2, 2), mode=mode)
    grad_out = torch.randn(out.shape, device=device).to(dtype)
    (grad,) = torch.autograd.grad(out, features, grad_out)
    work = features.detach().float().requires_grad_()
    rois = rois_of(boxes)
    if mode == "max":
        from torchvision.ops import roi_pool as tv_roi_pool

        expected = tv_roi_pool(work, rois, (2, 2), 1 / 32)
    else:
        expected = roi_align(work, rois, (2, 2), 1 / 32, sampling_ratio=-1, aligned=True)
    (grad_ref,) = torch.autograd.grad(expected, work, grad_out.float())
    assert grad.dtype == dtype
    if channels_last:
        assert grad.is_contiguous(memory_format=torch.channels_last)
    assert_close_in(dtype, grad, grad_ref.to(dtype))


# ---------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    boxes = image_boxes(2, 4, 64, 80, device)
    for channels_last in (False, True):
        features = random_features(2, 6, 8, 10, torch.float32, device, channels_last).requires_grad_()
        for mode in ("max", "avg"):
            for size in ((1, 1), (3, 2)):
                torch.library.opcheck(torch.ops.mskd.roi_pool.default, (features, boxes, 0.125, *size, mode))
    features = random_features(2, 6, 8, 10, torch.bfloat16, device)
    out, argmax = torch.ops.mskd.roi_pool(features, boxes, 0.125, 2, 2, "max")
    grad = torch.randn_like(out)
    for mode, am in (("max", argmax), ("avg", argmax[:0].reshape(0))):
        torch.library.opcheck(
            torch.ops.mskd.roi_pool_backward.default, (grad, boxes, am, 0.125, 2, 6, 8, 10, mode, True)
        )


# ------------------------------------------------------------------------------------- bad input


def _base():
    return random_features(2, 4, 7, 7, torch.float32, "cpu"), image_boxes(2, 3, 224, 224, "cpu")


def _with_box(value):
    features, boxes = _base()
    boxes[0, 2] = torch.tensor(value)
    return features, boxes


BAD_CALLS = [
    (lambda: roi_pool(_base()[0].tolist(), _base()[1], 1 / 32), TypeError, "features must be a torch.Tensor"),
    (lambda: roi_pool(_base()[0].to(torch.uint8), _base()[1], 1 / 32), TypeError, "features must have dtype"),
    (lambda: roi_pool(_base()[0][0], _base()[1], 1 / 32), ValueError, "features must have shape"),
    (lambda: roi_pool(_base()[0][:, :0], _base()[1], 1 / 32), ValueError, "features must have at least one"),
    (lambda: roi_pool(_base()[0], _base()[1][..., :3], 1 / 32), ValueError, r"boxes must have shape \(B, S, 4\)"),
    (lambda: roi_pool(_base()[0], _base()[1][1:], 1 / 32), ValueError, "but features has batch size 2"),
    (lambda: roi_pool(_base()[0], _base()[1].int(), 1 / 32), TypeError, "boxes must be a floating"),
    (lambda: roi_pool(_base()[0], _base()[1].to("meta"), 1 / 32), ValueError, "boxes must be on the same device"),
    (lambda: roi_pool(*_with_box([1.0, 2.0, float("nan"), 9.0]), 1 / 32), ValueError, r"finite.*boxes\[0, 2\]"),
    (lambda: roi_pool(*_with_box([1.0, 2.0, 0.5, 9.0]), 1 / 32), ValueError, r"x2 >= x1.*boxes\[0, 2\]"),
    (lambda: roi_pool(*_base(), 0.0), ValueError, "spatial_scale must be finite and > 0"),
    (lambda: roi_pool(*_base(), -0.5), ValueError, "spatial_scale must be finite and > 0"),
    (lambda: roi_pool(*_base(), float("inf")), ValueError, "spatial_scale must be finite and > 0"),
    (lambda: roi_pool(*_base(), "1/32"), TypeError, "spatial_scale must be a float"),
    (lambda: roi_pool(*_base(), 1 / 32, 0), ValueError, "output_size must be >= 1"),
    (lambda: roi_pool(*_base(), 1 / 32, (2, 2.5)), TypeError, "output_size must be an int or a pair"),
    (lambda: roi_pool(*_base(), 1 / 32, mode="sum"), ValueError, "mode must be 'max' or 'avg'"),
    (lambda: torch.ops.mskd.roi_pool(*_base(), 1 / 32, 1, 1, "sum"), ValueError, "mode must be 'max' or 'avg'"),
    (lambda: torch.ops.mskd.roi_pool(*_base(), -1.0, 1, 1, "max"), ValueError, "spatial_scale must be finite"),
    (lambda: torch.ops.mskd.roi_pool(*_with_box([1.0, 2.0, 0.5, 9.0]), 0.1, 1, 1, "avg"), ValueError, "x2 >= x1"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.cuda
@NEEDS_CUDA
def test_cuda_invalid_boxes_give_nan(monkeypatch):
    features = random_features(2, 4, 7, 7, torch.float32, "cuda")
    boxes = image_boxes(2, 2, 224, 224, "cuda")
    boxes[1, 1, 3] = float("inf")
    for mode in ("max", "avg"):
        out = roi_pool(features, boxes, 1 / 32, 2, mode=mode)
        assert out[3].isnan().all() and torch.isfinite(out[:3]).all()
    monkeypatch.setenv("MSKD_FAST_STRICT", "1")
    with pytest.raises(ValueError, match="boxes must be finite"):
        roi_pool(features, boxes, 1 / 32, 2)
