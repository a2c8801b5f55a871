"""The comparison methods' losses (mskd_fast.methods) against hand-written float64 formulas on small inputs.

Each reference below is written from the formula in docs/METHODS.md with plain elementwise math (no helper of the
package), so a wrong sign, temperature, mask or reduction in the implementation fails. Edge cases: rows with no
positive, all-positive rows, C = 1, B = 1; gradcheck in float64 where the loss is differentiable.
"""

import math

import pytest
import torch

from mskd_fast.methods import ddgsd_loss, dlb_loss, mulsupcon_loss, pskd_alpha, pskd_loss, tfkd_loss, uskd_loss
from mskd_fast.methods._common import bernoulli_kl
from mskd_fast.methods.uskd import zipf_targets

D = torch.float64
SHAPES = [(5, 7), (1, 4), (3, 1), (1, 1)]


def _inputs(b, c, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=D) * scale
    y = (torch.rand(b, c, generator=g) < 0.4).to(D)
    if b >= 3:
        y[0] = 0.0  # a row with no positive
        y[1] = 1.0  # an all-positive row
    return z, y


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _bce(z, target):
    s = _sig(z)
    return (-(target * torch.log(s) + (1 - target) * torch.log(1 - s))).mean()


def _bkl(p, q):
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


# ------------------------------------------------------------------------------------------- helpers
def test_bernoulli_kl_equals_its_definition_and_is_zero_on_equal_inputs():
    t, z = torch.randn(4, 6, dtype=D) * 4, torch.randn(4, 6, dtype=D) * 4
    for temperature in (1.0, 3.0):
        expected = _bkl(_sig(t / temperature), _sig(z / temperature))
        torch.testing.assert_close(bernoulli_kl(t, z, temperature), expected, rtol=1e-12, atol=1e-12)
    assert bernoulli_kl(t, t).abs().max() < 1e-12
    assert (bernoulli_kl(t, z) >= 0).all()
    big = torch.tensor([[60.0, -60.0]], dtype=torch.float32)
    assert torch.isfinite(bernoulli_kl(big, -big)).all()  # logsigmoid form: no log(0)


# --------------------------------------------------------------------------------------------- TF-KD
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a,alpha,temperature", [(0.9, 0.1, 20.0), (0.99, 0.5, 1.0), (0.7, 2.0, 4.0)])
def test_tfkd_matches_the_virtual_bernoulli_teacher_formula(shape, a, alpha, temperature):
    z, y = _inputs(*shape, seed=1)
    teacher = torch.where(y == 1, torch.full_like(z, a), torch.full_like(z, 1 - a))
    soft_t = teacher ** (1 / temperature) / (teacher ** (1 / temperature) + (1 - teacher) ** (1 / temperature))
    kd = _bkl(soft_t, _sig(z / temperature)).mean()
    expected = _bce(z, y) + alpha * temperature**2 * kd
    loss, terms = tfkd_loss(z, y, correct_prob=a, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["kd"], kd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["bce"], _bce(z, y), rtol=1e-10, atol=1e-12)


