"""The switches the ``official`` recipe and the study need (docs/SPEC.md, SPEC 6 recipes): L-SD with its
within-image term only (``terms="patch"``), the R-SD crop-softmax temperature, the R-SD teacher divided by S,
and the recipe table itself. Reference against hand-written float64 formulas, kernels (Triton interpreter on
CPU, outputs NaN-poisoned) against the reference."""

import pytest
import torch
import torch.nn.functional as F
from _kernel_utils import (
    DEVICE,
    assert_close_scaled,
    fp32_rtol,
    ignore_interpreter_nan_warnings,
    poisoned_outputs,  # noqa: F401 - fixture
)

from mskd_fast import kernels, ops
from mskd_fast import reference as ref
from mskd_fast.losses import DEFAULT_RECIPE, RECIPES, MSKDLoss, resolve_recipe

pytestmark = [pytest.mark.usefixtures("poisoned_outputs"), ignore_interpreter_nan_warnings]


def _patch_term_by_hand(r, o, delta=1.0):
    """SPEC 3's within-image term written out with loops (float64)."""
    b, s, _ = r.shape

    def dists(a):
        d = torch.zeros(b, s, s, dtype=a.dtype)
        for i in range(b):
            for j in range(s):
                for k in range(s):
                    if j != k:
                        d[i, j, k] = torch.sqrt(((a[i, j] - a[i, k]) ** 2).sum() + 1e-12)
        return d / (d.sum() / (b * s * (s - 1))).clamp(min=1e-12)

    return F.huber_loss(dists(r), dists(o), delta=delta)


def test_reference_patch_term_is_spec3_within_image_term():
    r = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    o = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(ref.relation_loss(r, o, terms="patch"), _patch_term_by_hand(r.detach(), o))
    # "both" = the patch term + the batch term, which is the S=1 relation loss of the crop means
    both = ref.relation_loss(r, o)
    batch = ref.relation_loss(r.mean(1, keepdim=True), o.mean(1, keepdim=True))
    torch.testing.assert_close(both, ref.relation_loss(r, o, terms="patch") + batch)
    assert torch.autograd.gradcheck(lambda x: ref.relation_loss(x, o, terms="patch"), (r,))


@pytest.mark.parametrize("b, s, c", [(1, 4, 20), (5, 4, 81), (3, 3, 7), (4, 1, 5)])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, fp32_rtol(1e-5)), (torch.bfloat16, 2e-2)])
def test_kernel_patch_term_matches_reference(b, s, c, dtype, rtol):
    r = (torch.randn(b, s, c, device=DEVICE) * 2).to(dtype)
    o = (torch.randn(b, s, c, device=DEVICE) * 2).to(dtype)
    grad_out = torch.randn((), dtype=torch.float64, device=DEVICE)
    out = {}
    for name, fn, x, t in (("kernel", kernels.relation_loss, r, o), ("ref", ref.relation_loss, r.double(), o.double())):
        xs = x.detach().clone().requires_grad_()
        loss = fn(xs, t, terms="patch")
        (grad,) = torch.autograd.grad(loss, xs, grad_out.to(loss.dtype))
        out[name] = (loss, grad)
    assert_close_scaled(out["kernel"][0], out["ref"][0], rtol, "loss")
    assert_close_scaled(out["kernel"][1], out["ref"][1], rtol, "grad")
    if s == 1:
        assert float(out["kernel"][0].detach()) == 0.0 and not out["kernel"][1].any()


def test_patch_terms_argument_is_checked():
    r = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="terms"):
        ops.relation_loss(r, r, terms="batch")


def _reconstruct_by_hand(o, q, y, layers, tau):
    u = ref.pseudo_labels(o, q, ref.default_k(y, o.shape[1])).to(o.dtype)
    v = ref.propagate(o, u, layers)
    w = torch.exp(v / tau) / torch.exp(v / tau).sum(dim=1, keepdim=True)
    return (w * o).sum(dim=1)


@pytest.mark.parametrize("tau", [1.0, 0.25, 3.0])
def test_crop_temperature_reference_and_kernel(tau):
    b, s, c = 5, 4, 81
    o = torch.randn(b, s, c, device=DEVICE) * 2
    q = torch.randn(b, c, device=DEVICE)
    y = (torch.rand(b, c, device=DEVICE) < 0.1).float()
    expected = _reconstruct_by_hand(o.double(), q.double(), y, 2, tau)
    torch.testing.assert_close(ref.reconstruct_logits(o.double(), q.double(), y, crop_temperature=tau), expected)
    z = kernels.reconstruct_logits(o, q, y, crop_temperature=tau)
    assert_close_scaled(z, expected, fp32_rtol(1e-5), "z")
    if tau == 1.0:
        plain = ref.reconstruct_logits(o, q, y)
        torch.testing.assert_close(plain, ref.reconstruct_logits(o, q, y, crop_temperature=1.0))


def test_sharper_crop_softmax_moves_the_teacher_towards_the_best_crop():
    o = torch.randn(6, 4, 10, dtype=torch.float64) * 3
    q = o.mean(1)
    y = (torch.rand(6, 10) < 0.3).double()
    soft = ref.reconstruct_logits(o, q, y, crop_temperature=1.0)
    sharp = ref.reconstruct_logits(o, q, y, crop_temperature=0.05)
    mean = o.mean(1)
    assert (sharp - mean).abs().mean() > (soft - mean).abs().mean()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_crop_temperature_is_checked(bad):
    o, q, y = torch.randn(2, 3, 4), torch.randn(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="crop_temperature"):
        ops.reconstruct_logits(o, q, y, crop_temperature=bad)


