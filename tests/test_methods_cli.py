"""Every comparison method through ``python -m mskd_fast.train --method NAME`` (tiny CPU runs on the synthetic data):
it trains end to end, summary.csv and the epoch line carry its own terms, its state is in the checkpoint, a resume
from a mid-epoch SIGINT is bit-exact, and its flags are validated before training."""

import os
import signal

import pytest
import torch
from train_cli_helpers import stop_at, summary_rows, tiny_run_argv

from mskd_fast.checkpoint import load_checkpoint
from mskd_fast.methods import METHODS
from mskd_fast.train import main

ALL = sorted(METHODS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _argv(cache, out, name, method, *extra, epochs=2):
    return tiny_run_argv(cache, out, name, "--method", method, "--deterministic", *extra, epochs=epochs,
                         test_size=16, log_interval=1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_method_trains_reports_its_terms_and_resumes_exactly(method, cache, tmp_path, monkeypatch, capsys):
    terms = METHODS[method].terms
    assert main(_argv(cache, tmp_path, "straight", method)) == 0
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch 2/2: loss ")]
    assert len(epoch_lines) == 1
    for term in terms:  # the epoch line shows the method's own terms
        assert f" {term} " in epoch_lines[0] or f"({term} " in epoch_lines[0], term
    rows = summary_rows(tmp_path / "straight")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in ("loss", *terms, "mAP", "nonfinite_skipped"):
        assert key in rows[0], key
        assert rows[1][key] not in ("", "nan"), key
    assert "lsd" not in rows[0]  # MSKD's columns belong to MSKD runs
    assert float(rows[1]["nonfinite_skipped"]) == 0
    blob = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert blob["meta"]["method"] == method and "method" in blob["step_state"]
    assert len(blob["step_state"]["method_per_rank"]) == 1

    stop_at(monkeypatch, 2)  # mid-epoch 1 (4 steps per epoch)
    assert main(_argv(cache, tmp_path, "interrupted", method)) == 128 + signal.SIGINT
    monkeypatch.undo()
    recovery = tmp_path / "interrupted" / "recovery.pt"
    assert (load_checkpoint(recovery)["epoch"], load_checkpoint(recovery)["step_in_epoch"]) == (0, 2)
    assert main(["--resume", str(recovery)]) == 0
    capsys.readouterr()
    straight, resumed = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "interrupted"))
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), f"{key} differs after resume"
    for key, value in straight["step_state"]["method"].items():
        assert torch.equal(value, resumed["step_state"]["method"][key]), f"method state {key} differs after resume"
    for k, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][k]["momentum_buffer"])
    rows_resumed = summary_rows(tmp_path / "interrupted")
    for key in ("loss", *terms, "mAP"):
        assert [r[key] for r in rows] == [r[key] for r in rows_resumed], key


@pytest.mark.parametrize("argv,message", [
    (["--method", "tfkd", "--tfkd-correct-prob", "1.0"], "--tfkd-correct-prob must be in"),
    (["--method", "tfkd", "--tfkd-temperature", "0"], "--tfkd-temperature must be"),
    (["--method", "pskd", "--pskd-alpha", "1.5"], "--pskd-alpha must be in"),
    (["--method", "dlb", "-b", "1"], "--batch-size must be >= 2 with --method dlb"),
    (["--method", "dlb", "--dlb-alpha", "-1"], "--dlb-alpha must be"),
    (["--method", "ddgsd", "--ddgsd-temperature", "-2"], "--ddgsd-temperature must be"),
    (["--method", "uskd", "--uskd-mu", "nan"], "--uskd-mu must be"),
    (["--method", "ud", "--ud-weight", "-0.5"], "--ud-weight must be"),
    (["--method", "mulsupcon", "--mulsupcon-queue", "0"], "--mulsupcon-queue must be an int >= 1"),
    (["--method", "mulsupcon", "--mulsupcon-momentum", "1.5"], "--mulsupcon-momentum must be in [0, 1]"),
])
def test_bad_method_flags_fail_before_training(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)