def test_tfkd_gradcheck_and_bad_settings():
    z, y = _inputs(3, 4, seed=2)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tfkd_loss(x, y, alpha=0.3, temperature=2.0)[0], (z,))
    for kwargs, match in (({"correct_prob": 1.0}, "correct_prob"), ({"correct_prob": 0.4}, "correct_prob"),
                          ({"alpha": -1.0}, "alpha"), ({"temperature": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=match):
            tfkd_loss(z, y, **kwargs)


def test_tfkd_kd_term_is_minimal_at_the_teacher_logits():
    y = torch.tensor([[1.0, 0.0, 1.0]], dtype=D)
    at_teacher = (2 * y - 1) * math.log(0.9 / 0.1)
    _, terms = tfkd_loss(at_teacher, y, correct_prob=0.9, temperature=5.0)
    assert terms["kd"].abs() < 1e-12
    _, off = tfkd_loss(at_teacher + 1.0, y, correct_prob=0.9, temperature=5.0)
    assert off["kd"] > 1e-4


# --------------------------------------------------------------------------------------------- PS-KD
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha_t", [0.0, 0.35, 0.8])
def test_pskd_soft_target_bce_matches_the_formula(shape, alpha_t):
    z, y = _inputs(*shape, seed=3)
    prev = torch.rand(shape, dtype=D)
    seen = torch.rand(shape[0]) < 0.6
    prev_used = torch.where(seen.view(-1, 1), prev, y)
    expected = _bce(z, (1 - alpha_t) * y + alpha_t * prev_used)
    loss, terms = pskd_loss(z, y, prev, alpha_t, seen)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["soft_bce"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["bce"], _bce(z, y), rtol=1e-10, atol=1e-12)
    # alpha as a 0-dim tensor (how the method passes it) gives the same
    torch.testing.assert_close(pskd_loss(z, y, prev, torch.tensor(alpha_t, dtype=D), seen)[0], expected)


def test_pskd_unseen_rows_train_on_the_labels_and_gradcheck():
    z, y = _inputs(4, 5, seed=4)
    prev = torch.rand(4, 5, dtype=D)
    unseen = pskd_loss(z, y, prev, 0.8, torch.zeros(4, dtype=torch.bool))[0]
    torch.testing.assert_close(unseen, _bce(z, y), rtol=1e-10, atol=1e-12)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pskd_loss(x, y, prev, 0.5)[0], (z,))
    with pytest.raises(ValueError, match="previous"):
        pskd_loss(z, y, prev[:, :3], 0.5)


def test_pskd_alpha_schedule_counts_epochs_from_one():
    assert pskd_alpha(0, 10, 0.8) == pytest.approx(0.08)
    assert pskd_alpha(9, 10, 0.8) == pytest.approx(0.8)
    assert pskd_alpha(12, 10, 0.8) == pytest.approx(0.8)  # epochs extended at resume: stays at alpha_T
    with pytest.raises(ValueError, match="alpha_T"):
        pskd_alpha(0, 10, 1.5)


# ----------------------------------------------------------------------------------------------- DLB
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,temperature", [(1.0, 3.0), (0.5, 1.0)])
def test_dlb_matches_the_formula(shape, alpha, temperature):
    z, y = _inputs(*shape, seed=5)
    half = max(1, shape[0] // 2)
    carried = torch.randn(half, shape[1], dtype=D) * 2
    stored = torch.randn(half, shape[1], dtype=D) * 2
    kd = _bkl(_sig(stored / temperature), _sig(carried / temperature)).mean()
    loss, terms = dlb_loss(z, y, carried, stored, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(loss, _bce(z, y) + alpha * temperature**2 * kd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["kd"], kd, rtol=1e-10, atol=1e-12)
    masked, masked_terms = dlb_loss(z, y, carried, stored, alpha=alpha, temperature=temperature, valid=0.0)
    torch.testing.assert_close(masked, _bce(z, y), rtol=1e-10, atol=1e-12)
    first, first_terms = dlb_loss(z, y, None, None)
    assert first_terms["kd"] == 0 and torch.allclose(first, _bce(z, y))


def test_dlb_target_is_detached_and_gradcheck():
    z, y = _inputs(4, 3, seed=6)
    carried = torch.randn(2, 3, dtype=D, requires_grad=True)
    stored = torch.randn(2, 3, dtype=D, requires_grad=True)
    dlb_loss(z, y, carried, stored)[0].backward()
    assert stored.grad is None and carried.grad is not None
    leaf = carried.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: dlb_loss(z, y, c, stored.detach())[0], (leaf,))
    with pytest.raises(ValueError, match="same shape"):
        dlb_loss(z, y, carried, stored[:1])


# --------------------------------------------------------------------------------------------- DDGSD
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kl_weight,temperature,mmd_weight", [(1.0, 4.0, 5e-4), (0.1, 1.0, 2.0)])
def test_ddgsd_matches_the_formula(shape, kl_weight, temperature, mmd_weight):
    z1, y = _inputs(*shape, seed=7)
    z2 = z1 + torch.randn(shape, dtype=D)
    f1, f2 = torch.randn(shape[0], 5, dtype=D), torch.randn(shape[0], 5, dtype=D)
    s1, s2 = _sig(z1 / temperature), _sig(z2 / temperature)
    kl = _bkl(s2, s1).mean() + _bkl(s1, s2).mean()
    mmd = sum((f1[:, d].mean() - f2[:, d].mean()) ** 2 for d in range(5))
    expected = _bce(z1, y) + _bce(z2, y) + kl_weight * kl + mmd_weight * mmd
    loss, terms = ddgsd_loss(z1, z2, f1, f2, y, kl_weight=kl_weight, temperature=temperature, mmd_weight=mmd_weight)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for key, value in (("bce", _bce(z1, y)), ("bce2", _bce(z2, y)), ("kl", kl), ("mmd", mmd)):
        torch.testing.assert_close(terms[key], value, rtol=1e-10, atol=1e-12)


def test_ddgsd_each_view_is_pulled_towards_the_detached_other_and_gradcheck():
    z1, y = _inputs(4, 3, seed=8)
    z2 = torch.randn(4, 3, dtype=D)
    f1, f2 = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ddgsd_loss(a, b, f1, f2, y, kl_weight=1.0, mmd_weight=0.0)[0].backward()
    a_ref, b_ref = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    s1, s2 = _sig(a_ref / 4), _sig(b_ref / 4)
    ref = (_bce(a_ref, y) + _bce(b_ref, y) + _bkl(s2.detach(), s1).mean() + _bkl(s1.detach(), s2).mean())
    ref.backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-10, atol=1e-12)
    feats = (f1.clone().requires_grad_(), f2.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda p, q: ddgsd_loss(z1, z2, p, q, y, mmd_weight=0.3)[0], feats)
    with pytest.raises(ValueError, match="equal shapes"):
        ddgsd_loss(z1, z2[:2], f1, f2, y)


# ---------------------------------------------------------------------------------------------- USKD
def _uskd_reference(z, w, y, alpha, beta, mu):
    b, c = z.shape
    s = _sig(z)
    positives = [(i, k) for i in range(b) for k in range(c) if y[i, k] == 1]
    mean_s2 = sum(s[i, k] ** 2 for i, k in positives) / max(len(positives), 1)
    pos_rows, non_rows = [], []
    for i in range(b):
        pos_rows.append(sum(-(s[i, k] ** 2 + 1 - mean_s2) * torch.log(s[i, k]) for k in range(c) if y[i, k] == 1)
                        if any(y[i] == 1) else torch.zeros((), dtype=D))
        negs = [k for k in range(c) if y[i, k] == 0]
        if not negs:
            non_rows.append(torch.zeros((), dtype=D))
            continue
        ez, ew = torch.exp(z[i, negs]), torch.exp(w[i, negs])
        score = ez / ez.sum() + ew / ew.sum()
        order = sorted(range(len(negs)), key=lambda j: -float(score[j]))
        rank = {negs[j]: r + 1 for r, j in enumerate(order)}
        norm = sum(1.0 / rank[k] for k in negs)
        log_soft = z[i, negs] - torch.logsumexp(z[i, negs], dim=0)
        non_rows.append(sum(-(1.0 / rank[k]) / norm * log_soft[j] for j, k in enumerate(negs)))
    pos = torch.stack(pos_rows).mean() / c
    non = torch.stack(non_rows).mean() / c
    aux = _bce(w, 0.9 * y + 0.05)
    bce = _bce(z, y)
    return bce + alpha * pos + beta * non + mu * aux, {"bce": bce, "pos": pos, "non": non, "aux": aux}


@pytest.mark.parametrize("shape", [(5, 7), (1, 4), (3, 1), (1, 1), (4, 2)])
@pytest.mark.parametrize("alpha,beta,mu", [(1.0, 0.1, 0.005), (0.1, 0.1, 0.1)])
def test_uskd_matches_a_loop_reference(shape, alpha, beta, mu):
    z, y = _inputs(*shape, seed=9)
    w = torch.randn(shape, dtype=D) * 2
    expected, expected_terms = _uskd_reference(z, w, y, alpha, beta, mu)
    loss, terms = uskd_loss(z, w, y, alpha=alpha, beta=beta, mu=mu)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for key, value in expected_terms.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_uskd_zipf_ranks_negatives_by_both_heads_and_targets_are_detached():
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=D)
    z = torch.tensor([[2.0, 3.0, 0.0, -1.0]], dtype=D)
    w = torch.tensor([[0.0, -5.0, 4.0, -2.0]], dtype=D)  # class 2 first by the aux head, class 1 by the final head
    zipf = zipf_targets(z, w, y == 0)
    ez, ew = torch.exp(z[0, 1:]), torch.exp(w[0, 1:])
    score = ez / ez.sum() + ew / ew.sum()
    ranks = torch.empty(3, dtype=D)
    ranks[torch.argsort(score, descending=True)] = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    expected = (1 / ranks) / (1 / ranks).sum()
    torch.testing.assert_close(zipf[0, 1:], expected)
    assert zipf[0, 0] == 0
    zl, wl = z.clone().requires_grad_(), w.clone().requires_grad_()
    _, terms = uskd_loss(zl, wl, y)
    (terms["pos"] + terms["non"]).backward()
    assert wl.grad is None or wl.grad.abs().max() == 0  # the aux head only learns from its own BCE
    assert torch.autograd.gradcheck(lambda a, b: uskd_loss(a, b, y)[0], (zl.detach().requires_grad_(),
                                                                       wl.detach().requires_grad_()))


