"""UD-style partial softmax (mskd_fast.methods.partial_softmax), the label-push control of the accuracy study,
against a hand-written float64 formula; its edge rows, its link to SPEC 1's reformulated softmax, and the
``--method ud`` loss module."""

import math

import pytest
import torch
import torch.nn.functional as F

from mskd_fast import reference as ref
from mskd_fast.methods import PartialSoftmaxBCELoss, partial_softmax_loss


def _by_hand(z, y, t):
    rows = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        pos = [j for j, v in enumerate(yi) if v > 0.5]
        neg = [j for j, v in enumerate(yi) if v <= 0.5]
        total = 0.0
        for j in pos:
            num = math.exp(zi[j] / t)
            total += -math.log(num / (num + sum(math.exp(zi[k] / t) for k in neg)))
        rows.append(total / len(pos) if pos else 0.0)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_matches_hand_formula_including_edge_rows(t):
    z = torch.randn(6, 9, dtype=torch.float64) * 3
    y = (torch.rand(6, 9) < 0.3).double()
    y[0] = 0  # no positive: 0
    y[1] = 1  # no negative: every -log(1) = 0
    y[2] = 0
    y[2, 4] = 1  # exactly one positive
    expected = _by_hand(z, y, t)
    torch.testing.assert_close(partial_softmax_loss(z, y, t, reduction="none"), expected)
    torch.testing.assert_close(partial_softmax_loss(z, y, t), expected.mean())
    torch.testing.assert_close(partial_softmax_loss(z, y, t, reduction="sum"), expected.sum())
    assert float(expected[0]) == 0.0 and float(expected[1]) == 0.0


def test_is_the_reformulated_softmax_as_a_target():
    z = torch.randn(5, 8, dtype=torch.float64)
    y = (torch.rand(5, 8) < 0.4).double()
    y[:, 0] = 1
    log_rs = ref.log_reformulated_softmax(z / 4.0, y)
    n = y.sum(1)
    expected = -((log_rs + torch.log(n)[:, None]) * y).sum(1) / n
    torch.testing.assert_close(partial_softmax_loss(z, y, 4.0, reduction="none"), expected)


def test_gradcheck_and_large_logits_stay_finite():
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1, 0, 0, 1, 0, 0], [0] * 6, [1] * 6, [0, 1, 0, 0, 0, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: partial_softmax_loss(x, y, 2.0), (z,))
    big = torch.tensor([[1e4, -1e4, 3.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    yy = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    loss = partial_softmax_loss(big, yy, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    for dtype in (torch.bfloat16, torch.float16):
        assert partial_softmax_loss(big.detach().to(dtype), yy, 4.0).dtype == torch.float32


def test_pushes_positives_above_negatives():
    z = torch.zeros(1, 4, requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    partial_softmax_loss(z, y, 4.0).backward()
    assert (z.grad[0, [0, 2]] < 0).all() and (z.grad[0, [1, 3]] > 0).all()


def test_bad_arguments_name_themselves():
    z, y = torch.randn(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        partial_softmax_loss(z, y, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        partial_softmax_loss(z, y, reduction="max")
    with pytest.raises(ValueError, match="targets"):
        partial_softmax_loss(z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weight"):
        PartialSoftmaxBCELoss(weight=-1.0)


def test_loss_module_is_bce_plus_weighted_term():
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(3, 5) < 0.4).double()
    module = PartialSoftmaxBCELoss(weight=0.25, temperature=2.0)
    total, terms, parts = module(q, None, None, None, y, return_parts=True)
    bce = F.binary_cross_entropy_with_logits(q, y)
    ud = partial_softmax_loss(q, y, 2.0)
    torch.testing.assert_close(total, bce + 0.25 * ud)
    torch.testing.assert_close(parts["ud"], 0.25 * ud)
    assert set(terms) == {"bce", "ud"} and module.diagnostic_terms == ("bce", "ud")
    with pytest.raises(ValueError, match="r, o, q_prev must"):
        module(q, torch.zeros(3, 2, 5), None, None, y)
