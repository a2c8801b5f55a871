"""Fused Triton ops vs the PyTorch reference, forward + backward, on a CUDA GPU.

Groups ``losses-<op>-B<B>-S<S>-C<C>-<dtype>`` hold four entries measured in the same run:

- ``eager``: the reference (``mskd_fast.reference``) in eager mode (the baseline),
- ``compiled``: ``torch.compile`` of the same reference step,
- ``fused``: the Triton ops of ``mskd_fast.kernels`` called eagerly,
- ``fused-compiled``: ``torch.compile`` of the step calling the Triton ops (they decompose into
  their kernels, so this shows the Python launch overhead removed).

Shapes: the training shapes (B=64, S=4, C=20) and (B=128, S=4, C=80) for every op, and
(B=4096, C=1000) for MBD. That group also has a ``memory-floor`` entry: a device-to-device copy
moving exactly the bytes the fused MBD forward + backward must move (read student, teacher and
targets, write the stored gradient; backward reads it and writes the input gradient), so
``fused / memory-floor`` is the distance to the bandwidth limit, measured in the same run.
``graph`` (reconstruction) has no backward. All entries skip without a GPU; the CPU reference
timings are in ``bench/test_bench_reference.py``.
"""

import pytest
import torch

from mskd_fast import reference as ref

SHAPES = [(64, 4, 20), (128, 4, 80)]
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


def _mbd_step(lib):
    def step(q, t, y, r, o):
        (g,) = torch.autograd.grad(lib.mbd_loss(q, t, y), q)
        return g

    return step


def _relation_step(lib):
    def step(q, t, y, r, o):
        (g,) = torch.autograd.grad(lib.relation_loss(r, o), r)
        return g

    return step


def _graph_step(lib):
    def step(q, t, y, r, o):
        return lib.reconstruct_logits(o, q.detach(), y)

    return step


OPS = {"mbd": _mbd_step, "relation": _relation_step, "graph": _graph_step}


def _step(op, impl):
    lib = ref if impl in ("eager", "compiled") else _kernels()
    fn = OPS[op](lib)
    if impl.endswith("compiled"):
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True)
    return fn


def _check(out):
    flat = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(x).all() for x in flat)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-C{}".format(*s))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl", IMPLS)
def test_losses_training_shapes(benchmark, bench_run, cuda_device, shape, op, impl):
    b, s, c = shape
    benchmark.group = f"losses-{op}-B{b}-S{s}-C{c}-float32"
    out = bench_run(benchmark, _step(op, impl), *_make(b, s, c, cuda_device), device=cuda_device, impl=impl,
                    baseline=impl == "eager")
    _check(out)


def _mbd_bytes(b, c, dtype) -> int:
    """Bytes the fused MBD forward + backward must move for a ``(b, c)`` problem (float32 targets)."""
    elem = torch.empty((), dtype=dtype).element_size()
    forward = b * c * (2 * elem + 4) + b * c * elem  # read student, teacher, targets; write gradient
    backward = 2 * b * c * elem  # read the stored gradient, write the input gradient
    return forward + backward


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS + ["memory-floor"])
def test_mbd_large(benchmark, bench_run, cuda_device, dtype, impl):
    b, c = 4096, 1000
    nbytes = _mbd_bytes(b, c, dtype)
    benchmark.group = f"losses-mbd-B{b}-C{c}-{str(dtype).removeprefix('torch.')}"
    if impl == "memory-floor":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=cuda_device)
        dst = torch.empty_like(src)
        bench_run(benchmark, dst.copy_, src, device=cuda_device, impl=impl, bytes_moved=nbytes)
        return
    out = bench_run(benchmark, _step("mbd", impl), *_make(b, 1, c, cuda_device, dtype), device=cuda_device,
                    impl=impl, baseline=impl == "eager", bytes_moved=nbytes)
    _check(out)
