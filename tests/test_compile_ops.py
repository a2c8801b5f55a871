"""``torch.compile(fullgraph=True)`` of the public ops (MBD, relation, reconstruction) equals eager.

- CPU tensors, ``backend="auto"``: the ops dispatch to the PyTorch reference at trace time.
- CPU tensors, ``backend="triton"`` under the Triton interpreter: the kernels are opaque custom ops
  there (see ``kernels/_utils.register_op``), so this checks their fake (shape) functions and
  autograd registration inside a compiled graph.
- CUDA tensors (``cuda`` marker): the Triton ops, decomposed into their kernels by Inductor.
"""

import os

import pytest
import torch
from _kernel_utils import DEVICE, assert_close_scaled, cuda_only, fp32_rtol, ignore_interpreter_nan_warnings

from mskd_fast import ops

pytestmark = ignore_interpreter_nan_warnings


def _objective(q, r, o, q_prev, y, backend):
    """A training-style combination: R-SD on reconstructed logits, L-SD, S-SD, then more ops."""
    z = ops.reconstruct_logits(o, q, y, layers=2, backend=backend)
    rsd = ops.mbd_loss(q, z, y, backend=backend)
    lsd = ops.relation_loss(r, o, backend=backend)
    ssd = ops.mbd_loss(q, q_prev, y, reduction="none", backend=backend)
    total = 2.0 * rsd + 1.5 * lsd + (ssd * torch.linspace(0.5, 2.0, q.shape[0], device=q.device)).sum()
    return torch.log1p(total.exp()), z


def _inputs(b, s, c, device):
    q = torch.randn(b, c, device=device) * 2
    r = torch.randn(b, s, c, device=device) * 2
    o = torch.randn(b, s, c, device=device) * 2
    q_prev = q + 0.1 * torch.randn_like(q)
    y = (torch.rand(b, c, device=device) < 0.2).float()
    y[0] = 0
    y[1] = 1
    return q, r, o, q_prev, y


def _value_and_grads(fn, q, r, o, q_prev, y, backend):
    q = q.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_()
    loss, z = fn(q, r, o, q_prev, y, backend)
    grad_q, grad_r = torch.autograd.grad(loss, (q, r))
    return loss, z, grad_q, grad_r


def _check_compiled_equals_eager(inputs, backend, rtol):
    """Compiled forward and backward equal eager; returns the eager results."""
    torch._dynamo.reset()
    eager = _value_and_grads(_objective, *inputs, backend)
    compiled = _value_and_grads(torch.compile(_objective, fullgraph=True), *inputs, backend)
    for name, got, want in zip(("loss", "z", "grad_q", "grad_r"), compiled, eager):
        assert_close_scaled(got, want, rtol, name)
    return eager


def _check_equals_reference(results, inputs, rtol):
    reference = _value_and_grads(_objective, *inputs, "reference")
    for name, got, want in zip(("loss", "z", "grad_q", "grad_r"), results, reference):
        assert_close_scaled(got, want, rtol, name)


@pytest.mark.slow
def test_compiled_reference_path_cpu():
    _check_compiled_equals_eager(_inputs(6, 4, 20, "cpu"), "auto", 1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="runs the Triton kernels on CPU tensors, which needs the interpreter (TRITON_INTERPRET=1, set without CUDA)",
)
def test_compiled_triton_ops_under_interpreter():
    inputs = _inputs(6, 4, 20, "cpu")
    _check_equals_reference(_check_compiled_equals_eager(inputs, "triton", 1e-5), inputs, 1e-4)


@cuda_only[0]
@cuda_only[1]
@pytest.mark.parametrize("b,s,c", [(64, 4, 20), (128, 4, 80)])
def test_compiled_triton_path_cuda(b, s, c):
    inputs = _inputs(b, s, c, DEVICE)
    _check_equals_reference(_check_compiled_equals_eager(inputs, "auto", fp32_rtol(1e-5)), inputs, fp32_rtol(1e-4))
