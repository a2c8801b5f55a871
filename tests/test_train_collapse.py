"""Collapse guard: the signals on hand-made logits, and through the CLI a collapsing and a healthy run.

The collapsing run is the paper recipe from scratch at a high LR on the tiny synthetic setup: within 2
of its 3 epochs (12 steps) every eval image gets the same top-1 class with logits far above a healthy
run's (measured: max |logit| 23-156 at epoch 2 for seeds 1, 7, 42); vanilla and the stable recipe at the
same LR keep max |logit| below 1.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from train_cli_helpers import summary_rows, tiny_run_argv

from mskd_fast.collapse import SIGNAL_KEYS, advice, bce_rise, collapse_reasons, eval_signals
from mskd_fast.train import main


def test_eval_signals_of_one_class_and_of_spread_logits():
    n, c = 40, 6
    one = torch.randn(n, c) * 0.1
    one[:, 3] += 50.0
    s = eval_signals(one)
    assert s["top1_mode_frac"] == 1.0 and s["top1_classes"] == 1
    assert s["max_abs_logit"] == pytest.approx(float(one.abs().max()))
    assert s["logit_std"] == pytest.approx(float(one.std(dim=1, unbiased=False).mean()), rel=1e-6)
    spread = torch.randn(n, c)
    spread[torch.arange(n), torch.arange(n) % c] += 10.0  # image i's top-1 is class i % C
    s = eval_signals(spread)
    assert s["top1_classes"] == c and s["top1_mode_frac"] == pytest.approx(7 / 40)
    empty = eval_signals(torch.empty(0, c))
    assert empty["top1_classes"] == 0 and math.isnan(empty["top1_mode_frac"])
    with pytest.raises(ValueError, match="shape"):
        eval_signals(torch.zeros(3))


def test_collapse_reasons_need_large_logits_with_one_class():
    # a fresh model gives every image the prior's top-1 class, with small logits: no collapse
    assert collapse_reasons({"top1_mode_frac": 1.0, "max_abs_logit": 0.5, "bce_rise": 0.9}) == []
    assert len(collapse_reasons({"top1_mode_frac": 0.95, "max_abs_logit": 12.0})) == 1
    assert len(collapse_reasons({"top1_mode_frac": 0.2, "max_abs_logit": 80.0})) == 1
    # large logits of a visibly healthy run (BCE at its lowest, top-1 classes spread) are not a collapse ...
    assert collapse_reasons({"top1_mode_frac": 0.14, "max_abs_logit": 32.9, "bce_rise": 0.99}) == []
    # ... but they are once BCE has risen or one class dominates
    assert len(collapse_reasons({"top1_mode_frac": 0.14, "max_abs_logit": 32.9, "bce_rise": 1.2})) == 1
    assert len(collapse_reasons({"top1_mode_frac": 0.6, "max_abs_logit": 32.9, "bce_rise": 0.99})) == 1
    assert len(collapse_reasons({"top1_mode_frac": 1.0, "max_abs_logit": 80.0, "bce_rise": 3.0})) == 3
    assert collapse_reasons({"top1_mode_frac": math.nan, "max_abs_logit": math.nan, "bce_rise": math.nan}) == []
    assert bce_rise(1.2, [0.6, 0.4]) == pytest.approx(3.0)
    assert math.isnan(bce_rise(0.5, [])) and math.isnan(bce_rise(math.nan, [0.5]))
    tip = advice(SimpleNamespace(method="mskd", recipe="paper", lr=0.2, pretrained=False, initial_checkpoint=None))
    assert "--recipe stable" in tip and "--lr" in tip and "--pretrained" in tip
    assert "--recipe" not in advice(SimpleNamespace(method="mskd", recipe="stable", lr=0.2, pretrained=True))


def _argv(tmp_path, name, *extra):
    return tiny_run_argv(tmp_path / "cache", tmp_path, name, *extra, epochs=3, log_interval=100, lr=0.2)


_rows = summary_rows


@pytest.mark.slow
def test_paper_recipe_from_scratch_ends_with_the_collapse_warning(tmp_path, capsys):
    assert main(_argv(tmp_path, "paper", "--recipe", "paper")) == 0
    out = capsys.readouterr().out
    final = out[out.index("final: mAP"):]
    assert "WARNING: this run collapsed" in final
    assert "--recipe stable" in final and "--lr" in final and "--pretrained" in final
    assert "WARNING collapsing" in out  # on the epoch line too
    rows = _rows(tmp_path / "paper")
    for key in SIGNAL_KEYS:
        assert key in rows[-1], key
    assert rows[-1]["collapse"] == "1"
    assert float(rows[-1]["top1_mode_frac"]) >= 0.9 and float(rows[-1]["max_abs_logit"]) > 10


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--method", "vanilla"), ("--recipe", "stable")], ids=["vanilla", "stable"])
def test_healthy_run_does_not_warn(flags, tmp_path, capsys):
    assert main(_argv(tmp_path, "ok", *flags)) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out
    rows = _rows(tmp_path / "ok")
    assert [r["collapse"] for r in rows] == ["0", "0", "0"]
    assert all(float(r["max_abs_logit"]) < 10 for r in rows)


@pytest.mark.slow
def test_stop_on_collapse_ends_the_run_after_n_flagged_evaluations(tmp_path, capsys, monkeypatch):
    """``--stop-on-collapse 2``: the guard flags epochs 2 and 3 of 5 (scripted), so the run ends after epoch 3
    with exit code 0, its last.pt and reports written; an unflagged epoch in between restarts the count."""
    import mskd_fast.collapse as collapse

    flagged = {2, 3}
    calls = []

    def scripted(signals):
        calls.append(1)
        return ["scripted collapse"] if len(calls) in flagged else []

    monkeypatch.setattr(collapse, "collapse_reasons", scripted)
    argv = tiny_run_argv(tmp_path / "cache", tmp_path, "stop", "--method", "vanilla", "--stop-on-collapse", "2",
                         epochs=5, log_interval=100)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stopped early after epoch 3 of 5" in out and "--stop-on-collapse" in out
    rows = _rows(tmp_path / "stop")
    assert [r["collapse"] for r in rows] == ["0", "1", "1"]
    assert (tmp_path / "stop" / "last.pt").is_file()

    calls.clear()
    flagged.clear()
    flagged.update({1, 3, 4})  # 1 alone does not stop it; 3 and 4 do
    argv = tiny_run_argv(tmp_path / "cache", tmp_path, "stop2", "--method", "vanilla", "--stop-on-collapse", "2",
                         epochs=5, log_interval=100)
    assert main(argv) == 0
    assert [r["collapse"] for r in _rows(tmp_path / "stop2")] == ["1", "0", "1", "1"]
    # 0 (the default) never stops
    calls.clear()
    flagged.clear()
    flagged.update({1, 2, 3})
    assert main(tiny_run_argv(tmp_path / "cache", tmp_path, "never", "--method", "vanilla", epochs=3,
                              log_interval=100)) == 0
    assert len(_rows(tmp_path / "never")) == 3
