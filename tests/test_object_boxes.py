"""``mskd_fast.boxes.object_boxes``: the R-SD oracle's crops on annotated objects (issue 24), against the
properties its docstring states, on odd sizes; deterministic under its generator."""

import pytest
import torch

from mskd_fast.boxes import object_boxes


def _area(b):
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def test_small_objects_are_grown_about_their_centre_to_the_crop_area():
    h, w = 48, 80
    obj = torch.tensor([[30.0, 20.0, 34.0, 24.0], [60.0, 10.0, 70.0, 14.0]])  # 4x4 and 10x4 boxes
    boxes = object_boxes([obj], 6, h, w, generator=torch.Generator().manual_seed(0), area=(0.2, 0.3))
    assert boxes.shape == (1, 6, 4) and boxes.dtype == torch.float32
    frac = _area(boxes[0]) / (h * w)
    assert bool(((frac >= 0.2 - 1e-5) & (frac <= 0.3 + 1e-5)).all())
    contains = torch.zeros(2, 6, dtype=torch.bool)
    for s in range(6):  # every crop contains one of the objects, keeps its aspect ratio, lies in the image
        b = boxes[0, s]
        for k, o in enumerate(obj):
            contains[k, s] = bool((b[0] <= o[0] + 1e-4) & (b[1] <= o[1] + 1e-4) & (b[2] >= o[2] - 1e-4)
                                  & (b[3] >= o[3] - 1e-4))
        assert 0 <= b[0] < b[2] <= w + 1e-4 and 0 <= b[1] < b[3] <= h + 1e-4
        ratio = float((b[2] - b[0]) / (b[3] - b[1]))
        assert ratio == pytest.approx(1.0, rel=1e-4) or ratio == pytest.approx(2.5, rel=1e-4)
    # two objects, six crops: each object is reused, three crops each (these crops are too small for both)
    assert contains.sum(1).tolist() == [3, 3] and contains.any(0).all()


def test_large_objects_are_taken_as_they_are_and_images_without_objects_get_random_crops():
    big = torch.tensor([[5.0, 5.0, 45.0, 40.0]])  # 40 x 35 = 1400 px, 0.55 of 50 x 50
    g = torch.Generator().manual_seed(1)
    boxes = object_boxes([big, torch.empty(0, 4), None], 3, 50, 50, generator=g)
    assert torch.equal(boxes[0], big.expand(3, 4))
    for i in (1, 2):  # random-resized-crop boxes (SPEC's 20-30 % of the area)
        frac = _area(boxes[i]) / 2500
        assert bool(((frac > 0.19) & (frac < 0.31)).all())


def test_an_object_near_the_border_is_shifted_inside():
    boxes = object_boxes([torch.tensor([[0.0, 46.0, 2.0, 48.0]])], 2, 48, 48,
                         generator=torch.Generator().manual_seed(2))
    assert bool((boxes[..., :2] >= 0).all()) and bool((boxes[..., 2:] <= 48 + 1e-4).all())
    assert bool((boxes[0, :, 0] == 0).all()) and torch.allclose(boxes[0, :, 3], torch.tensor(48.0))


def test_deterministic_under_the_generator_and_objects_reused_in_a_random_order():
    objs = [torch.tensor([[1.0, 1.0, 3.0, 3.0], [20.0, 20.0, 22.0, 22.0], [40.0, 5.0, 42.0, 7.0]])]
    a = object_boxes(objs, 5, 48, 48, generator=torch.Generator().manual_seed(3))
    b = object_boxes(objs, 5, 48, 48, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    far = torch.tensor([[10.0, 10.0, 12.0, 12.0], [100.0, 100.0, 102.0, 102.0], [180.0, 20.0, 182.0, 22.0]])
    first3 = object_boxes([far], 3, 200, 200, generator=torch.Generator().manual_seed(4), area=(0.01, 0.02))
    cs = (first3[0, :, :2] + first3[0, :, 2:]) / 2
    ids = sorted(int(torch.cdist(c[None], (far[:, :2] + far[:, 2:]) / 2).argmin()) for c in cs)
    assert ids == [0, 1, 2]  # S == n: every object exactly once


def test_bad_input_names_what_was_expected():
    with pytest.raises(ValueError, match="needs the dataset's object boxes"):
        object_boxes(None, 4, 32, 32)
    with pytest.raises(ValueError, match=r"objects\[0\] must hold"):
        object_boxes([torch.tensor([[5.0, 5.0, 1.0, 9.0]])], 4, 32, 32)
    with pytest.raises(ValueError, match="area"):
        object_boxes([torch.empty(0, 4)], 4, 32, 32, area=(0.5, 0.1))
    with pytest.raises(ValueError, match="crops"):
        object_boxes([torch.empty(0, 4)], 0, 32, 32)
