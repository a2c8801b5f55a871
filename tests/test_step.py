"""mskd_fast.step: box sampling, the step's terms vs MSKDLoss, image-major order, look-ahead S-SD, non-finite skips,
LR schedule, and no graph break in the compiled region (CPU, small model)."""

import copy
import math

import pytest
import torch

from mskd_fast import ops
from mskd_fast.losses import MSKDLoss
from mskd_fast.models import create_model, eval_twin
from mskd_fast.step import StepConfig, TrainStep, build_optimizer, build_scheduler, lr_factor, sample_boxes

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)
C = 6


def _setup(method="mskd", amp_dtype=None, seed=0, lr=0.05, clip=10.0, channels_last=True, loss_kwargs=None,
           crop_mode="random", **use):
    torch.manual_seed(seed)
    model, _ = create_model("resnet10t", C, **TINY)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = eval_twin(model)
    model.train()
    flags = dict(use_lsd=True, use_rsd=True, use_ssd=True)
    flags.update(use)
    if method == "vanilla":
        flags = dict(use_lsd=False, use_rsd=False, use_ssd=False)
    loss = MSKDLoss(**flags, **(loss_kwargs or {}))
    config = StepConfig(method=method, clip_grad=clip, amp_dtype=amp_dtype, channels_last=channels_last,
                        crop_mode=crop_mode, **flags)
    opt = build_optimizer(model, lr, backbone_lr_mult=1.0)
    step = TrainStep(model, teacher, loss, opt, None, config, torch.Generator().manual_seed(seed + 1))
    return model, teacher, step


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
        StepConfig(crop_mode="corners", crops=2)


# ------------------------------------------------------------------------------ terms and order
class _Capture(MSKDLoss):
    def forward(self, q, r, o, q_prev, targets):
        self.seen = dict(q=q, r=r, o=o, q_prev=q_prev, targets=targets)
        return super().forward(q, r, o, q_prev, targets)


def test_step_terms_equal_mskdloss_on_the_same_tensors():
    model, teacher, step = _setup()
    ref_model = copy.deepcopy(model)
    ref_teacher = eval_twin(ref_model)
    x, y = _batch()
    x_next, _ = _batch(seed=1)
    q_prev = torch.randn(4, C)
    boxes = sample_boxes(4, 4, 64, 64, "random", torch.Generator().manual_seed(5))
    total, terms, q_next = step.forward_loss(x, y, boxes, x_next, q_prev)
    # the same computation written out by hand on an identical copy
    crops = ops.crop_resize(x, boxes, (64, 64), channels_last=True)
    with torch.no_grad():
        o = ref_teacher(crops).view(4, 4, C)
        q_next_ref = ref_teacher(x_next)
    q, r = ref_model(x, boxes)
    ref_total, ref_terms = MSKDLoss()(q, r, o, q_prev, y)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    for key in ("bce", "lsd", "rsd", "ssd"):
        torch.testing.assert_close(terms[key], ref_terms[key], rtol=1e-5, atol=1e-6)
        assert terms[key] != 0
    torch.testing.assert_close(q_next, q_next_ref, rtol=1e-5, atol=1e-6)
    w = step.loss_fn  # the default recipe's weights (stable: iota 0.15, kappa 2, lambda 2)
    assert w.iota > 0 and w.kappa > 0 and w.lam > 0
    manual = ref_terms["bce"] + w.iota * ref_terms["lsd"] + w.kappa * ref_terms["rsd"] + w.lam * ref_terms["ssd"]
    torch.testing.assert_close(total.detach(), manual, rtol=1e-5, atol=1e-6)


def test_crops_r_and_o_are_image_major_with_constant_colour_images():
    torch.manual_seed(0)
    model, _ = create_model("resnet10t", C, **TINY)
    teacher = eval_twin(model)
    loss = _Capture()
    config = StepConfig(clip_grad=None, amp_dtype=None, channels_last=False)
    step = TrainStep(model, teacher, loss, build_optimizer(model, 0.01), None, config, torch.Generator())
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
        full = teacher(x)  # a crop of a constant image resized to H x W is the image itself
    step.forward_loss(x, y, boxes, None, None)  # (its train-mode student forward then updates BN stats)
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
    model, teacher, step = _setup(method="vanilla")
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    x, y = _batch()
    out = step(x, y, x)
    assert not calls
    assert out["lsd"] == 0 and out["rsd"] == 0 and out["ssd"] == 0
    torch.testing.assert_close(out["total"], out["bce"])
    assert step.q_prev is None


def test_ablation_switches_reach_the_loss():
    model, teacher, step = _setup(use_lsd=False, use_ssd=False)
    x, y = _batch()
    out = step(x, y, x)
    assert out["lsd"] == 0 and out["ssd"] == 0 and out["rsd"] != 0
    assert step.q_prev is None  # no look-ahead without S-SD
    with pytest.raises(ValueError, match="must match"):
        TrainStep(model, teacher, MSKDLoss(), step.optimizer, None, step.config, None)


