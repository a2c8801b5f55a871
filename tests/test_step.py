"""mskd_fast.step: box sampling, TrainStep's update (non-finite skips, clipping, AMP, schedule) around the method
object, MSKD's terms inside the step, image-major crop order, and no graph break in the compiled region (CPU, small
model). The MSKD object on its own (S-SD snapshot, adapters, state) is tested in test_mskd.py."""

import copy
import math

import pytest
import torch

from mskd_fast import MSKD, ops
from mskd_fast.losses import MSKDLoss
from mskd_fast.models import create_model, eval_twin
from mskd_fast.mskd import VanillaBCE
from mskd_fast.step import StepConfig, TrainStep, build_optimizer, build_scheduler, lr_factor, sample_boxes

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)
C = 6


def _setup(method="mskd", amp_dtype=None, seed=0, lr=0.05, clip=10.0, channels_last=True, scaler=None, **options):
    torch.manual_seed(seed)
    model, _ = create_model("resnet10t", C, **TINY)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    cls = VanillaBCE if method == "vanilla" else MSKD
    options.setdefault("recipe", "stable")  # the full three-term objective (the default recipe keeps S-SD only)
    mskd = cls(model, generator=generator, channels_last=channels_last, **options)
    opt = build_optimizer(model, lr, backbone_lr_mult=1.0)
    step = TrainStep(mskd, opt, None, StepConfig(clip_grad=clip, amp_dtype=amp_dtype), scaler=scaler)
    return model, mskd, step


def _batch(b=4, px=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, px, px, generator=g).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(b, C, generator=g) < 0.4).float()
    y[:, 0] = 1.0
    return x, y


# ------------------------------------------------------------------------------------------ boxes
def test_random_boxes_follow_spec_distribution_and_generator():
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(64, 4, 48, 80, "random", g)
    assert boxes.shape == (64, 4, 4) and boxes.dtype == torch.float32
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    area = w * h / (48 * 80)
    assert (area >= 0.2 - 1e-5).all() and (area <= 0.3 + 1e-5).all()
    ratio = w / h
    assert (ratio >= 0.4 - 1e-5).all() and (ratio <= 5 / 3 + 1e-5).all()
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] >= 0).all()
    assert (boxes[..., 2] <= 80 + 1e-4).all() and (boxes[..., 3] <= 48 + 1e-4).all()
    again = sample_boxes(64, 4, 48, 80, "random", torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)
    assert not torch.equal(boxes, sample_boxes(64, 4, 48, 80, "random", g))  # the generator advanced
    # log-uniform aspect: the median log-ratio sits near the middle of (log 2/5, log 5/3)
    mid = 0.5 * (math.log(0.4) + math.log(5 / 3))
    assert abs(torch.log(ratio).median().item() - mid) < 0.15


def test_random_boxes_take_another_area_range_and_refuse_a_bad_one():
    boxes = sample_boxes(256, 4, 64, 64, "random", torch.Generator().manual_seed(0), area=(0.6, 0.7))
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (64 * 64)
    # a side clipped to the image (elongated crops at this size) can only shrink the area
    assert (area <= 0.7 + 1e-5).all() and (area >= 0.6 - 1e-5).float().mean() > 0.5 and area.min() > 0.4
    for bad in ((0.0, 0.3), (0.5, 0.4), (0.2, 1.5), (0.3,)):
        with pytest.raises(ValueError, match="area must be"):
            sample_boxes(2, 4, 64, 64, "random", area=bad)


def test_corner_boxes_and_validation():
    boxes = sample_boxes(2, 4, 64, 32, "corners")
    expected = torch.tensor([[0, 0, 16, 32], [16, 0, 32, 32], [0, 32, 16, 64], [16, 32, 32, 64]], dtype=torch.float32)
    assert torch.equal(boxes[0], expected) and torch.equal(boxes[1], expected)
    # cached per shape and device: no host-to-device copy (a blocking one on CUDA) after the first step
    assert sample_boxes(2, 4, 64, 32, "corners").data_ptr() == boxes.data_ptr()
    assert sample_boxes(3, 4, 64, 32, "corners").shape == (3, 4, 4)
    assert sample_boxes(2, 4, 64, 64, "corners").data_ptr() != boxes.data_ptr()
    with pytest.raises(ValueError, match="4 crops"):
        sample_boxes(2, 3, 64, 64, "corners")
    with pytest.raises(ValueError, match="crop mode"):
        sample_boxes(2, 4, 64, 64, "grid")
    with pytest.raises(ValueError, match="corners"):
        MSKD(create_model("resnet10t", C, **TINY)[0], recipe="stable", crop_mode="corners", crops=2)


