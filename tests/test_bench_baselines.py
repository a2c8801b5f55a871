"""The compiled baselines of ``bench/`` compile as one fullgraph forward, with the backward outside.

``bench/test_bench_losses.py`` and ``bench/test_bench_reference.py`` time ``torch.compile(forward,
fullgraph=True)`` against eager and fused entries. A graph break there would make the "compiled" rows measure a
partly eager function, and ``torch.autograd.grad`` inside the compiled region is refused by dynamo. This runs
each compiled forward on tiny CPU tensors, checks that dynamo made exactly one graph with no graph break, that
the backward outside it works, and that values and gradients equal eager. The ``plain`` entry of
``bench/test_bench_step.py`` (the plain-PyTorch MSKD step, compiled ``fullgraph=True`` on the GPU) is checked the
same way: one graph, and the same objective as ``TrainStep``.
"""

import sys
from pathlib import Path

import pytest
import torch
from _kernel_utils import ignore_interpreter_nan_warnings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import test_bench_losses as bench_losses  # noqa: E402
import test_bench_reference as bench_reference  # noqa: E402
import test_bench_step as bench_step  # noqa: E402

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


def test_plain_step_is_one_graph_with_the_mskd_objective():
    cpu = torch.device("cpu")
    s = bench_step.SETTINGS["cpu"]
    plain, _ = bench_step._make("plain", cpu, s)
    x1, y1 = bench_step._inputs(cpu, s, 1)
    x2, y2 = bench_step._inputs(cpu, s, 2)
    mskd, _ = bench_step._make("mskd", cpu, s)  # same initial weights and box generator
    first_plain, first_mskd = plain(x1, y1), mskd(x1, y1)
    # first step: no S-SD in either, same crops: the same BCE + L-SD + R-SD objective
    assert first_plain["ssd"] == 0 and first_mskd["ssd"] == 0
    torch.testing.assert_close(first_plain["total"], first_mskd["total"], rtol=1e-4, atol=1e-5)
    assert plain(x2, y2)["ssd"] > 0  # S-SD from the previous step's parameters
    boxes = bench_step.sample_boxes(s["batch"], s["crops"], s["size"], s["size"], "random",
                                    torch.Generator().manual_seed(0))
    for with_previous in (False, True):  # the GPU entry compiles forward_loss with fullgraph=True
        explanation = torch._dynamo.explain(plain.forward_loss)(x1, y1, boxes, with_previous)
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