def test_recipes_table_and_official_values():
    assert set(RECIPES) == {"stable", "paper", "official", "step"} and DEFAULT_RECIPE == "step"
    keys = set(RECIPES["stable"])
    assert all(set(r) == keys for r in RECIPES.values())
    assert RECIPES["official"] == {"mbd_form": "paper", "rsd_teacher_scale": "none", "iota": 1.0, "kappa": 1.0,
                                   "lam": 1.0, "layers": 1, "lsd_terms": "patch", "rsd_teacher_reduce": "mean",
                                   "crop_mode": "corners", "terms": ("lsd", "rsd", "ssd"), "teacher_bn": "eval"}
    loss = MSKDLoss(recipe="official")
    assert (loss.iota, loss.kappa, loss.lam, loss.layers, loss.lsd_terms, loss.rsd_teacher_reduce) == \
        (1.0, 1.0, 1.0, 1, "patch", "mean")
    assert resolve_recipe("official", kappa=3.0)["kappa"] == 3.0
    with pytest.raises(ValueError, match="recipe"):
        MSKDLoss(recipe="authors")
    with pytest.raises(ValueError, match="lsd_terms"):
        MSKDLoss(recipe="stable", lsd_terms="batch")
    with pytest.raises(ValueError, match="rsd_teacher_reduce"):
        MSKDLoss(recipe="stable", rsd_teacher_reduce="max")


def _inputs(b=4, s=4, c=7):
    q = torch.randn(b, c, dtype=torch.float64, requires_grad=True)
    r = torch.randn(b, s, c, dtype=torch.float64, requires_grad=True)
    o = torch.randn(b, s, c, dtype=torch.float64)
    q_prev = torch.randn(b, c, dtype=torch.float64)
    y = (torch.rand(b, c) < 0.3).double()
    y[0, 0] = 1
    return q, r, o, q_prev, y


def test_official_loss_is_the_sum_of_its_documented_parts():
    q, r, o, q_prev, y = _inputs()
    total, terms, parts = MSKDLoss(recipe="official", backend="reference")(q, r, o, q_prev, y, return_parts=True)
    bce = F.binary_cross_entropy_with_logits(q, y)
    lsd = ref.relation_loss(r, o, terms="patch")
    z = ref.reconstruct_logits(o, q.detach(), y, layers=1) / o.shape[1]  # the teacher divided by S, not re-scaled
    rsd = ref.mbd_loss(q, z, y, form="paper")
    ssd = ref.mbd_loss(q, q_prev, y, form="paper")
    torch.testing.assert_close(total, bce + lsd + rsd + ssd)
    torch.testing.assert_close(sum(parts.values()), total)
    for name, value in (("lsd", lsd), ("rsd", rsd), ("ssd", ssd)):
        torch.testing.assert_close(terms[name], value.detach().float())
        torch.testing.assert_close(parts[name], value)  # weights 1


def test_return_parts_are_the_weighted_terms_and_do_not_change_the_total():
    q, r, o, q_prev, y = _inputs()
    loss = MSKDLoss(recipe="stable", backend="reference")
    plain_total, plain_terms = loss(q, r, o, q_prev, y)
    total, terms, parts = loss(q, r, o, q_prev, y, return_parts=True)
    assert torch.equal(total, plain_total) and terms.keys() == plain_terms.keys()
    assert loss.diagnostic_terms == ("bce", "lsd", "rsd", "ssd") == tuple(parts)
    torch.testing.assert_close(parts["lsd"], loss.iota * terms["lsd"].double())
    torch.testing.assert_close(parts["rsd"], loss.kappa * terms["rsd"].double())
    torch.testing.assert_close(parts["ssd"], loss.lam * terms["ssd"].double())
    assert MSKDLoss(recipe="stable", use_lsd=False, use_ssd=False).diagnostic_terms == ("bce", "rsd")
    _, _, parts = loss(q, r, o, None, y, return_parts=True)  # first step: S-SD absent, a constant 0
    assert float(parts["ssd"]) == 0.0 and not parts["ssd"].requires_grad


def test_default_recipe_step_is_s_sd_alone_with_the_paper_form():
    assert RECIPES["step"]["terms"] == ("ssd",) and RECIPES["step"]["teacher_bn"] == "batch"
    loss = MSKDLoss(backend="reference")  # the default recipe
    assert (loss.recipe, loss.use_lsd, loss.use_rsd, loss.use_ssd, loss.lam, loss.mbd_form) == (
        "step", False, False, True, 0.1, "paper")
    q, _, _, q_prev, y = _inputs()
    total, terms = loss(q, None, None, q_prev, y)  # no crops needed
    torch.testing.assert_close(total, F.binary_cross_entropy_with_logits(q, y)
                               + 0.1 * ref.mbd_loss(q, q_prev, y, form="paper"))
    assert float(terms["lsd"]) == float(terms["rsd"]) == 0.0
    assert MSKDLoss(recipe="step", use_lsd=True).use_lsd  # switches still override the recipe's terms