# ------------------------------------------------------------------------------ terms and order
class _Capture(MSKDLoss):
    def forward(self, q, r, o, q_prev, targets, return_parts=False):
        self.seen = dict(q=q, r=r, o=o, q_prev=q_prev, targets=targets)
        return super().forward(q, r, o, q_prev, targets, return_parts=return_parts)


def _capture(mskd):
    loss = _Capture(**{k: getattr(mskd.loss_fn, k) for k in ("use_lsd", "use_rsd", "use_ssd")})
    mskd.loss_fn = loss
    return loss


def test_crops_r_and_o_are_image_major_with_constant_colour_images():
    torch.manual_seed(0)
    model, _ = create_model("resnet10t", C, **TINY)
    mskd = MSKD(model, recipe="stable", seed=0)
    loss = _capture(mskd)
    b, s = 3, 4
    colours = torch.tensor([-1.5, 0.2, 2.0])
    x = colours.view(b, 1, 1, 1).expand(b, 3, 64, 64).contiguous()
    y = torch.zeros(b, C)
    y[:, 1] = 1
    boxes = sample_boxes(b, s, 64, 64, "random", torch.Generator().manual_seed(2))
    crops = ops.crop_resize(x, boxes, (64, 64))
    for i in range(b):
        for k in range(s):
            assert torch.allclose(crops[i * s + k], colours[i].expand(3, 64, 64)), (i, k)
    with torch.no_grad():
        full = mskd.teacher(x)  # a crop of a constant image resized to H x W is the image itself
    mskd.compute(x, y, boxes=boxes)  # (its train-mode student forward then updates BN stats)
    o, r = loss.seen["o"], loss.seen["r"]
    with torch.no_grad():
        for i in range(b):
            for k in range(s):
                torch.testing.assert_close(o[i, k], full[i], rtol=1e-4, atol=1e-4)
        # r row i*S+k is pooled from image i's own feature map
        model.eval()
        for i in range(b):
            _, r_i = model(x[i : i + 1], boxes[i : i + 1])
            torch.testing.assert_close(model(x, boxes)[1][i], r_i[0], rtol=1e-4, atol=1e-5)
    assert r.shape == (b, s, C) and o.shape == (b, s, C)


def test_vanilla_uses_no_teacher_and_only_bce():
    model, mskd, step = _setup(method="vanilla")
    calls = []
    mskd.teacher.register_forward_hook(lambda *a: calls.append(1))
    x, y = _batch()
    out = step(x, y)
    out = step(x, y)
    assert not calls and mskd.snapshot is None
    assert out["lsd"] == 0 and out["rsd"] == 0 and out["ssd"] == 0
    torch.testing.assert_close(out["total"], out["bce"])


def test_ablation_switches_reach_the_loss():
    model, mskd, step = _setup(use_lsd=False, use_ssd=False)
    x, y = _batch()
    step(x, y)
    out = step(x, y)
    assert out["lsd"] == 0 and out["ssd"] == 0 and out["rsd"] != 0
    assert mskd.snapshot is None  # no parameter snapshot without S-SD


