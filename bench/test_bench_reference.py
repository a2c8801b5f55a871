"""Reference losses, forward + backward: eager vs torch.compile, at the two training shapes.

Group ``reference-<op>-B<B>-S<S>-C<C>-<device>``; the eager entry is the baseline. ``compiled`` is
``torch.compile(forward, fullgraph=True)`` (a graph break is an error, so the entry measures one compiled
graph); the backward runs outside it with ``torch.autograd.grad`` (AOTAutograd's compiled backward).
"""

import pytest
import torch
from _fwd_bwd import GRAD_OF as LOSS_GRAD_OF
from _fwd_bwd import forward_backward, loss_forwards

from mskd_fast import reference as ref

SHAPES = [(64, 4, 20), (128, 4, 80)]


def _make(b, s, c, device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, c, generator=gen).to(device).requires_grad_()
    t = torch.randn(b, c, generator=gen).to(device)
    y = (torch.rand(b, c, generator=gen) < 0.15).float().to(device)
    r = torch.randn(b, s, c, generator=gen).to(device).requires_grad_()
    o = torch.randn(b, s, c, generator=gen).to(device)
    return q, t, y, r, o


def _mskd_terms_forward(q, t, y, r, o):
    z = ref.reconstruct_logits(o, q.detach(), y)
    return ref.relation_loss(r, o) + ref.mbd_loss(q, z, y) + ref.mbd_loss(q, t, y)


OPS = {**loss_forwards(ref), "mskd_terms": _mskd_terms_forward}
GRAD_OF = {**LOSS_GRAD_OF, "mskd_terms": (0, 3)}  # differentiated arguments (graph: none)


def forward_fn(op, impl):
    """The reference forward of ``op``; ``compiled`` is ``torch.compile(forward, fullgraph=True)``."""
    fn = OPS[op]
    return torch.compile(fn, fullgraph=True) if impl == "compiled" else fn


def _step(op, impl):
    """Forward (compiled or not), then the backward by ``autograd.grad`` outside the compiled region."""
    torch._dynamo.reset()
    return forward_backward(forward_fn(op, impl), GRAD_OF.get(op))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-C{}".format(*s))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_reference_fwd_bwd(benchmark, bench_run, device, shape, op, impl):
    b, s, c = shape
    benchmark.group = f"reference-{op}-B{b}-S{s}-C{c}-{device.type}"
    args = _make(b, s, c, device)
    out = bench_run(benchmark, _step(op, impl), *args, device=device, impl=impl, baseline=impl == "eager")
    flat = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(x).all() for x in flat)
