"""The comparison methods' losses (mskd_fast.methods) against hand-written float64 formulas on small inputs.

Each reference below is written from the formula in docs/METHODS.md with plain elementwise math (no helper of the
package), so a wrong sign, temperature, mask or reduction in the implementation fails. Edge cases: rows with no
positive, all-positive rows, C = 1, B = 1; gradcheck in float64 where the loss is differentiable.
"""

import math

import pytest
import torch

from mskd_fast.methods import dlb_loss, pskd_alpha, pskd_loss, tfkd_loss
from mskd_fast.methods._common import bernoulli_kl

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