def test_uskd_is_finite_for_rows_without_negatives_or_positives():
    y = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    z = torch.randn(2, 3, requires_grad=True)
    loss, terms = uskd_loss(z, torch.randn(2, 3), y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------- MulSupCon
def _mulsupcon_reference(q, qy, k, ky, tau, valid):
    losses = []
    for i in range(q.shape[0]):
        keys = [a for a in range(k.shape[0]) if valid[a]]
        logits = torch.stack([q[i] @ k[a] / tau for a in keys])
        log_den = torch.logsumexp(logits, dim=0)
        for j in range(qy.shape[1]):
            if qy[i, j] != 1:
                continue
            pos = [n for n, a in enumerate(keys) if ky[a, j] == 1]
            if pos:
                losses.append(-sum(logits[n] - log_den for n in pos) / len(pos))
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=D)


@pytest.mark.parametrize("b,c,keys,tau", [(4, 5, 9, 0.1), (1, 3, 4, 0.5), (3, 1, 6, 0.2)])
def test_mulsupcon_matches_the_anchor_loop(b, c, keys, tau):
    g = torch.Generator().manual_seed(10)
    q = torch.nn.functional.normalize(torch.randn(b, 8, generator=g, dtype=D), dim=1)
    k = torch.nn.functional.normalize(torch.randn(keys, 8, generator=g, dtype=D), dim=1)
    qy = (torch.rand(b, c, generator=g) < 0.5).to(D)
    ky = (torch.rand(keys, c, generator=g) < 0.5).to(D)
    qy[0, 0] = ky[0, 0] = 1.0
    valid = torch.rand(keys, generator=g) < 0.7
    valid[0] = True
    for key_valid in (None, valid):
        v = torch.ones(keys, dtype=torch.bool) if key_valid is None else key_valid
        expected = _mulsupcon_reference(q, qy, k, ky, tau, v)
        got = mulsupcon_loss(q, qy, k, ky, temperature=tau, key_valid=key_valid)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    qg = q.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mulsupcon_loss(x, qy, k, ky, temperature=tau, key_valid=valid), (qg,))


def test_mulsupcon_without_labels_is_zero_and_shapes_are_checked():
    q = torch.nn.functional.normalize(torch.randn(3, 4, dtype=D), dim=1)
    k = torch.nn.functional.normalize(torch.randn(5, 4, dtype=D), dim=1)
    assert mulsupcon_loss(q, torch.zeros(3, 2, dtype=D), k, torch.ones(5, 2, dtype=D)) == 0
    with pytest.raises(ValueError, match="must agree"):
        mulsupcon_loss(q, torch.zeros(3, 2), k[:, :3], torch.ones(5, 2))