def test_ssd_in_the_step_uses_the_parameters_before_the_last_update():
    model, mskd, step = _setup()
    x1, y1 = _batch(seed=1)
    x2, y2 = _batch(seed=2)
    assert step(x1, y1)["ssd"] == 0  # first step: S-SD absent
    before_update = None
    loss = _capture(mskd)
    for x, y in ((x2, y2), (x1, y1)):
        expected = None if before_update is None else before_update(x)
        before_update = copy.deepcopy(model).eval()
        out = step(x, y)
        assert out["ssd"] != 0
        if expected is not None:
            torch.testing.assert_close(loss.seen["q_prev"], expected.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("method", ["mskd", "vanilla"])
def test_loss_decreases_on_a_fixed_batch(method):
    _, _, step = _setup(method=method, lr=0.05)
    x, y = _batch(b=8)
    losses = [float(step(x, y)["bce"]) for _ in range(12)]
    assert losses[-1] < losses[0] * 0.8, losses


def test_bf16_autocast_step_runs_and_keeps_fp32_logits():
    _, mskd, step = _setup(amp_dtype=torch.bfloat16)
    loss = _capture(mskd)
    x, y = _batch()
    out = step(x, y)
    out = step(x, y)
    assert all(torch.isfinite(v) for v in out.values())
    seen = loss.seen
    assert seen["q"].dtype == seen["r"].dtype == seen["o"].dtype == seen["q_prev"].dtype == torch.float32


def test_non_finite_loss_skips_the_update_without_touching_momentum():
    model, _, step = _setup()
    x, y = _batch()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers() if b.is_floating_point()]
    out = step(bad, y)  # very first step is non-finite
    assert out["skipped"] == 1
    for p, p0 in zip(model.parameters(), params):
        assert torch.equal(p, p0)
    # the NaN batch's BatchNorm statistics were rolled back (else every later teacher forward is NaN)
    for b, b0 in zip([b for b in model.buffers() if b.is_floating_point()], stats):
        assert torch.equal(b, b0)
    bufs = [step.optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.count_nonzero(b) == 0 for b in bufs), "skipped first step left momentum uninitialised"
    for _ in range(2):
        step(bad, y)
    assert int(step.nonfinite_total) == 3 and int(step.nonfinite_streak) == 3
    out = step(x, y)
    assert out["skipped"] == 0 and int(step.nonfinite_streak) == 0 and int(step.nonfinite_max_streak) == 3
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), params))


def test_gradient_clipping_bounds_the_update_norm():
    model, _, step = _setup(clip=1e-3, lr=1.0)
    step.optimizer.param_groups[0]["momentum"] = step.optimizer.param_groups[1]["momentum"] = 0.0
    for g in step.optimizer.param_groups:
        g["weight_decay"] = 0.0
    x, y = _batch()
    params = [p.detach().clone() for p in model.parameters()]
    out = step(x, y)
    assert float(out["grad_norm"]) > 1e-3  # the norm before clipping is reported
    with torch.no_grad():
        delta = torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), params)))
    assert float(delta) <= 1e-3 * 1.001


def test_optimizer_groups_and_schedule():
    model, _ = create_model("resnet10t", C, **TINY)
    opt = build_optimizer(model, 0.1, backbone_lr_mult=0.1)
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and opt.param_groups[1]["lr"] == pytest.approx(0.1)
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, sched="cosine")
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 * 0.01) and lrs[2] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(10, total_steps=10, warmup_steps=0, sched="cosine") == pytest.approx(0.0)
    assert lr_factor(25, total_steps=100, warmup_steps=0, sched="step", step_every=10) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="sched"):
        build_scheduler(opt, total_steps=10, sched="linear")


