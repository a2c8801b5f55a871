"""mskd_fast.MSKD on its own, in plain training loops (CPU, tiny timm models): the terms against a hand-written
computation, the S-SD parameter snapshot under ordinary updates, gradient accumulation, skipped steps (GradScaler
with a plain and with a fused optimizer) and hand-written updates, exact resume from state_dict, the accepted
models and the refused ones, bad input, and a fullgraph compile of the tensor region."""

import copy

import pytest
import timm
import torch
from torch import nn

from mskd_fast import MSKD, ops
from mskd_fast.boxes import sample_boxes
from mskd_fast.losses import MSKDLoss
from mskd_fast.models import create_model
from mskd_fast.snapshot import ParameterSnapshot

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)
C = 5


def _timm(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=C, **TINY, **kwargs)


def _batch(seed=0, b=4, px=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, px, px, generator=g)
    y = (torch.rand(b, C, generator=g) < 0.4).float()
    y[:, 0] = 1.0
    return x, y


class _Capture(MSKDLoss):
    def forward(self, q, r, o, q_prev, targets, return_parts=False):
        self.seen = dict(q=q, r=r, o=o, q_prev=q_prev)
        return super().forward(q, r, o, q_prev, targets, return_parts=return_parts)


def _capture(mskd):
    loss = _Capture(use_lsd=mskd.use_lsd, use_rsd=mskd.use_rsd, use_ssd=mskd.use_ssd)
    mskd.loss_fn = loss
    return loss


# ------------------------------------------------------------------------------------------ terms
def test_terms_equal_the_hand_written_step_on_a_timm_model():
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    x, y = _batch()
    boxes = sample_boxes(4, 4, 64, 64, "random", torch.Generator().manual_seed(5))
    previous_model = _timm(seed=7)  # some other parameters as the S-SD teacher
    previous = {**dict(previous_model.named_parameters()),
                **{k: b for k, b in previous_model.named_buffers() if b.is_floating_point()}}
    mskd.snapshot.load_state_dict({f"teacher.model.{k}": v.detach() for k, v in previous.items()})
    reference = copy.deepcopy(model)
    teacher = copy.deepcopy(model).eval()  # the crop teacher runs before the student updates the BN statistics
    out = mskd.compute(x, y, boxes=boxes, ssd=True)
    # by hand: timm's own head on the feature map and on each ROI-pooled region, eval-mode teachers
    f = reference.forward_features(x)
    q = reference.forward_head(f)
    pooled = ops.roi_pool(f, boxes, f.shape[-1] / 64, output_size=1)
    r = reference.forward_head(pooled).view(4, 4, C)
    previous_model.eval()
    with torch.no_grad():
        o = teacher(ops.crop_resize(x, boxes, (64, 64))).view(4, 4, C)
        q_prev = previous_model(x)
    total, terms = MSKDLoss(recipe="stable")(q, r, o, q_prev, y)
    torch.testing.assert_close(out["loss"], total, rtol=1e-5, atol=1e-6)
    for key in ("bce", "lsd", "rsd", "ssd"):
        torch.testing.assert_close(out[key], terms[key], rtol=1e-5, atol=1e-6)
        assert out[key] != 0 and not out[key].requires_grad
    torch.testing.assert_close(out["logits"], q, rtol=1e-5, atol=1e-6)
    w = mskd.loss_fn  # recipe "stable"
    manual = terms["bce"] + w.iota * terms["lsd"] + w.kappa * terms["rsd"] + w.lam * terms["ssd"]
    torch.testing.assert_close(out["loss"].detach(), manual, rtol=1e-5, atol=1e-6)


def test_recipe_settings_reach_the_loss_and_the_crops():
    mskd = MSKD(_timm(), recipe="official", seed=0, rsd_crop_temperature=2.0, lam=0.5)
    assert mskd.crop_mode == "corners" and mskd.loss_fn.lsd_terms == "patch" and mskd.loss_fn.layers == 1
    assert mskd.loss_fn.lam == 0.5 and mskd.loss_fn.rsd_crop_temperature == 2.0 and mskd.loss_fn.iota == 1.0
    assert MSKD(_timm(), recipe="official", crop_mode="random", seed=0).crop_mode == "random"
    with pytest.raises(TypeError, match="unexpected option.*'lamda'"):
        MSKD(_timm(), recipe="stable", lamda=1.0)


# --------------------------------------------------------------------------------- S-SD snapshot
def _loop(mskd, model, optimizer, batches, *, accumulate=1, scaler=None):
    """The README loop (with optional accumulation / fp16 scaler); returns the q_prev seen and the parameters
    before each update (deep copies in eval mode)."""
    loss = _capture(mskd)
    seen, before = [], []
    for i, (x, y) in enumerate(batches):
        if i % accumulate == 0:
            before.append(copy.deepcopy(model).eval())
        with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
            out = mskd(x, y)
        seen.append(loss.seen["q_prev"])
        (scaler.scale(out["loss"]) if scaler is not None else out["loss"]).backward()
        if (i + 1) % accumulate == 0:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
    return seen, before


