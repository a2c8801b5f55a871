"""Public ops and losses: dispatch, validation errors and MSKDLoss composition."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mskd_fast import losses, ops
from mskd_fast import reference as ref
from mskd_fast.ops import _backend


def _inputs(b=4, s=3, c=5, dtype=torch.float32):
    y = (torch.rand(b, c) < 0.4).float()
    return (
        torch.randn(b, c, dtype=dtype), torch.randn(b, c, dtype=dtype), y,
        torch.randn(b, s, c, dtype=dtype), torch.randn(b, s, c, dtype=dtype),
    )


def test_reference_backend_equals_reference():
    q, t, y, r, o = _inputs()
    torch.testing.assert_close(ops.mbd_loss(q, t, y, backend="reference"), ref.mbd_loss(q, t, y))
    torch.testing.assert_close(ops.mbd_loss(q, t, y), ref.mbd_loss(q, t, y))  # auto on CPU = reference
    torch.testing.assert_close(ops.relation_loss(r, o, delta=0.5), ref.relation_loss(r, o, delta=0.5))
    torch.testing.assert_close(ops.reconstruct_logits(o, q, y, layers=3), ref.reconstruct_logits(o, q, y, layers=3))
    torch.testing.assert_close(ops.kd_loss(q, t, temperature=2.0), ref.kd_loss(q, t, temperature=2.0))
    torch.testing.assert_close(ops.reformulated_softmax(q, y, temperature=3.0), ref.reformulated_softmax(q, y, 3.0))
    assert torch.equal(ops.pseudo_labels(o, q, 9), ref.pseudo_labels(o, q, 9))


def test_auto_backend_resolution():
    cpu = torch.zeros(2)
    assert _backend.use_triton("auto", cpu) is False
    assert _backend.use_triton("reference", cpu) is False
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.use_triton("cuda", cpu)


def test_kd_loss_matches_torch_kl_div():
    q, t, *_ = _inputs()
    expected = 16 * F.kl_div(F.log_softmax(q / 4, -1), F.log_softmax(t / 4, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(ops.kd_loss(q, t), expected)


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda q, t, y, r, o: ops.mbd_loss(q[0], t[0], y[0]), ValueError, r"student must have shape \(B, C\)"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t[:, :3], y), ValueError, "teacher must have the same shape"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y[:2]), ValueError, "targets must have the same shape"),
        (lambda q, t, y, r, o: ops.mbd_loss(q.long(), t, y), TypeError, "student must be a floating tensor"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t.int(), y), TypeError, "teacher must be a floating tensor"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y * 2), ValueError, "targets must contain only 0 and 1"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, omega=1.5), ValueError, "omega must be in"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, gamma_neg=-1), ValueError, "gamma_neg must be >= 0"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, backend="fast"), ValueError, "backend must be one of"),
        (lambda q, t, y, r, o: ops.mbd_loss(q[:0], t[:0], y[:0]), ValueError, "student must be non-empty"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, "y"), TypeError, "targets must be a torch.Tensor"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t.to("meta"), y), ValueError, "one device"),
        (lambda q, t, y, r, o: ops.kd_loss(q, t, reduction="mean"), ValueError, "reduction must be one of"),
        (lambda q, t, y, r, o: ops.relation_loss(r[0], o[0]), ValueError, r"student must have shape \(B, S, C\)"),
        (lambda q, t, y, r, o: ops.relation_loss(r, o[:, :2]), ValueError, "teacher must have the same shape"),
        (lambda q, t, y, r, o: ops.relation_loss(r[:, :0], o[:, :0]), ValueError, "student must be non-empty"),
        (lambda q, t, y, r, o: ops.relation_loss(r, o, delta=0), ValueError, "delta must be > 0"),
        (lambda q, t, y, r, o: ops.reconstruct_logits(o, q[:2], y), ValueError, "logits must have shape"),
        (lambda q, t, y, r, o: ops.reconstruct_logits(o, q, y, layers=-1), ValueError, "layers must be an int"),
        (lambda q, t, y, r, o: ops.reconstruct_logits(o, q, y, k=-2), ValueError, "k must be >= 0"),
        (lambda q, t, y, r, o: ops.reconstruct_logits(o, q, y, k=2.5), TypeError, "k must be an int"),
        (lambda q, t, y, r, o: ops.pseudo_labels(o, q, torch.tensor(1.0)), TypeError, "k must be an int"),
        (lambda q, t, y, r, o: ops.reformulated_softmax(q, y[:, :2]), ValueError, "targets must have the same"),
    ],
)
def test_validation_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(*_inputs())


_BOX = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]])
_IMG = torch.rand(1, 3, 8, 8)


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        # devices: every tensor argument of every op is checked against the others
        (lambda q, t, y, r, o: ops.reformulated_softmax(q, y.to("meta")), ValueError,
         "one device, got logits on cpu, targets on meta"),
        (lambda q, t, y, r, o: ops.reformulated_softmax(q.to("meta"), y), ValueError, "one device"),
        (lambda q, t, y, r, o: ops.kd_loss(q, t.to("meta")), ValueError, "one device"),
        (lambda q, t, y, r, o: ops.relation_loss(r, o.to("meta")), ValueError, "one device"),
        (lambda q, t, y, r, o: ops.reconstruct_logits(o, q, y.to("meta")), ValueError, "one device"),
        (lambda q, t, y, r, o: ops.pseudo_labels(o, q.to("meta"), 3), ValueError, "one device"),
        (lambda q, t, y, r, o: ops.match_logit_scale(q, t.to("meta")), ValueError, "one device"),
        (lambda q, t, y, r, o: ops.crop_resize(_IMG, _BOX.to("meta"), 4), ValueError, "boxes must be on the same"),
        (lambda q, t, y, r, o: ops.roi_pool(_IMG, _BOX.to("meta"), 1.0), ValueError, "boxes must be on the same"),
        # non-numeric hyper-parameters name the argument
        (lambda q, t, y, r, o: ops.reformulated_softmax(q, y, temperature="4"), TypeError,
         "temperature must be a real number .* got str '4'"),
        (lambda q, t, y, r, o: ops.reformulated_softmax(q, y, log="yes"), TypeError, "log must be a bool"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, temperature="4"), TypeError, "temperature must be a real number"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, omega=None), TypeError, "omega must be a real number"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, gamma_pos=[1]), TypeError, "gamma_pos must be a real number"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, gamma_neg=True), TypeError, "gamma_neg must be a real number"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, weight_grad=1), TypeError, "weight_grad must be a bool"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, temperature=float("nan")), ValueError, "temperature must be > 0"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, temperature=float("inf")), ValueError, r"\(and finite\)"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, form=None), ValueError, "form must be one of 'divergence'"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, form="Paper"), ValueError, "form must be one of"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, reduction=["mean"]), ValueError, "reduction must be one of"),
        (lambda q, t, y, r, o: ops.mbd_loss(q, t, y, backend=None), ValueError, "backend must be one of"),
        (lambda q, t, y, r, o: ops.kd_loss(q, t, temperature=None), TypeError, "temperature must be a real number"),
        (lambda q, t, y, r, o: ops.relation_loss(r, o, delta="1"), TypeError, "delta must be a real number"),
        (lambda q, t, y, r, o: ops.relation_loss(r, o, backend="cuda"), ValueError, "backend must be one of"),
        (lambda q, t, y, r, o: ops.reconstruct_logits(o, q, y, layers=2.0), TypeError, "layers must be an int"),
        (lambda q, t, y, r, o: ops.reconstruct_logits(o, q, y, layers=True), TypeError, "layers must be an int"),
        (lambda q, t, y, r, o: ops.match_logit_scale(q, "t"), TypeError, "q must be a torch.Tensor"),
        (lambda q, t, y, r, o: ops.match_logit_scale(q[:, :0], t[:, :0]), ValueError, "z must be non-empty"),
        (lambda q, t, y, r, o: ops.match_logit_scale(q, t[:2]), ValueError, "q must have the same shape as z"),
        (lambda q, t, y, r, o: ops.crop_resize(_IMG, _BOX, "4"), TypeError, "size must be an int or a pair"),
        (lambda q, t, y, r, o: ops.crop_resize(_IMG, _BOX, 4, std=0), ValueError, "std must be non-zero"),
        (lambda q, t, y, r, o: ops.crop_resize(_IMG, _BOX, 4, mean="a"), TypeError, "mean must be a number"),
        (lambda q, t, y, r, o: ops.roi_pool(_IMG, _BOX, "1"), TypeError, "spatial_scale must be a float"),
        (lambda q, t, y, r, o: ops.roi_pool(_IMG, _BOX, 1.0, mode=None), ValueError, "mode must be 'max' or 'avg'"),
        # loss-module constructors check their arguments up front, not at the first forward
        (lambda *_: losses.MSKDLoss(kappa="2"), TypeError, "kappa must be a real number"),
        (lambda *_: losses.MSKDLoss(lam=-1.0), ValueError, "lam must be >= 0"),
        (lambda *_: losses.MSKDLoss(iota=None, recipe="paper", temperature=0), ValueError, "temperature must be > 0"),
        (lambda *_: losses.MSKDLoss(iota="0.1"), TypeError, "iota must be a real number"),
        (lambda *_: losses.MSKDLoss(omega=2), ValueError, r"omega must be in \[0, 1\]"),
        (lambda *_: losses.MSKDLoss(gamma_pos=None), TypeError, "gamma_pos must be a real number"),
        (lambda *_: losses.MSKDLoss(layers=-1), ValueError, "layers must be an int >= 0"),
        (lambda *_: losses.MSKDLoss(delta=0), ValueError, "delta must be > 0"),
        (lambda *_: losses.MSKDLoss(use_lsd="no"), TypeError, "use_lsd must be a bool"),
        (lambda *_: losses.MSKDLoss(use_mbd=None), TypeError, "use_mbd must be a bool"),
        (lambda *_: losses.MSKDLoss(recipe="fast"), ValueError, "recipe must be one of 'stable', 'paper'"),
        (lambda *_: losses.MSKDLoss(recipe=["paper"]), ValueError, "recipe must be one of"),
        (lambda *_: losses.MSKDLoss(mbd_form="kl"), ValueError, "mbd_form must be one of"),
        (lambda *_: losses.MSKDLoss(rsd_teacher_scale="yes"), ValueError, "rsd_teacher_scale must be one of"),
        (lambda *_: losses.MSKDLoss(backend="gpu"), ValueError, "backend must be one of"),
        (lambda *_: losses.MBDLoss(temperature="4"), TypeError, "temperature must be a real number"),
        (lambda *_: losses.MBDLoss(form="x"), ValueError, "form must be one of"),
        (lambda *_: losses.MBDLoss(reduction="avg"), ValueError, "reduction must be one of"),
        (lambda *_: losses.MBDLoss(backend="x"), ValueError, "backend must be one of"),
        (lambda *_: losses.RelationLoss(delta=None), TypeError, "delta must be a real number"),
        (lambda *_: losses.RelationLoss(backend="x"), ValueError, "backend must be one of"),
    ],
)
def test_argument_errors_name_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(*_inputs())


def test_checks_read_no_tensor_values():
    """Meta tensors have no values: the checks pass on them, so they never read (or sync) device data."""
    q, t, y, r, o = (x.to("meta") for x in _inputs())
    assert ops.reformulated_softmax(q, y, temperature=2).device.type == "meta"
    assert ops.mbd_loss(q, t, y, temperature=2, omega=1).device.type == "meta"
    assert ops.relation_loss(r, o, delta=2).device.type == "meta"
    assert ops.match_logit_scale(q, t).device.type == "meta"
    total, _ = losses.MSKDLoss(recipe="stable", iota=1, kappa=0)(q, r, o, t, y)
    assert total.device.type == "meta"


def test_integer_hyper_parameters_are_accepted():
    q, t, y, r, o = _inputs()
    torch.testing.assert_close(ops.mbd_loss(q, t, y, temperature=4, omega=1, gamma_neg=1),
                               ops.mbd_loss(q, t, y, temperature=4.0, omega=1.0, gamma_neg=1.0))
    torch.testing.assert_close(ops.relation_loss(r, o, delta=1), ops.relation_loss(r, o, delta=1.0))


@pytest.mark.parametrize("recipe", ["stable", "paper"])
def test_mskd_loss_is_weighted_sum_of_terms(recipe):
    q, q_prev, y, r, o = _inputs(b=6, s=4, c=7)
    q.requires_grad_()
    r.requires_grad_()
    crit = losses.MSKDLoss(iota=1.5, kappa=2.0, lam=2.0, recipe=recipe)
    total, terms = crit(q, r, o, q_prev, y)
    z = ref.reconstruct_logits(o, q.detach(), y, layers=2)
    if recipe == "stable":
        z = ref.match_logit_scale(z, q.detach())
    form = losses.RECIPES[recipe]["mbd_form"]
    expected = {
        "bce": F.binary_cross_entropy_with_logits(q, y),
        "lsd": ref.relation_loss(r, o),
        "rsd": ref.mbd_loss(q, z, y, form=form),
        "ssd": ref.mbd_loss(q, q_prev, y, form=form),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach())
        assert not terms[name].requires_grad
    torch.testing.assert_close(
        total, expected["bce"] + 1.5 * expected["lsd"] + 2.0 * expected["rsd"] + 2.0 * expected["ssd"]
    )
    total.backward()
    assert q.grad is not None and r.grad is not None and torch.isfinite(q.grad).all()


def test_mskd_loss_switches():
    q, q_prev, y, r, o = _inputs()
    bce = F.binary_cross_entropy_with_logits(q, y)
    off = losses.MSKDLoss(recipe="stable", use_lsd=False, use_rsd=False, use_ssd=False)
    total, terms = off(q, None, None, q_prev, y)
    torch.testing.assert_close(total, bce)
    assert all(terms[k].item() == 0 for k in ("lsd", "rsd", "ssd"))
    first_step, terms = losses.MSKDLoss(recipe="stable", use_lsd=False, use_rsd=False)(q, None, None, None, y)
    torch.testing.assert_close(first_step, bce)
    no_mbd_loss = losses.MSKDLoss(recipe="stable", use_lsd=False, use_rsd=False, use_mbd=False, lam=3.0)
    no_mbd, terms = no_mbd_loss(q, None, None, q_prev, y)
    torch.testing.assert_close(no_mbd, bce + 3.0 * ref.kd_loss(q, q_prev))
    with pytest.raises(ValueError, match="r and o"):
        losses.MSKDLoss(recipe="stable")(q, None, None, q_prev, y)


def test_loss_modules_forward_functional():
    q, t, y, r, o = _inputs()
    torch.testing.assert_close(losses.MBDLoss(temperature=2.0, omega=0.3)(q, t, y),
                               ref.mbd_loss(q, t, y, temperature=2.0, omega=0.3))
    torch.testing.assert_close(losses.RelationLoss(delta=0.2)(r, o), ref.relation_loss(r, o, delta=0.2))
    assert "temperature=2.0" in repr(losses.MBDLoss(temperature=2.0))


def test_mskd_loss_compiles_without_graph_break():
    q, q_prev, y, r, o = _inputs()
    crit = losses.MSKDLoss(recipe="stable")

    def step(q, r, o, q_prev, y):
        total, terms = crit(q, r, o, q_prev, y)
        return total

    eager = step(q, r, o, q_prev, y)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, r, o, q_prev, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 9), s=st.integers(1, 6), c=st.integers(1, 90), seed=st.integers(0, 2**31 - 1))
def test_fuzz_reference_shapes_and_finiteness(b, s, c, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, c, generator=gen) * 5
    t = torch.randn(b, c, generator=gen) * 5
    y = (torch.rand(b, c, generator=gen) < 0.3).float()
    r = torch.randn(b, s, c, generator=gen, requires_grad=True)
    o = torch.randn(b, s, c, generator=gen)
    qg = q.clone().requires_grad_()
    for weight_grad in (False, True):
        loss = ops.mbd_loss(qg, t, y, weight_grad=weight_grad)
        (g,) = torch.autograd.grad(loss, qg)
        assert loss.shape == () and torch.isfinite(loss) and torch.isfinite(g).all()
    assert ops.mbd_loss(q, t, y, reduction="none").shape == (b,)
    rel = ops.relation_loss(r, o)
    (gr,) = torch.autograd.grad(rel, r)
    assert rel.shape == () and torch.isfinite(rel) and torch.isfinite(gr).all()
    u = ops.pseudo_labels(o, q, s * int(y.sum()))
    assert u.shape == (b, s, c) and u.dtype == torch.int8
    z = ops.reconstruct_logits(o, q, y)
    assert z.shape == (b, c) and torch.isfinite(z).all()
    rs = ops.reformulated_softmax(q, y)
    assert torch.isfinite(rs).all()
    torch.testing.assert_close(rs.sum(-1), torch.ones(b), rtol=1e-5, atol=1e-5)
