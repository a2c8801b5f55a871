"""The timed unit of the loss benchmarks: a (possibly compiled) forward, then its backward outside it."""

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
