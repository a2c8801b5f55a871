"""The PyTorch reference against SPEC.md: spec vectors, float64 gradcheck and the stated invariants."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mskd_fast import reference as ref

SPEC_VECTORS = Path(__file__).resolve().parent / "data" / "spec_vectors.json"  # checked by test_spec_data.py


def _spec_cases():
    if not SPEC_VECTORS.exists():
        pytest.fail(f"spec vectors not found at {SPEC_VECTORS} (they are part of the repository)")
    return json.loads(SPEC_VECTORS.read_text())["cases"]


def _t(case, key):
    return torch.tensor(case[key], dtype=torch.float64)


def _random_targets(b, c, p=0.3, dtype=torch.float64):
    y = (torch.rand(b, c) < p).to(dtype)
    y[0] = 0  # a row without positives
    if b > 1:
        y[1] = 1  # a row where every class is positive
    return y


# --- spec vectors -------------------------------------------------------------------------------

@pytest.mark.parametrize("case_index", [0, 1])
def test_spec_vectors(case_index):
    case = _spec_cases()[case_index]
    y = _t(case, "targets")
    student = _t(case, "student").requires_grad_()
    teacher = _t(case, "teacher")
    torch.testing.assert_close(
        ref.reformulated_softmax(student, y, temperature=2.0), _t(case, "reformulated_softmax_T2(student)"),
        rtol=1e-12, atol=1e-14,
    )
    # Keys that name no form are the paper form; the divergence keys are SPEC 2's default.
    mbd_keys = [
        ("paper", False, "mbd_loss(student, teacher, targets)", "d_student"),
        ("paper", True, "mbd_loss(..., weight_grad=True)", "d_student_weight_grad"),
        ("divergence", False, "mbd_loss(..., form='divergence')", "d_student_divergence"),
        ("divergence", True, "mbd_loss(..., form='divergence', weight_grad=True)",
         "d_student_divergence_weight_grad"),
    ]
    for form, weight_grad, value_key, grad_key in mbd_keys:
        loss = ref.mbd_loss(student, teacher, y, weight_grad=weight_grad, form=form)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == pytest.approx(case[value_key], rel=1e-12, abs=1e-14), value_key
        torch.testing.assert_close(grad, _t(case, grad_key), rtol=1e-10, atol=1e-14, msg=grad_key)
    assert ref.mbd_loss(student, teacher, y).item() == pytest.approx(case["mbd_loss(..., form='divergence')"],
                                                                     rel=1e-12)  # the default form

    r = _t(case, "r").requires_grad_()
    loss = ref.relation_loss(r, _t(case, "o"))
    (grad,) = torch.autograd.grad(loss, r)
    assert loss.item() == pytest.approx(case["relation_loss(r, o)"], rel=1e-12)
    torch.testing.assert_close(grad, _t(case, "d_r"), rtol=1e-10, atol=1e-14)

    assert int(ref.default_k(y, case["S"])) == case["k_default"]
    z = ref.reconstruct_logits(_t(case, "o"), _t(case, "q"), y, layers=2)
    torch.testing.assert_close(z, _t(case, "reconstruct_logits(o, q, targets, layers=2)"), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ref.match_logit_scale(z, _t(case, "q")),
                               _t(case, "match_logit_scale(reconstruct_logits(o, q, targets), q)"),
                               rtol=1e-12, atol=1e-13)


# --- float64 gradcheck ----------------------------------------------------------------------------

FORMS = ["divergence", "paper"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_mbd_weight_grad(reduction, form):
    b, c = 4, 6
    y = _random_targets(b, c)
    s = torch.randn(b, c, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, c, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: ref.mbd_loss(s, t, y, weight_grad=True, reduction=reduction, form=form), (s,))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_mbd_constant_weights(reduction, form):
    """weight_grad=False: the gradient is that of the loss with the weights frozen at the current point."""
    b, c, temp = 4, 6, 4.0
    y = _random_targets(b, c)
    s0 = torch.randn(b, c, dtype=torch.float64)
    t = torch.randn(b, c, dtype=torch.float64)
    lp = ref.log_reformulated_softmax(t / temp, y)
    p = lp.exp()
    q0 = ref.reformulated_softmax(s0, y, temperature=temp)
    w0 = ref._mbd_weights(p, q0, y > 0.5, 0.5, 0.25, 1.0, weight_grad=False)

    def frozen(s):
        lq = ref.log_reformulated_softmax(s / temp, y)
        bracket = p * (lp - lq) + ((lq.exp() - p) if form == "divergence" else 0.0)
        return temp**2 * ref._reduce((w0 * bracket).sum(-1), reduction)

    s = s0.clone().requires_grad_()
    assert torch.autograd.gradcheck(frozen, (s,))
    upstream = torch.randn(b, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (auto,) = torch.autograd.grad(ref.mbd_loss(s, t, y, reduction=reduction, form=form), s, upstream)
    (expected,) = torch.autograd.grad(frozen(s), s, upstream)
    torch.testing.assert_close(auto, expected)
    torch.testing.assert_close(ref.mbd_loss(s0, t, y, reduction=reduction, form=form), frozen(s0))


def test_gradcheck_reformulated_softmax_and_kd():
    y = _random_targets(5, 7)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ref.log_reformulated_softmax(x, y), (x,))
    t = torch.randn(5, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ref.kd_loss(x, t), (x,))


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 3, 4), (3, 1, 4), (2, 2, 1)])
def test_gradcheck_relation(shape):
    r = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    o = torch.randn(*shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r: ref.relation_loss(r, o, delta=0.3), (r,))


def test_gradcheck_propagate():
    o = torch.randn(2, 4, 5, dtype=torch.float64)
    u = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: ref.propagate(o, u, layers=3), (u,))


def test_gradcheck_crop_resize_and_roi_pool():
    images = torch.randn(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[0.5, 1.0, 7.25, 8.0], [2.0, 0.0, 10.0, 5.5]],
                          [[-1.0, 2.0, 4.0, 12.0], [3.3, 3.3, 3.9, 4.1]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ref.crop_resize(x, boxes, (5, 4)), (images,))
    assert torch.autograd.gradcheck(lambda x: ref.roi_pool(x, boxes, 0.5, 2, mode="avg"), (images,))


# --- SPEC invariants ------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_rs_rows_sum_to_one_and_finite(scale):
    y = _random_targets(16, 13)
    x = torch.randn(16, 13, dtype=torch.float64) * scale
    for dtype in (torch.float64, torch.float32):
        rs = ref.reformulated_softmax(x.to(dtype), y)
        assert torch.isfinite(rs).all()
        assert torch.isfinite(ref.reformulated_softmax(x.to(dtype), y, log=True)).all()
        # log-space terms of size `scale` carry one ulp of error (eps * scale), no better.
        eps = torch.finfo(dtype).eps
        tol = 1e-5 + 2 * eps * scale if dtype == torch.float32 else 1e-12 + 2 * eps * scale
        torch.testing.assert_close(rs.sum(-1).double(), torch.ones(16, dtype=torch.float64), rtol=0, atol=tol)


def test_rs_edge_rows():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(3, 6, dtype=torch.float64)
    y[1] = 1
    y[2, [0, 3]] = 1
    rs = ref.reformulated_softmax(x, y)
    torch.testing.assert_close(rs[0], torch.softmax(x[0], -1))
    torch.testing.assert_close(rs[1], torch.full((6,), 1 / 6, dtype=torch.float64))
    # Row 2 by the definition: each positive against all negatives, averaged over positives.
    neg = [1, 2, 4, 5]
    expected = torch.zeros(6, dtype=torch.float64)
    for t in (0, 3):
        logits = torch.cat([x[2, t : t + 1], x[2, neg]])
        soft = torch.softmax(logits, -1)
        expected[t] += soft[0] / 2
        expected[neg] += soft[1:] / 2
    torch.testing.assert_close(rs[2], expected)
    (grad,) = torch.autograd.grad(rs[1].sum() + (rs[1] ** 2).sum(), x)
    assert torch.equal(grad[1], torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("form", FORMS)
def test_mbd_all_positive_rows_have_zero_gradient_and_teacher_none(form):
    y = _random_targets(6, 9)
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    loss = ref.mbd_loss(s, t, y, form=form)
    loss.backward()
    assert t.grad is None
    assert torch.equal(s.grad[1], torch.zeros(9, dtype=torch.float64))
    assert s.grad[0].abs().sum() > 0


def test_mbd_no_positive_rows_use_softmax():
    y = torch.zeros(4, 5, dtype=torch.float64)
    s, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    temp = 4.0
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    w = (0.5 * p - q).abs()
    expected = temp**2 * (w * p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(ref.mbd_loss(s, t, y, form="paper"), expected)
    expected = temp**2 * (w * (p * (p.log() - q.log()) - p + q)).sum(-1).mean()
    torch.testing.assert_close(ref.mbd_loss(s, t, y, form="divergence"), expected)


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_mbd_divergence_has_zero_gradient_at_the_teacher(weight_grad, scale):
    """SPEC 2: the divergence form is minimal at student == teacher (gradient exactly 0 up to float64 rounding),
    on random rows including rows without a positive and rows where every class is positive; the paper form is
    not (its gradient there is the documented cause of the self-distillation collapse)."""
    torch.manual_seed(int(scale) + 7 * weight_grad)
    y = _random_targets(12, 11)
    s = (torch.randn(12, 11, dtype=torch.float64) * scale).requires_grad_()
    (grad,) = torch.autograd.grad(ref.mbd_loss(s, s.detach(), y, weight_grad=weight_grad, form="divergence"), s)
    assert grad.abs().max().item() < 1e-15
    (grad_paper,) = torch.autograd.grad(ref.mbd_loss(s, s.detach(), y, weight_grad=weight_grad, form="paper"), s)
    assert grad_paper[2:].abs().max().item() > 1e-3


@pytest.mark.parametrize("weight_grad", [False, True])
def test_mbd_divergence_is_nonnegative_and_zero_only_at_the_teacher(weight_grad):
    torch.manual_seed(3)
    y = _random_targets(64, 13)
    for scale in (0.1, 1.0, 30.0):
        s = torch.randn(64, 13, dtype=torch.float64) * scale
        t = torch.randn(64, 13, dtype=torch.float64) * scale
        per_row = ref.mbd_loss(s, t, y, weight_grad=weight_grad, form="divergence", reduction="none")
        assert (per_row >= -1e-15).all()
        assert (per_row[2:] > 0).all()  # rows with both kinds of labels differ from their teacher
        assert ref.mbd_loss(t, t, y, weight_grad=weight_grad, reduction="none").abs().max().item() < 1e-14
    paper = ref.mbd_loss(torch.randn(64, 13, dtype=torch.float64), torch.randn(64, 13, dtype=torch.float64), y,
                         form="paper", reduction="none")
    assert (paper < 0).any()  # the paper form is no divergence (SPEC 2)


def test_mbd_rejects_unknown_form():
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="form must be"):
        ref.mbd_loss(x, x, torch.zeros(2, 3), form="kl")


def test_match_logit_scale_takes_the_student_spread():
    torch.manual_seed(5)
    z = torch.randn(6, 9, dtype=torch.float64) * 3 + 2
    q = torch.randn(6, 9, dtype=torch.float64) * 0.5 - 1
    m = ref.match_logit_scale(z, q)
    torch.testing.assert_close(m.mean(-1), z.mean(-1))  # keeps the teacher's row mean
    torch.testing.assert_close(m.std(-1, correction=0), q.std(-1, correction=0))  # takes the student's spread
    torch.testing.assert_close((m - m.mean(-1, keepdim=True)) / m.std(-1, keepdim=True),
                               (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True))  # same shape
    const = torch.full((2, 5), 4.0, dtype=torch.float64)  # std 0: unchanged (the floor avoids 0/0)
    torch.testing.assert_close(ref.match_logit_scale(const, q[:2, :5]), const)
    zg = z.clone().requires_grad_()
    assert not ref.match_logit_scale(zg, q).requires_grad


@pytest.mark.parametrize("form", FORMS)
def test_mbd_matches_analytic_gradient_from_spec(form):
    """SPEC 2's closed-form student gradient (weights constant) equals autograd, for both forms."""
    b, c, temp = 5, 8, 4.0
    y = _random_targets(b, c)
    y[0, 0] = 1  # keep every row "mixed" except the all-positive one
    s = torch.randn(b, c, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, c, dtype=torch.float64)
    loss = ref.mbd_loss(s, t, y, temperature=temp, form=form)
    (auto,) = torch.autograd.grad(loss, s)
    x = s.detach() / temp
    lp = ref.log_reformulated_softmax(t / temp, y)
    lq = ref.log_reformulated_softmax(x, y)
    p, q = lp.exp(), lq.exp()
    pos = y > 0.5
    gap = torch.where(pos, 0.5 + 0.5 * p - q, 0.5 * p - q).abs()
    w = torch.where(pos, gap**0.25, gap)
    g = w * (q - p) if form == "divergence" else -w * p
    for i in range(b):
        if pos[i].all():
            assert torch.equal(auto[i], torch.zeros(c, dtype=torch.float64))
            continue
        m, n = pos[i], ~pos[i]
        lam = torch.logsumexp(x[i][n], 0)
        sig = torch.sigmoid(x[i][m] - lam)
        big_l = torch.logaddexp(x[i][m], lam)
        rho = torch.softmax(-big_l, 0)
        pi = torch.softmax(x[i][n], 0)
        gn = g[i][n].sum()
        dlam = -(g[i][m] * (1 - sig)).sum() - gn * (rho * (1 - sig)).sum()
        dx = torch.zeros(c, dtype=torch.float64)
        dx[m] = g[i][m] * (1 - sig) - gn * rho * sig
        dx[n] = g[i][n] + dlam * pi
        torch.testing.assert_close(auto[i], dx / temp * temp**2 / b, rtol=1e-9, atol=1e-12)


