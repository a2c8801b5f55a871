"""The loss benchmarks' shared pieces: each op's forward, and the timed unit (a possibly compiled forward, then its
backward outside it)."""

from __future__ import annotations

import torch


def forward_backward(forward, grad_of: tuple[int, ...] | None):
    """``step(*args)``: ``out = forward(*args)``, then ``torch.autograd.grad(out, args[i] for i in grad_of)``.

    ``forward`` may be ``torch.compile(fn, fullgraph=True)``: ``autograd.grad`` stays outside the compiled region
    (dynamo refuses it inside), and the compiled forward's backward is AOTAutograd's compiled graph. Returns the
    tuple of gradients, or ``out`` itself when ``grad_of`` is ``None`` (forward-only ops).
    """
    def step(*args):
        out = forward(*args)
        if grad_of is None:
            return out
        return torch.autograd.grad(out, [args[i] for i in grad_of])

    return step


# The argument (of ``q, t, y, r, o``) each op's loss is differentiated by; ``graph`` has no backward.
GRAD_OF = {"mbd": (0,), "relation": (3,)}


def loss_forwards(lib) -> dict:
    """``{op: forward(q, t, y, r, o)}`` for ``mbd``, ``relation`` and ``graph`` on ``lib`` (``mskd_fast.reference``
    or ``mskd_fast.kernels``, which share these signatures)."""

    def mbd(q, t, y, r, o):
        return lib.mbd_loss(q, t, y)

    def relation(q, t, y, r, o):
        return lib.relation_loss(r, o)

    def graph(q, t, y, r, o):
        return lib.reconstruct_logits(o, q.detach(), y)

    return {"mbd": mbd, "relation": relation, "graph": graph}