# ----------------------------------------------------------------------------------- S-SD look-ahead
def test_look_ahead_q_prev_is_the_next_batch_under_the_previous_parameters():
    model, teacher, step = _setup()
    x1, y1 = _batch(seed=1)
    x2, y2 = _batch(seed=2)
    x3, _ = _batch(seed=3)
    out1 = step(x1, y1, x2)
    assert out1["ssd"] == 0  # first step: S-SD absent
    before = copy.deepcopy(model).eval()  # parameters after step 1 = "previous" for step 2's batch x3
    with torch.no_grad():
        expected_for_x3 = before(x3)
    captured = _Capture()
    captured.load_state_dict(step.loss_fn.state_dict())
    step.loss_fn = captured
    q_prev_used = step.q_prev.clone()
    out2 = step(x2, y2, x3)
    assert out2["ssd"] != 0
    assert torch.equal(captured.seen["q_prev"], q_prev_used)
    torch.testing.assert_close(step.q_prev, expected_for_x3, rtol=1e-5, atol=1e-6)
    # and q_prev of x2 (used at step 2) was x2 under the parameters before step 1's update
    assert not torch.allclose(q_prev_used, before(x2).detach())


def test_last_step_without_next_batch_drops_q_prev():
    _, _, step = _setup()
    x, y = _batch()
    step(x, y, x)
    assert step.q_prev is not None
    step(x, y, None)
    assert step.q_prev is None


# --------------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("method", ["mskd", "vanilla"])
def test_loss_decreases_on_a_fixed_batch(method):
    _, _, step = _setup(method=method, lr=0.05)
    x, y = _batch(b=8)
    losses = [float(step(x, y, x)["bce"]) for _ in range(12)]
    assert losses[-1] < losses[0] * 0.8, losses


def test_bf16_autocast_step_runs_and_keeps_fp32_logits():
    _, _, step = _setup(amp_dtype=torch.bfloat16)
    loss = _Capture()
    loss.load_state_dict(step.loss_fn.state_dict())
    step.loss_fn = loss
    x, y = _batch()
    out = step(x, y, x)
    out = step(x, y, x)
    assert all(torch.isfinite(v) for v in out.values())
    assert loss.seen["q"].dtype == loss.seen["r"].dtype == loss.seen["o"].dtype == torch.float32


def test_non_finite_loss_skips_the_update_without_touching_momentum():
    model, _, step = _setup()
    x, y = _batch()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers() if b.is_floating_point()]
    out = step(bad, y, x)  # very first step is non-finite
    assert out["skipped"] == 1
    for p, p0 in zip(model.parameters(), params):
        assert torch.equal(p, p0)
    # the NaN batch's BatchNorm statistics were rolled back (else every later teacher forward is NaN)
    for b, b0 in zip([b for b in model.buffers() if b.is_floating_point()], stats):
        assert torch.equal(b, b0)
    bufs = [step.optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.count_nonzero(b) == 0 for b in bufs), "skipped first step left momentum uninitialised"
    for _ in range(2):
        step(bad, y, x)
    assert int(step.nonfinite_total) == 3 and int(step.nonfinite_streak) == 3
    out = step(x, y, x)
    assert out["skipped"] == 0 and int(step.nonfinite_streak) == 0 and int(step.nonfinite_max_streak) == 3
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), params))