def test_relation_invariances():
    r = torch.randn(4, 3, 7, dtype=torch.float64)
    o = torch.randn(4, 3, 7, dtype=torch.float64)
    base = ref.relation_loss(r, o)
    torch.testing.assert_close(ref.relation_loss(3.7 * r, 3.7 * o), base, rtol=1e-9, atol=1e-12)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(ref.relation_loss(r[:, perm], o[:, perm]), base, rtol=1e-12, atol=1e-14)
    assert ref.relation_loss(o, o).abs().item() < 1e-12


def test_relation_identical_rows_finite_and_degenerate_terms():
    r = torch.ones(3, 4, 5, dtype=torch.float64, requires_grad=True)
    o = torch.randn(3, 4, 5, dtype=torch.float64)
    loss = ref.relation_loss(r, o)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(r.grad).all()
    one_crop = torch.randn(3, 1, 5, dtype=torch.float64)
    one_image = torch.randn(1, 4, 5, dtype=torch.float64)
    # S=1: only the batch term remains; B=1: only the patch term remains.
    db = F.huber_loss(*(ref._normalised(ref.pairwise_distances(a.mean(1)), 6) for a in (one_crop, one_crop * 2)))
    torch.testing.assert_close(ref.relation_loss(one_crop, one_crop * 2), db)
    assert ref.relation_loss(one_image, one_image).item() == 0.0
    assert ref.relation_loss(torch.randn(1, 1, 5), torch.randn(1, 1, 5)).item() == 0.0


