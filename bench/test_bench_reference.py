"""Reference losses, forward + backward: eager vs torch.compile, at the two training shapes.

Group ``reference-<op>-B<B>-S<S>-C<C>-<device>``; the eager entry is the baseline.
"""

import pytest
import torch

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


def _mbd_step(q, t, y, r, o):
    (g,) = torch.autograd.grad(ref.mbd_loss(q, t, y), q)
    return g


def _relation_step(q, t, y, r, o):
    (g,) = torch.autograd.grad(ref.relation_loss(r, o), r)
    return g


def _graph_step(q, t, y, r, o):
    return ref.reconstruct_logits(o, q.detach(), y)


def _mskd_terms_step(q, t, y, r, o):
    z = ref.reconstruct_logits(o, q.detach(), y)
    loss = ref.relation_loss(r, o) + ref.mbd_loss(q, z, y) + ref.mbd_loss(q, t, y)
    return torch.autograd.grad(loss, (q, r))


OPS = {"mbd": _mbd_step, "relation": _relation_step, "graph": _graph_step, "mskd_terms": _mskd_terms_step}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-C{}".format(*s))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_reference_fwd_bwd(benchmark, bench_run, device, shape, op, impl):
    b, s, c = shape
    benchmark.group = f"reference-{op}-B{b}-S{s}-C{c}-{device.type}"
    fn = OPS[op]
    if impl == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(fn)
    args = _make(b, s, c, device)
    out = bench_run(benchmark, fn, *args, device=device, impl=impl, baseline=impl == "eager")
    flat = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(x).all() for x in flat)
