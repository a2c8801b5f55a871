"""Method objects (mskd_fast.methods; mskd_fast.MSKD and VanillaBCE for mskd and vanilla) inside TrainStep on CPU
with a tiny model: outputs, updates, non-finite skips, state round trips (exact continuation), the compiled region,
and each method's own mechanics."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mskd_fast.methods import METHODS, build_method
from mskd_fast.models import create_model
from mskd_fast.step import StepConfig, TrainStep, build_optimizer
from mskd_fast.train_args import build_parser
from mskd_fast.train_build import build_method_object

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)
C = 6
N = 40  # training-set size seen by PS-KD's bank
ALL = sorted(METHODS) + ["mskd", "vanilla"]  # every --method: one contract


def _args(**overrides):
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _setup(name, seed=0, amp_dtype=None, lr=0.05, generator=None, **overrides):
    torch.manual_seed(seed)
    model, _ = create_model("resnet10t", C, **TINY)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    generator = torch.Generator().manual_seed(seed + 1) if generator is None else generator
    if name in METHODS:
        method = build_method(name, model, _args(**overrides), num_samples=N, epochs=4, generator=generator)
    else:
        method = build_method_object(_args(method=name, **overrides), model, num_samples=N, generator=generator)
    opt = build_optimizer(model, lr, backbone_lr_mult=1.0, extra_params=method.extra_parameters())
    step = TrainStep(method, opt, None, StepConfig(amp_dtype=amp_dtype))
    return model, method, step


def _batch(b=4, px=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, px, px, generator=g).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(b, C, generator=g) < 0.4).float()
    y[:, 0] = 1.0
    ids = torch.randperm(N, generator=g)[:b]
    return x, y, ids


def _state(model, method, step):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(step.optimizer.state_dict()),
            copy.deepcopy(step.state_dict()), copy.deepcopy(method.rank_state_dict()))


# ------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", ALL)
def test_forward_returns_loss_logits_and_the_methods_terms(name):
    model, method, _ = _setup(name)
    x, y, ids = _batch()
    out = method(x, y, sample_ids=ids, epoch=1)
    assert set(out) == {"loss", "logits", *method.terms}
    assert method.terms[0] == "bce"
    assert out["loss"].requires_grad and out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["logits"].shape == (4, C) and out["logits"].dtype == torch.float32
    for term in method.terms:
        assert out[term].dim() == 0 and out[term].dtype == torch.float32 and not out[term].requires_grad, term
    torch.testing.assert_close(out["bce"], F.binary_cross_entropy_with_logits(out["logits"], y).detach())
    method.after_step(torch.zeros((), dtype=torch.bool))


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_are_refused_with_the_argument_named(name):
    _, method, _ = _setup(name)
    x, y, ids = _batch()
    with pytest.raises(ValueError, match="targets"):
        method(x, y[:, :3], sample_ids=ids, epoch=0)
    with pytest.raises(ValueError, match="images"):
        method(x[0], y, sample_ids=ids, epoch=0)
    if method.needs_sample_ids:
        with pytest.raises(ValueError, match="sample_ids"):
            method(x, y, sample_ids=None, epoch=0)
        with pytest.raises(ValueError, match="sample_ids"):
            method(x, y, sample_ids=ids + N, epoch=0)


@pytest.mark.parametrize("name", ALL)
def test_a_step_updates_the_model_and_reports_finite_terms(name):
    model, method, step = _setup(name)
    before = [p.detach().clone() for p in model.parameters()]
    for seed in (1, 2):
        x, y, ids = _batch(seed=seed)
        out = step(x, y, sample_ids=ids, epoch=0)
    assert out["skipped"] == 0
    for key in ("total", *method.terms, "grad_norm"):
        assert torch.isfinite(out[key]), key
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("name", ALL)
def test_a_non_finite_step_changes_no_parameter_statistic_or_method_state(name):
    model, method, step = _setup(name)
    x, y, ids = _batch(seed=1)
    step(x, y, sample_ids=ids, epoch=0)
    model_state, _, step_state, _ = _state(model, method, step)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    x2, y2, ids2 = _batch(seed=2)
    out = step(bad, y2, sample_ids=ids2, epoch=0)
    assert out["skipped"] == 1
    # floating tensors: parameters, BN statistics (rolled back), banks, queues, key encoders; the integer
    # num_batches_tracked counters are not rolled back (as for MSKD: timm's BN uses a fixed momentum)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, model_state[key]), key
    for key, value in step.state_dict()["method"].items():
        if not key.endswith("num_batches_tracked") and key != "generator":  # MSKD's box generator advances
            assert torch.equal(value, step_state["method"][key]), f"{name} state {key} changed by a skipped step"
    out = step(x2, y2, sample_ids=ids2, epoch=0)  # and the run goes on
    assert out["skipped"] == 0 and torch.isfinite(out["total"])


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_continues_exactly(name):
    """Steps 1-2 on A, its full state into a fresh B, step 3 on both: identical terms and parameters."""
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    model_a, method_a, step_a = _setup(name, seed=3, generator=gen_a)
    batches = [_batch(seed=s) for s in (11, 12, 13)]
    for x, y, ids in batches[:2]:
        step_a(x, y, sample_ids=ids, epoch=1)
    model_state, opt_state, step_state, rank_state = _state(model_a, method_a, step_a)
    model_b, method_b, step_b = _setup(name, seed=99, generator=gen_b)
    model_b.load_state_dict(model_state)
    step_b.optimizer.load_state_dict(opt_state)
    step_b.load_state_dict(step_state)
    method_b.load_rank_state_dict(rank_state)
    gen_b.set_state(gen_a.get_state())
    rng = torch.get_rng_state()
    x, y, ids = batches[2]
    out_a = step_a(x, y, sample_ids=ids, epoch=1)
    torch.set_rng_state(rng)
    out_b = step_b(x, y, sample_ids=ids, epoch=1)
    for key in ("total", *method_a.terms):
        assert torch.equal(out_a[key], out_b[key]), key
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for (k, v), (_, w) in zip(method_a.state_dict().items(), method_b.state_dict().items()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("name", ALL)
def test_loss_parts_sum_to_the_loss_and_feed_the_diagnostics(name):
    _, method, step = _setup(name)
    x, y, ids = _batch(seed=1)
    step(x, y, sample_ids=ids, epoch=1)  # methods with carried state reach their steady state
    x, y, ids = _batch(seed=2)
    out = method(x, y, sample_ids=ids, epoch=1)
    parts = method.loss_parts()
    assert tuple(parts) == method.diagnostic_terms and method.diagnostic_terms[0] == "bce"
    torch.testing.assert_close(sum(parts.values()), out["loss"])
    method.after_step(torch.zeros((), dtype=torch.bool))
    with pytest.raises(RuntimeError, match="loss_parts"):
        method.loss_parts()
    result = step(x, y, diagnose=True, sample_ids=ids, epoch=1)
    assert torch.isfinite(result["gnorm_bce"]) and result["gnorm_bce"] > 0
    for term in method.diagnostic_terms[1:]:
        assert f"gnorm_{term}" in result and f"gcos_{term}" in result, term


@pytest.mark.parametrize("name", ALL)
def test_the_compute_region_has_no_graph_break(name):
    _, method, step = _setup(name, amp_dtype=torch.bfloat16)
    x, y, ids = _batch(seed=1)
    step(x, y, sample_ids=ids, epoch=0)  # methods with carried state reach their steady-state shapes
    x, y, ids = _batch(seed=2)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = method.prepare(x, y, ids, 0)
        explanation = torch._dynamo.explain(method.compute)(**inputs)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_compiled_step_matches_eager(name):
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model, method, step = _setup(name, seed=4)
        if compiled:
            method.compile(fullgraph=True, backend="aot_eager")
        outs = []
        for s in (1, 2, 3):  # epochs 0, 1, 2: PS-KD's alpha_t changes between compiled calls
            x, y, ids = _batch(seed=s)
            outs.append(step(x, y, sample_ids=ids, epoch=s - 1))
        runs.append((model, outs, method.terms))
    (model_e, outs_e, _), (model_c, outs_c, _) = runs
    for out_e, out_c in zip(outs_e, outs_c):
        for key in ("total", *runs[0][2]):
            torch.testing.assert_close(out_c[key], out_e[key], rtol=1e-4, atol=1e-5)
    for p, q in zip(model_e.parameters(), model_c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- PS-KD
def test_pskd_bank_holds_last_predictions_and_feeds_the_next_epoch():
    model, method, step = _setup("pskd", lr=0.0)  # lr 0: the model stays fixed, so predictions are comparable
    x, y, ids = _batch(seed=5)
    out = method(x, y, sample_ids=ids, epoch=0)
    assert torch.equal(out["soft_bce"], out["bce"])  # epoch 0: nothing seen, the soft target is y
    method.after_step(torch.zeros((), dtype=torch.bool))
    torch.testing.assert_close(method.bank[ids], torch.sigmoid(out["logits"].detach()))
    assert method.seen[ids].all() and int(method.seen.sum()) == 4
    alpha = 0.8 * 3 / 4
    out2 = method(x, y, sample_ids=ids, epoch=2)
    soft = (1 - alpha) * y + alpha * method.bank[ids]
    torch.testing.assert_close(out2["soft_bce"], F.binary_cross_entropy_with_logits(out2["logits"], soft).detach())
    assert not torch.equal(out2["soft_bce"], out2["bce"])
    assert method.alpha_t.item() == pytest.approx(alpha)


def test_pskd_bank_is_in_the_step_state():
    _, method, step = _setup("pskd")
    x, y, ids = _batch(seed=6)
    step(x, y, sample_ids=ids, epoch=0)
    state = step.state_dict()["method"]
    assert set(state) == {"bank", "seen"} and state["bank"].shape == (N, C)
    assert state["bank"][ids].gt(0).all() and int(state["seen"].sum()) == 4


# --------------------------------------------------------------------------------------------- DLB
def test_dlb_carries_the_last_half_and_distills_towards_its_stored_logits():
    model, method, step = _setup("dlb", lr=0.0)
    x1, y1, ids1 = _batch(seed=7)
    out1 = method(x1, y1, sample_ids=ids1, epoch=0)
    assert out1["kd"] == 0  # first step: nothing carried
    method.after_step(torch.zeros((), dtype=torch.bool))
    assert torch.equal(method.stored_images, x1[2:])
    torch.testing.assert_close(method.stored_logits, out1["logits"][2:].detach())
    x2, y2, ids2 = _batch(seed=8)
    out2 = method(x2, y2, sample_ids=ids2, epoch=0)
    both = model(torch.cat([x2, x1[2:]]))  # the same train-mode forward (batch statistics of all 6 images)
    torch.testing.assert_close(out2["logits"], both[:4])
    p = torch.sigmoid(out1["logits"][2:].detach() / 3.0)
    q = torch.sigmoid(both[4:] / 3.0)
    kd = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean()
    torch.testing.assert_close(out2["kd"], kd.detach(), rtol=1e-4, atol=1e-7)


def test_dlb_term_is_masked_after_a_skipped_step_and_rank_state_round_trips():
    _, method, step = _setup("dlb")
    x, y, ids = _batch(seed=9)
    step(x, y, sample_ids=ids, epoch=0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    assert step(bad, y, sample_ids=ids, epoch=0)["skipped"] == 1
    assert method.stored_valid == 0 and torch.isfinite(method.stored_logits).all()
    out = step(x, y, sample_ids=ids, epoch=0)
    assert out["kd"] == 0 and out["skipped"] == 0
    assert method.stored_valid == 1
    state = method.rank_state_dict()
    assert set(state) == {"images", "logits", "valid"} and state["images"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="batch size"):
        method(x[:1], y[:1], sample_ids=ids[:1], epoch=0)


# ------------------------------------------------------------------------------------------- DDGSD
def test_ddgsd_forwards_the_loaders_view_and_a_distorted_one_in_one_batch():
    model, method, _ = _setup("ddgsd", lr=0.0)
    x, y, ids = _batch(seed=10)
    state = method.generator.get_state()
    out = method(x, y, sample_ids=ids, epoch=0)
    from mskd_fast.methods._common import distorted_view, sample_view

    method.generator.set_state(state)
    boxes, flips = sample_view(4, 64, 64, method.generator, "cpu")
    area = (boxes[:, 0, 2] - boxes[:, 0, 0]) * (boxes[:, 0, 3] - boxes[:, 0, 1]) / 64**2
    assert (area >= 0.6 - 1e-5).all() and (area <= 1 + 1e-5).all()
    logits, feats = model(torch.cat([x, distorted_view(x, boxes, flips)]), with_features=True)
    torch.testing.assert_close(out["logits"], logits[:4])
    torch.testing.assert_close(out["bce2"], F.binary_cross_entropy_with_logits(logits[4:], y).detach())
    gap = feats[:4].float().mean(0) - feats[4:].float().mean(0)
    torch.testing.assert_close(out["mmd"], gap.square().sum().detach(), rtol=1e-5, atol=1e-8)


def test_distorted_view_flips_and_crops_as_asked():
    from mskd_fast.methods._common import distorted_view

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    full = torch.tensor([[[0.0, 0.0, 8.0, 8.0]], [[0.0, 0.0, 8.0, 8.0]]])
    out = distorted_view(x, full, torch.tensor([False, True]))
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], x[1].flip(-1))
    left = distorted_view(x, torch.tensor([[[0.0, 0.0, 4.0, 8.0]]] * 2), torch.tensor([False, False]))
    assert left[0, 0, 0, 0] == x[0, 0, 0, 0] and left[0, 0, 0, -1] < x[0, 0, 0, 4]


# -------------------------------------------------------------------------------------------- USKD
def test_uskd_aux_head_reads_the_second_to_last_stage_and_is_trained():
    model, method, step = _setup("uskd", lr=0.0)
    assert method.stage_name == "layer3" and method.stage_channels == 32
    assert {id(p) for p in method.aux_head.parameters()} <= {id(p) for g in step.optimizer.param_groups
                                                               for p in g["params"]}
    assert step.optimizer.param_groups[-1]["name"] == "method"
    x, y, ids = _batch(seed=12)
    seen = {}
    handle = model.backbone.layer3.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    out = method(x, y, sample_ids=ids, epoch=0)
    handle.remove()
    aux = method.aux_head(seen["mid"].mean(dim=(2, 3)).float())
    smoothed = y * 0.9 + 0.05
    torch.testing.assert_close(out["aux"], F.binary_cross_entropy_with_logits(aux, smoothed).detach())
    assert set(step.state_dict()["method"]) == {"aux_head.weight", "aux_head.bias"}
    _, method2, step2 = _setup("uskd")
    before = method2.aux_head.weight.detach().clone()
    step2(x, y, sample_ids=ids, epoch=0)
    assert not torch.equal(method2.aux_head.weight, before)


# --------------------------------------------------------------------------------------- MulSupCon
def test_mulsupcon_queue_fills_wraps_and_enters_the_loss_once_full():
    _, method, step = _setup("mulsupcon", mulsupcon_queue=6)
    assert method.projection.net[0].out_features == 256  # D = 64 < 2 * 256: hidden width = dim
    batches = [_batch(seed=s) for s in (20, 21, 22)]
    x, y, ids = batches[0]
    step(x, y, sample_ids=ids, epoch=0)
    keys0 = method.queue[:4].clone()
    assert int(method.queue_pointer) == 4 and not bool(method.queue_full)
    torch.testing.assert_close(method.queue_labels[:4], y)
    assert torch.allclose(keys0.norm(dim=1), torch.ones(4))
    x, y, ids = batches[1]
    step(x, y, sample_ids=ids, epoch=0)
    assert int(method.queue_pointer) == 2 and bool(method.queue_full)  # 8 keys into 6 slots: wrapped
    torch.testing.assert_close(method.queue_labels[4:6], y[:2])
    torch.testing.assert_close(method.queue_labels[:2], y[2:])
    torch.testing.assert_close(method.queue[2:4], keys0[2:4])
    # once full, every queue key is in the denominator: the term differs from a batch-only computation
    x, y, ids = batches[2]
    outs = []
    for full in (True, False):  # same views and dropout draws; only the queue's validity differs
        method.queue_full.fill_(full)
        method.generator.manual_seed(5)
        torch.manual_seed(5)
        outs.append(method(x, y, sample_ids=ids, epoch=0))
    assert not torch.allclose(outs[0]["supcon"], outs[1]["supcon"])
    torch.testing.assert_close(outs[0]["bce"], outs[1]["bce"])


def test_mulsupcon_key_encoder_is_a_momentum_average_of_the_student():
    model, method, step = _setup("mulsupcon", mulsupcon_momentum=0.9)
    key_params, query_params = method._pairs()
    assert all(not p.requires_grad for p in key_params)
    assert all(torch.equal(k, q) for k, q in zip(key_params, query_params))  # starts as a copy
    old_keys = [p.detach().clone() for p in key_params]
    x, y, ids = _batch(seed=23)
    step(x, y, sample_ids=ids, epoch=0)
    for k, k0, q in zip(key_params, old_keys, query_params):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q.detach())
    assert any(not torch.equal(k, k0) for k, k0 in zip(key_params, old_keys))