# ---------------------------------------------------------------------------------- compilation
def test_no_graph_break_in_the_compiled_region():
    _, mskd, step = _setup(amp_dtype=torch.bfloat16)
    x, y = _batch()
    step(x, y)  # after one update the S-SD teacher exists: the steady-state region
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = mskd.prepare(x, y, None, 0)
        assert inputs["ssd"] and inputs["boxes"] is not None
        explanation = torch._dynamo.explain(mskd.compute)(**inputs)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_fullgraph_step_matches_eager_bf16():
    """Inductor-compiled step (fullgraph, bf16, channels-last) on CUDA vs the same step eager."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    steps, models = [], []
    for compiled in (False, True):
        torch.manual_seed(7)
        model, _ = create_model("resnet10t", C, **TINY)
        model = model.to(device).to(memory_format=torch.channels_last)
        model.train()
        mskd = MSKD(model, recipe="stable", generator=torch.Generator(device=device).manual_seed(3))
        steps.append(TrainStep(mskd, build_optimizer(model, 0.01), None, StepConfig(amp_dtype=torch.bfloat16),
                               compile=compiled))
        models.append(model)
    x1, y1 = (t.to(device) for t in _batch(b=8, seed=1))
    x2, y2 = (t.to(device) for t in _batch(b=8, seed=2))
    x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
    outs = []
    for step in steps:
        step(x1, y1)
        out = step(x2, y2)
        step(x1, y1)
        outs.append(out)
    for key in ("total", "bce", "lsd", "rsd", "ssd"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=5e-2, atol=5e-3)
    assert outs[1]["skipped"] == 0 and outs[1]["ssd"] != 0
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=5e-2, atol=5e-3)


def test_float16_amp_uses_the_grad_scaler_and_skips_non_finite_steps():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, mskd, step = _setup(amp_dtype=torch.float16, scaler=scaler)
    x, y = _batch()
    params = [p.detach().clone() for p in model.parameters()]
    out = step(x, y)
    assert out["skipped"] == 0 and torch.isfinite(out["total"])
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), params))
    bad = x.clone()
    bad[1, 2, 3, 4] = float("inf")
    params = [p.detach().clone() for p in model.parameters()]
    out = step(bad, y)
    assert out["skipped"] == 1
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), params))
    assert scaler.get_scale() < 2.0**10  # the scaler saw the overflow and backed off
    with pytest.raises(ValueError, match="GradScaler"):
        TrainStep(mskd, step.optimizer, None, StepConfig(amp_dtype=torch.bfloat16), scaler=scaler)


def test_compiled_region_is_traced_once_per_run():
    """Steady state, a step after a non-finite one, a diagnosed (eager) step and a new SD warm-up factor reuse one
    graph."""
    torch._dynamo.reset()
    _, mskd, step = _setup(amp_dtype=torch.bfloat16)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    mskd.compile(fullgraph=True, backend=counting_backend)
    step.set_sd_scale(0.25)  # --sd-warmup-epochs: a 0-dim input, updated in place
    x1, y1 = _batch(seed=1)
    x2, y2 = _batch(seed=2)
    step(x1, y1)  # first step: no S-SD teacher yet, eager
    assert not graphs
    step(x2, y2)
    step.set_sd_scale(1.0)
    bad = x1.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert step(bad, y1)["skipped"] == 1
    step(x1, y1)
    step(x2, y2, diagnose=True)
    step(x1, y1)
    assert len(graphs) == 1


# ------------------------------------------------------------------------------ --teacher-bn batch
def test_batch_statistics_teacher_normalises_crops_and_the_ssd_images_apart():
    torch.manual_seed(3)
    model, _ = create_model("resnet10t", C, **TINY)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    mskd = MSKD(model, recipe="stable", teacher_bn="batch", seed=1)
    loss = _capture(mskd)
    x, y = _batch(seed=1)
    x = x * 3 + 1  # other statistics than those of the crops
    mskd.snapshot.load_state_dict({f"teacher.{k}": t.detach() for k, t in mskd.snapshot.live().items()})
    boxes = sample_boxes(x.shape[0], 4, 64, 64, "random", torch.Generator().manual_seed(5))
    running = [b.clone() for b in model.buffers()]
    mskd.compute(x, y, boxes=boxes, ssd=True)
    twin = eval_twin(model)
    for module in twin.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
    with torch.no_grad():
        alone = twin(x)  # a batch-statistics forward of the images alone
        crops = ops.crop_resize(x, boxes, (64, 64), channels_last=True)
        joint = twin(torch.cat([crops, x]))[-x.shape[0]:]
    torch.testing.assert_close(loss.seen["q_prev"], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, joint, rtol=1e-3, atol=1e-3)  # a joint forward would differ
    # the student's train-mode forward updates running stats; the teacher forwards leave no trace of their own
    student_only = copy.deepcopy(model)
    for b, r in zip(student_only.buffers(), running):
        b.copy_(r)
    with torch.no_grad():
        student_only(x, boxes)
    for b, expected in zip(model.buffers(), student_only.buffers()):
        torch.testing.assert_close(b, expected)