def test_gradient_clipping_bounds_the_update_norm():
    model, _, step = _setup(clip=1e-3, lr=1.0)
    step.optimizer.param_groups[0]["momentum"] = step.optimizer.param_groups[1]["momentum"] = 0.0
    for g in step.optimizer.param_groups:
        g["weight_decay"] = 0.0
    x, y = _batch()
    params = [p.detach().clone() for p in model.parameters()]
    out = step(x, y, x)
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
    _, _, step = _setup(amp_dtype=torch.bfloat16)
    x, y = _batch()
    boxes = sample_boxes(4, 4, 64, 64, "random", torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(step.forward_loss)(x, y, boxes, x, torch.randn(4, C))
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_fullgraph_compiled_step_matches_eager():
    torch._dynamo.reset()
    model_e, _, eager = _setup(seed=4)
    model_c, _, compiled = _setup(seed=4)
    compiled.compiled = torch.compile(compiled.forward_loss, fullgraph=True, dynamic=False, backend="aot_eager")
    x1, y1 = _batch(seed=1)
    x2, y2 = _batch(seed=2)
    for step in (eager, compiled):
        step(x1, y1, x2)
        out = step(x2, y2, x1)  # second step: q_prev present -> the compiled region runs
        step.last = out
    for key in ("total", "bce", "lsd", "rsd", "ssd"):
        torch.testing.assert_close(compiled.last[key], eager.last[key], rtol=1e-4, atol=1e-5)
    for p, q in zip(model_e.parameters(), model_c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


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
        teacher = eval_twin(model)
        model.train()
        config = StepConfig(amp_dtype=torch.bfloat16)
        opt = build_optimizer(model, 0.01)
        gen = torch.Generator(device=device).manual_seed(3)
        steps.append(TrainStep(model, teacher, MSKDLoss(), opt, None, config, gen, compile=compiled))
        models.append(model)
    x1, y1 = (t.to(device) for t in _batch(b=8, seed=1))
    x2, y2 = (t.to(device) for t in _batch(b=8, seed=2))
    x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
    outs = []
    for step in steps:
        step(x1, y1, x2)
        out = step(x2, y2, x1)
        step(x1, y1, None)
        outs.append(out)
    for key in ("total", "bce", "lsd", "rsd", "ssd"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=5e-2, atol=5e-3)
    assert outs[1]["skipped"] == 0 and outs[1]["ssd"] != 0
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=5e-2, atol=5e-3)


def test_float16_amp_uses_the_grad_scaler_and_skips_non_finite_steps():
    torch.manual_seed(0)
    model, _ = create_model("resnet10t", C, **TINY)
    model = model.to(memory_format=torch.channels_last)
    teacher = eval_twin(model)
    config = StepConfig(amp_dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step = TrainStep(model, teacher, MSKDLoss(), build_optimizer(model, 0.05), None, config,
                     torch.Generator().manual_seed(0), scaler=scaler)
    x, y = _batch()
    params = [p.detach().clone() for p in model.parameters()]
    out = step(x, y, x)
    assert out["skipped"] == 0 and torch.isfinite(out["total"])
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), params))
    bad = x.clone()
    bad[1, 2, 3, 4] = float("inf")
    params = [p.detach().clone() for p in model.parameters()]
    out = step(bad, y, x)
    assert out["skipped"] == 1
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), params))
    assert scaler.get_scale() < 2.0**10  # the scaler saw the overflow and backed off
    with pytest.raises(ValueError, match="GradScaler"):
        TrainStep(model, teacher, MSKDLoss(), step.optimizer, None, StepConfig(amp_dtype=torch.bfloat16), None,
                  scaler=scaler)


def test_compiled_region_is_traced_once_per_run():
    """Steady state, last step (no next batch) and a step after a non-finite one reuse one graph."""
    torch._dynamo.reset()
    _, _, step = _setup(amp_dtype=torch.bfloat16)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step.compiled = torch.compile(step.forward_loss, fullgraph=True, dynamic=False, backend=counting_backend)
    x1, y1 = _batch(seed=1)
    x2, y2 = _batch(seed=2)
    step(x1, y1, x2)  # first step: no q_prev, eager
    assert not graphs
    step(x2, y2, x1)
    step(x1, y1, x2)
    step(x2, y2, None)  # last step of training
    assert len(graphs) == 1


# ------------------------------------------------------------------------------ --teacher-bn batch
@pytest.mark.parametrize("separate", [True, False], ids=["own_statistics", "joint_forward"])
def test_batch_statistics_teacher_normalises_crops_and_look_ahead_apart(separate):
    from mskd_fast.models import batch_stat_twin

    torch.manual_seed(3)
    model, _ = create_model("resnet10t", C, **TINY)
    model = model.to(memory_format=torch.channels_last)
    teacher = batch_stat_twin(model)
    model.train()
    loss = MSKDLoss()
    config = StepConfig(amp_dtype=None, teacher_batch_stats=separate)
    step = TrainStep(model, teacher, loss, build_optimizer(model, 0.05), None, config, torch.Generator().manual_seed(1))
    x, y = _batch(seed=1)
    x_next, _ = _batch(seed=2)
    x_next = x_next * 3 + 1  # other statistics than the crops'
    boxes = sample_boxes(x.shape[0], config.crops, 64, 64, "random", torch.Generator().manual_seed(5))
    running = [b.clone() for b in model.buffers()]
    _, _, q_next = step.forward_loss(x, y, boxes, x_next, None)
    with torch.no_grad():
        alone = teacher(x_next)  # a batch-statistics forward of the look-ahead images alone
        crops = ops.crop_resize(x, boxes, (64, 64), channels_last=True)
        joint = teacher(torch.cat([crops, x_next]))[-x_next.shape[0]:]
    if separate:
        torch.testing.assert_close(q_next, alone, rtol=1e-5, atol=1e-5)
    else:  # what one forward of [crops; x_next] gives: statistics of both parts
        torch.testing.assert_close(q_next, joint, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, joint, rtol=1e-3, atol=1e-3)  # the confound is real at this input
    # the student's train-mode forward updates running stats; the teacher forwards leave no trace of their own
    student_only = copy.deepcopy(model)
    for b, r in zip(student_only.buffers(), running):
        b.copy_(r)
    with torch.no_grad():
        student_only(x, boxes)
    for b, expected in zip(model.buffers(), student_only.buffers()):
        torch.testing.assert_close(b, expected)
