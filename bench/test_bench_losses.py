"""Fused Triton ops vs the PyTorch reference, forward + backward (CUDA; CPU twins under the Triton interpreter).

Groups ``losses-<op>-B<B>-S<S>-C<C>-<dtype>-<device>`` hold four entries measured in the same run:

- ``eager``: the reference (``mskd_fast.reference``) in eager mode (the baseline),
- ``compiled``: ``torch.compile(forward, fullgraph=True)`` of the same reference forward, the backward run
  outside it by ``torch.autograd.grad`` (AOTAutograd compiles the backward graph; dynamo cannot trace
  ``autograd.grad`` inside a fullgraph region),
- ``fused``: the Triton ops of ``mskd_fast.kernels`` called eagerly,
- ``fused-compiled``: the same fullgraph compile of the forward calling the Triton ops (they decompose into
  their kernels on CUDA, so this shows the Python launch overhead removed).

Shapes: the training shapes (B=64, S=4, C=20) and (B=128, S=4, C=80) for every op, and
(B=4096, C=1000) for MBD. That group also has a ``memory-floor`` entry: a device-to-device copy
moving exactly the bytes the fused MBD forward + backward must move (read student, teacher and
targets, write the stored gradient; backward reads it and writes the input gradient), so
``fused / memory-floor`` is the distance to the bandwidth limit, measured in the same run.
``graph`` (reconstruction) has no backward. Every entry has a CPU twin (same code on CPU tensors, the fused
entries in the Triton interpreter, where the kernels are opaque custom ops inside compiled graphs) at
(B=64, S=4, C=20) and (B=64, C=1000): CI runs them with ``--benchmark-disable``; their timings mean nothing
(the interpreter), the CPU reference timings are in ``bench/test_bench_reference.py``.
"""

import pytest
import torch
from _fwd_bwd import GRAD_OF, forward_backward, loss_forwards

from mskd_fast import reference as ref

SHAPES = [(64, 4, 20), (128, 4, 80)]
CPU_SHAPES = SHAPES[:1]  # the CPU twins (Triton interpreter for the fused entries) run at the smaller shape
LARGE = {"cuda": (4096, 1000), "cpu": (64, 1000)}
IMPLS = ["eager", "compiled", "fused", "fused-compiled"]


def _kernels():
    from mskd_fast import kernels

    return kernels


def _make(b, s, c, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(b, c, generator=gen) * 2).to(device, dtype).requires_grad_()
    t = (torch.randn(b, c, generator=gen) * 2).to(device, dtype)
    y = (torch.rand(b, c, generator=gen) < 0.15).float().to(device)
    r = (torch.randn(b, s, c, generator=gen) * 2).to(device, dtype).requires_grad_()
    o = (torch.randn(b, s, c, generator=gen) * 2).to(device, dtype)
    return q, t, y, r, o


OPS = ("mbd", "relation", "graph")


def forward_fn(op, impl):
    """The forward of ``op`` for ``impl``; the compiled ones are ``torch.compile(forward, fullgraph=True)``."""
    lib = ref if impl in ("eager", "compiled") else _kernels()
    fn = loss_forwards(lib)[op]
    if impl.endswith("compiled"):
        fn = torch.compile(fn, fullgraph=True)
    return fn


def _step(op, impl):
    """Forward + backward of ``op``: the (possibly compiled) forward, then ``autograd.grad`` outside it (the
    compiled forward's backward is AOTAutograd's compiled graph)."""
    torch._dynamo.reset()
    return forward_backward(forward_fn(op, impl), GRAD_OF.get(op))


def _check(out):
    flat = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(x).all() for x in flat)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-C{}".format(*s))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_losses_training_shapes(benchmark, bench_run, device, shape, op, impl):
    if device.type == "cpu" and shape not in CPU_SHAPES:
        pytest.skip("CPU twin runs at the smaller training shape only")
    b, s, c = shape
    benchmark.group = f"losses-{op}-B{b}-S{s}-C{c}-float32-{device.type}"
    out = bench_run(benchmark, _step(op, impl), *_make(b, s, c, device), device=device, impl=impl,
                    baseline=impl == "eager")
    _check(out)


def _mbd_bytes(b, c, dtype) -> int:
    """Bytes the fused MBD forward + backward must move for a ``(b, c)`` problem (float32 targets)."""
    elem = torch.empty((), dtype=dtype).element_size()
    forward = b * c * (2 * elem + 4) + b * c * elem  # read student, teacher, targets; write gradient
    backward = 2 * b * c * elem  # read the stored gradient, write the input gradient
    return forward + backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS + ["memory-floor"])
def test_mbd_large(benchmark, bench_run, device, dtype, impl):
    b, c = LARGE[device.type]
    nbytes = _mbd_bytes(b, c, dtype)
    benchmark.group = f"losses-mbd-B{b}-C{c}-{str(dtype).removeprefix('torch.')}-{device.type}"
    if impl == "memory-floor":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        bench_run(benchmark, dst.copy_, src, device=device, impl=impl, bytes_moved=nbytes)
        return
    out = bench_run(benchmark, _step("mbd", impl), *_make(b, 1, c, device, dtype), device=device,
                    impl=impl, baseline=impl == "eager", bytes_moved=nbytes)
    _check(out)