def test_pseudo_labels_counts():
    o = torch.randn(3, 4, 6, dtype=torch.float64)
    q = torch.randn(3, 6, dtype=torch.float64)
    n = o.numel()
    for k in (0, 1, 5, 30, n // 2, n - 3, n, n + 10):
        u = ref.pseudo_labels(o, q, k)
        assert u.dtype == torch.int8 and u.shape == o.shape
        kk = min(k, n)
        assert int((u == 1).sum()) == kk
        assert int((u == -1).sum()) == min(kk, n - kk)
        delta = (o - q[:, None]).flatten()
        if 0 < kk < n:
            assert delta[u.flatten() == 1].min() > delta[u.flatten() != 1].max()
        if 0 < min(kk, n - kk):
            assert delta[u.flatten() == -1].max() < delta[u.flatten() == 0].min() if (u == 0).any() else True
    k_tensor = torch.tensor(7)
    assert torch.equal(ref.pseudo_labels(o, q, k_tensor), ref.pseudo_labels(o, q, 7))


def test_propagate_zero_layers_and_reconstruction_bounds():
    o = torch.randn(4, 5, 9, dtype=torch.float64)
    u = torch.randn(4, 5, 9, dtype=torch.float64)
    assert torch.equal(ref.propagate(o, u, layers=0), u)
    y = _random_targets(4, 9)
    q = torch.randn(4, 9, dtype=torch.float64)
    for layers in (0, 1, 2, 5):
        z = ref.reconstruct_logits(o, q, y, layers=layers)
        assert z.shape == (4, 9)
        assert (z >= o.amin(1) - 1e-12).all() and (z <= o.amax(1) + 1e-12).all()


def test_adjacency_zero_when_crops_identical():
    o = torch.ones(2, 3, 4, dtype=torch.float64)
    a = ref.crop_adjacency(o)
    torch.testing.assert_close(a, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    z = ref.reconstruct_logits(o, torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4))
    torch.testing.assert_close(z, torch.ones(2, 4, dtype=torch.float64))


def test_crop_resize_reference_is_roi_align():
    from torchvision.ops import roi_align

    images = torch.randint(0, 256, (2, 3, 13, 17), dtype=torch.uint8)
    boxes = torch.rand(2, 3, 4) * 12
    boxes[..., 2:] += boxes[..., :2]
    out = ref.crop_resize(images, boxes, (7, 5), out_dtype=torch.bfloat16, channels_last=True,
                          mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 8.0])
    rois = torch.cat([torch.arange(2).repeat_interleave(3)[:, None].float(), boxes.view(-1, 4)], 1)
    expected = roi_align(images.float(), rois, (7, 5), 1.0, sampling_ratio=1, aligned=True)
    mean, std = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1), torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    expected = (expected - mean) / std
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), expected.bfloat16().float())
    assert math.isclose(ref.crop_resize(images, boxes, 4).float().mean().item(),
                        roi_align(images.float(), rois, (4, 4), 1.0, 1, True).mean().item(), rel_tol=1e-6)
