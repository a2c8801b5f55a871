"""The compiled baselines of ``bench/`` compile as one fullgraph forward, with the backward outside.

``bench/test_bench_losses.py`` and ``bench/test_bench_reference.py`` time ``torch.compile(forward,
fullgraph=True)`` against eager and fused entries. A graph break there would make the "compiled" rows measure a
partly eager function, and ``torch.autograd.grad`` inside the compiled region is refused by dynamo. This runs
each compiled forward on tiny CPU tensors, checks that dynamo made exactly one graph with no graph break, that
the backward outside it works, and that values and gradients equal eager.
"""

import sys
from pathlib import Path

import pytest
import torch
from _kernel_utils import ignore_interpreter_nan_warnings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import test_bench_losses as bench_losses  # noqa: E402
import test_bench_reference as bench_reference  # noqa: E402

pytestmark = ignore_interpreter_nan_warnings

CASES = [("losses", op, impl) for op in bench_losses.OPS for impl in ("compiled", "fused-compiled")]
CASES += [("reference", op, "compiled") for op in bench_reference.OPS]
MODULES = {"losses": bench_losses, "reference": bench_reference}


def _inputs(module):
    q, t, y, r, o = module._make(6, 3, 5, torch.device("cpu"))
    y[0] = 0
    y[1] = 1
    return q, t, y, r, o


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_compiled_baseline_is_one_fullgraph_forward(case):
    name, op, impl = case
    module = MODULES[name]
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    args = _inputs(module)
    compiled = module.forward_fn(op, impl)
    got = compiled(*args)
    assert counters["stats"]["unique_graphs"] == 1, f"{name}/{op}/{impl}: {dict(counters['stats'])}"
    assert not counters["graph_break"], f"{name}/{op}/{impl} graph-breaks: {dict(counters['graph_break'])}"
    eager_impl = "eager" if impl == "compiled" else "fused"
    want = module.forward_fn(op, eager_impl)(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the benchmark's full step: compiled forward, autograd.grad outside
    step_got = module._step(op, impl)(*args)
    step_want = module._step(op, eager_impl)(*args)
    torch.testing.assert_close(step_got, step_want, rtol=1e-4, atol=1e-5)
    if got.requires_grad:
        flat = step_got if isinstance(step_got, tuple) else (step_got,)
        assert all(g.abs().sum() > 0 for g in flat), "the backward produced an all-zero gradient"
