"""Extension ops vs torchvision at training shapes (B=64, S=4), forward (+ backward for roi_pool).

Groups (the ``torchvision`` entry is each group's baseline):

* ``crops-crop_resize-fp32nchw-bf16cl-B<B>-S4-224-<device>``: fp32 NCHW images -> 224x224 bf16
  channels-last crops. torchvision: ``roi_align(images, rois, 224, 1, 1, aligned=True)`` then
  ``.to(bf16, memory_format=channels_last)`` (ROI tensor built inside the timed region).
* ``crops-crop_resize-u8cl-norm-bf16cl-B<B>-S4-224-<device>``: uint8 channels-last images ->
  ImageNet-normalised bf16 channels-last crops (the teacher-input path). torchvision: ``float()``,
  ``roi_align``, normalise, cast.
* ``crops-roi_pool-<mode>-B64-S4-D<D>-7x7-<device>``: forward + backward of 1x1 ROI pooling on a
  7x7 map (``spatial_scale=1/32``); D=512 NCHW (ResNet-34), D=768 channels-last view (Swin-T).

On CPU the crop_resize groups use B=16 (B=64 takes seconds per call on a 2-core machine); the
shape is in the group name.
"""

import pytest
import torch
from torchvision.ops import roi_align
from torchvision.ops import roi_pool as tv_roi_pool

from mskd_fast.ops import crops

pytestmark = pytest.mark.skipif(not crops.extension_status()["available"], reason="mskd_fast._C is not built")

MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255
STD = torch.tensor([0.229, 0.224, 0.225]) * 255


def _rois(boxes: torch.Tensor) -> torch.Tensor:
    b, s, _ = boxes.shape
    index = torch.arange(b, dtype=boxes.dtype, device=boxes.device).repeat_interleave(s)
    return torch.cat([index[:, None], boxes.reshape(-1, 4)], 1)


def _crop_boxes(b, s, size, gen):
    """Random-resized-crop boxes (SPEC 6): area fraction U(0.2, 0.3), log-uniform aspect in (2/5, 5/3)."""
    area = (torch.rand(b, s, generator=gen) * 0.1 + 0.2) * size * size
    log_r = torch.rand(b, s, generator=gen) * (torch.log(torch.tensor(5 / 3)) - torch.log(torch.tensor(2 / 5)))
    ratio = torch.exp(log_r + torch.log(torch.tensor(2 / 5)))
    w = torch.sqrt(area * ratio).clamp(max=size)
    h = torch.sqrt(area / ratio).clamp(max=size)
    x1 = torch.rand(b, s, generator=gen) * (size - w)
    y1 = torch.rand(b, s, generator=gen) * (size - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], -1)


def _crop_batch(device):
    return 64 if device.type == "cuda" else 16


@pytest.mark.parametrize("impl", ["torchvision", "mskd_fast"])
def test_crop_resize_fp32_to_bf16_channels_last(benchmark, bench_run, device, impl):
    b, s, size = _crop_batch(device), 4, 224
    benchmark.group = f"crops-crop_resize-fp32nchw-bf16cl-B{b}-S{s}-{size}-{device.type}"
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, size, size, generator=gen).to(device)
    boxes = _crop_boxes(b, s, size, gen).to(device)
    if impl == "torchvision":

        def fn(images, boxes):
            out = roi_align(images, _rois(boxes), (size, size), 1.0, sampling_ratio=1, aligned=True)
            return out.to(torch.bfloat16, memory_format=torch.channels_last)
    else:

        def fn(images, boxes):
            return crops.crop_resize(images, boxes, size, out_dtype=torch.bfloat16, channels_last=True)

    out = bench_run(benchmark, fn, images, boxes, device=device, impl=impl, baseline=impl == "torchvision")
    assert out.shape == (b * s, 3, size, size) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", ["torchvision", "mskd_fast"])
def test_crop_resize_uint8_normalised(benchmark, bench_run, device, impl):
    b, s, size = _crop_batch(device), 4, 224
    benchmark.group = f"crops-crop_resize-u8cl-norm-bf16cl-B{b}-S{s}-{size}-{device.type}"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, size, size), generator=gen, dtype=torch.uint8)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    boxes = _crop_boxes(b, s, size, gen).to(device)
    mean, std = MEAN.to(device), STD.to(device)
    if impl == "torchvision":

        def fn(images, boxes):
            out = roi_align(images.float(), _rois(boxes), (size, size), 1.0, sampling_ratio=1, aligned=True)
            out = (out - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
            return out.to(torch.bfloat16, memory_format=torch.channels_last)
    else:

        def fn(images, boxes):
            return crops.crop_resize(
                images, boxes, size, out_dtype=torch.bfloat16, channels_last=True, mean=mean, std=std
            )

    out = bench_run(benchmark, fn, images, boxes, device=device, impl=impl, baseline=impl == "torchvision")
    assert out.shape == (b * s, 3, size, size) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", ["torchvision", "mskd_fast"])
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("dim", [512, 768])
def test_roi_pool_fwd_bwd(benchmark, bench_run, device, impl, mode, dim):
    b, s, fmap, img = 64, 4, 7, 224
    benchmark.group = f"crops-roi_pool-{mode}-B{b}-S{s}-D{dim}-{fmap}x{fmap}-{device.type}"
    gen = torch.Generator().manual_seed(0)
    if dim == 768:  # Swin-T: (B, h, w, D) features viewed as (B, D, h, w), channels-last strides
        features = torch.randn(b, fmap, fmap, dim, generator=gen).to(device).permute(0, 3, 1, 2)
    else:
        features = torch.randn(b, dim, fmap, fmap, generator=gen).to(device)
    features.requires_grad_()
    boxes = _crop_boxes(b, s, img, gen).to(device)
    grad_out = torch.randn(b * s, dim, 1, 1, generator=gen).to(device)
    scale = fmap / img
    if impl == "torchvision":

        def pool(features, boxes):
            if mode == "max":
                return tv_roi_pool(features, _rois(boxes), (1, 1), scale)
            return roi_align(features, _rois(boxes), (1, 1), scale, sampling_ratio=-1, aligned=True)
    else:

        def pool(features, boxes):
            return crops.roi_pool(features, boxes, scale, 1, mode=mode)

    def fn(features, boxes):
        out = pool(features, boxes)
        (grad,) = torch.autograd.grad(out, features, grad_out)
        return grad

    grad = bench_run(benchmark, fn, features, boxes, device=device, impl=impl, baseline=impl == "torchvision")
    assert grad.shape == features.shape and torch.isfinite(grad).all()