def test_ssd_teacher_is_the_parameters_before_the_last_update():
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [_batch(seed=s) for s in range(4)]
    seen, before = _loop(mskd, model, optimizer, batches)
    assert seen[0] is None  # no update yet: S-SD absent
    for step in range(1, 4):
        with torch.no_grad():
            expected = before[step - 1](batches[step][0])
        torch.testing.assert_close(seen[step], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(seen[step], before[step](batches[step][0]), rtol=1e-3, atol=1e-3)


def test_gradient_accumulation_keeps_the_teacher_and_copies_once_per_update(monkeypatch):
    copies = []
    original = ParameterSnapshot._copy_live
    monkeypatch.setattr(ParameterSnapshot, "_copy_live", lambda self, into: copies.append(1) or original(self, into))
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [_batch(seed=s) for s in range(9)]
    seen, before = _loop(mskd, model, optimizer, batches, accumulate=3)
    assert seen[:3] == [None, None, None]
    for i in range(3, 9):  # micro-batches of update k see the parameters before update k-1
        with torch.no_grad():
            expected = before[i // 3 - 1](batches[i][0])
        torch.testing.assert_close(seen[i], expected, rtol=1e-5, atol=1e-6)
    assert len(copies) == 3  # the first call, then one per update (updates 1 and 2 were followed by a call)


@pytest.mark.parametrize("fused, device_side", [(False, False), (True, False), (True, True)],
                         ids=["foreach", "fused", "fused-device-side"])
def test_a_scaler_skipped_step_leaves_the_teacher_unchanged(fused, device_side):
    """GradScaler skips a plain optimizer's step() and hands a fused one found_inf: either way, no update.
    ``device_side``: the found_inf flag is applied by the accelerator's sync-free ``torch.where`` path (its CPU
    twin) instead of being read on the host."""
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    mskd.snapshot.device_side_on_cpu = device_side
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    good = [_batch(seed=s) for s in range(3)]
    bad = (good[1][0].clone(), good[1][1])
    bad[0][0, 0, 0, 0] = float("inf")
    seen, before = _loop(mskd, model, optimizer, [good[0], good[1], bad, good[2]], scaler=scaler)
    assert scaler.get_scale() < 2.0**8  # the inf step was skipped
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        expected = before[1](good[2][0]).float()  # the last real update was the one after good[1]
        wrong = before[2](good[2][0]).float()  # the parameters of the skipped step (= the live ones)
    torch.testing.assert_close(seen[3], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[3], wrong, rtol=1e-5, atol=1e-5)


def test_a_hand_written_update_without_an_optimizer_is_seen():
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    loss = _capture(mskd)
    x, y = _batch()
    before = copy.deepcopy(model).eval()  # (the snapshot's BN statistics are those before the call)
    mskd(x, y)["loss"].backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    mskd(x, y)
    with torch.no_grad():
        torch.testing.assert_close(loss.seen["q_prev"], before(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop_after", [4, 5], ids=["after_update", "mid_accumulation"])
def test_state_dict_resumes_exactly(stop_after):
    """A runs 8 calls (2 per update); B is rebuilt from A's model, optimizer and MSKD state after `stop_after`
    calls and runs the rest: the same losses and parameters, bit for bit."""
    batches = [_batch(seed=s) for s in range(8)]

    def make():
        model = _timm()
        return model, MSKD(model, recipe="stable", seed=3), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def run(model, mskd, optimizer, calls, start=0):
        losses = []
        for i in range(start, start + calls):
            out = mskd(*batches[i])
            out["loss"].backward()
            losses.append(out["loss"].detach())
            if i % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()
        return losses

    model_a, mskd_a, opt_a = make()
    straight = run(model_a, mskd_a, opt_a, 8)
    model_b, mskd_b, opt_b = make()
    run(model_b, mskd_b, opt_b, stop_after)
    grads = {k: p.grad.clone() for k, p in model_b.named_parameters() if p.grad is not None}
    state = copy.deepcopy((model_b.state_dict(), opt_b.state_dict(), mskd_b.state_dict()))
    model_c, mskd_c, opt_c = make()
    mskd_c.load_state_dict(state[2])  # any order of model and MSKD loads before the next call
    model_c.load_state_dict(state[0])
    opt_c.load_state_dict(state[1])
    for k, p in model_c.named_parameters():  # the accumulated gradient belongs to the loop, not to MSKD
        p.grad = grads[k].clone() if k in grads else None
    resumed = run(model_c, mskd_c, opt_c, 8 - stop_after, start=stop_after)
    for a, b in zip(straight[stop_after:], resumed):
        assert torch.equal(a, b)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    if stop_after % 2 == 0:  # right after an update only the teacher travels (one copy of the model)
        assert not any(k.startswith("pending.") for k in state[2]) and any(k.startswith("teacher.") for k in state[2])


def test_teacher_behaviour_does_not_follow_train_mode_and_follows_moved_tensors():
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    mskd.train()
    model.train()
    assert not mskd.teacher.training and list(mskd.children()) == [mskd.loss_fn]  # the teacher is no sub-module
    x, y = _batch()
    mskd(x, y)["loss"].backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.double()  # Module.to replaces the buffers: the teacher and the snapshot follow
    out = mskd(x.double(), y)
    assert torch.isfinite(out["loss"]) and out["ssd"] != 0  # (logits are returned as float32)
    live = dict(model.named_buffers())
    assert all(b is live[k] for k, b in mskd.teacher.model.named_buffers())


# ------------------------------------------------------------------------------------- models
def test_accepted_models_and_clear_refusals():
    x, y = _batch()
    mskd_model, _ = create_model("resnet10t", C, **TINY)
    for model in (_timm(), mskd_model):
        out = MSKD(model, recipe="stable", seed=0)(x, y)
        assert out["logits"].shape == (4, C) and torch.isfinite(out["loss"])

    class Protocol(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.fc = nn.Linear(8, C)

        def features(self, x):
            return self.body(x)

        def head(self, pooled):
            return self.fc(pooled)

    protocol = Protocol()
    with pytest.raises(TypeError, match="num_classes"):
        MSKD(protocol, recipe="stable")  # head is a method, not an nn.Linear: C cannot be read
    protocol.num_classes = C
    out = MSKD(protocol, recipe="stable", seed=0)(x, y)
    torch.testing.assert_close(out["logits"], protocol.fc(protocol.body(x).mean((2, 3))))
    with pytest.raises(TypeError, match="missing forward_features, forward_head"):
        MSKD(nn.Linear(3, C), recipe="stable")
    with pytest.raises(TypeError, match="num_classes=0"):
        MSKD(_timm(num_classes=0) if False else timm.create_model("resnet10t", num_classes=0, **TINY), recipe="stable")
    vit = MSKD(timm.create_model("vit_tiny_patch16_224", num_classes=C, img_size=32, depth=1), recipe="stable", seed=0)
    with pytest.raises(ValueError, match="spatial feature map"):
        vit(torch.randn(2, 3, 32, 32), y[:2])


def test_bad_input_names_the_argument():
    mskd = MSKD(_timm(), recipe="stable", seed=0)
    x, y = _batch()
    with pytest.raises(ValueError, match="targets must contain only 0 and 1"):
        mskd(x, y * 0.5)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, C\) = \(4, 5\)"):
        mskd(x, y[:, :3])
    with pytest.raises(ValueError, match="images"):
        mskd(x[0], y)
    with pytest.raises(ValueError, match="crops must be an int >= 1"):
        MSKD(_timm(), recipe="stable", crops=0)
    with pytest.raises(ValueError, match="teacher_bn"):
        MSKD(_timm(), recipe="stable", teacher_bn="train")
    with pytest.raises(ValueError, match="recipe"):
        MSKD(_timm(), recipe="fast")


def test_timm_student_compiles_as_one_fullgraph_region():
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    mskd(x, y)["loss"].backward()
    optimizer.step()
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = mskd.prepare(x, y, None, 0)
        explanation = torch._dynamo.explain(mskd.compute)(**inputs)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_sd_scale_weighs_only_the_self_distillation_terms():
    model = _timm()
    mskd = MSKD(model, recipe="stable", seed=0)
    x, y = _batch()
    mskd(x, y)["loss"].backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    rng = mskd.generator.get_state()
    full = mskd(x, y)
    mskd.set_sd_scale(0.0)
    mskd.generator.set_state(rng)
    zero = mskd(x, y)
    assert torch.equal(zero["loss"].detach(), zero["bce"]) and zero["ssd"] > 0  # terms stay unweighted
    assert full["loss"] > full["bce"]


def test_crop_area_sets_the_random_crops_area_and_is_checked():
    model = _timm()
    x, y = _batch()
    default = MSKD(model, recipe="stable", seed=0)
    assert default.crop_area == (0.2, 0.3) and "area 0.2-0.3" in repr(default)
    mskd = MSKD(model, recipe="stable", seed=0, crop_area=(0.6, 0.7))
    boxes = mskd.prepare(x, y, None, 0)["boxes"]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (64 * 64)
    assert (area <= 0.7 + 1e-5).all() and area.min() > 0.4 and area.mean() > 0.55
    for bad in ((0.3, 0.2), (0.0, 0.5), (0.5, 1.5), "ab", 0.3):
        with pytest.raises(ValueError, match="crop_area must be"):
            MSKD(model, recipe="stable", crop_area=bad)
