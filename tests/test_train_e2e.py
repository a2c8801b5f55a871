"""End-to-end trainer runs on CPU with a tiny timm ResNet at 64 px on the synthetic dataset.

Both methods train and write every report; the evaluate CLI reproduces the training run's metrics;
resume is bit-exact (2 epochs straight == interrupted + resumed, at an epoch boundary and mid-epoch);
SIGINT writes a recovery checkpoint; 10 consecutive non-finite steps stop the run; a 2-process gloo DDP
run's metrics equal a single-process evaluation of its checkpoint.
"""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from train_cli_helpers import stop_at, summary_rows, tiny_run_argv

from mskd_fast.checkpoint import load_checkpoint
from mskd_fast.evaluate import main as evaluate_main
from mskd_fast.losses import MSKDLoss
from mskd_fast.reports import METRIC_KEYS
from mskd_fast.train import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _argv(cache, out, name, *extra, epochs=2, size=64, batch=16):
    return tiny_run_argv(cache, out, name, *extra, epochs=epochs, size=size, batch=batch)


_rows = summary_rows


@pytest.mark.parametrize("method", ["mskd", "vanilla"])
def test_end_to_end_writes_every_output_and_evaluate_reproduces_it(method, cache, tmp_path, capsys):
    assert main(_argv(cache, tmp_path, method, "--method", method, "--amp")) == 0
    run = tmp_path / method
    for name in ("args.yaml", "summary.csv", "last.pt", "best.pt", "per_class_ap.csv", "scale_recall.csv",
                 "scale_recall.md", "scale_recall.png", "training_curves.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    out = capsys.readouterr().out
    assert "final: mAP" in out and "img/s" in out
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in ("loss", "bce", "lsd", "rsd", "ssd", "lr", "img_s", "nonfinite_skipped", *METRIC_KEYS):
        assert key in rows[0], key
    if method == "mskd":
        assert float(rows[1]["ssd"]) != 0 and float(rows[0]["lsd"]) > 0
    else:
        assert float(rows[1]["lsd"]) == float(rows[1]["rsd"]) == float(rows[1]["ssd"]) == 0
    with open(run / "per_class_ap.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 20
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["meta"]["method"] == method
    # the evaluate CLI on last.pt gives exactly the metrics of the last training evaluation
    assert evaluate_main(["--checkpoint", str(run / "last.pt"), "--loader", "torch", "-j", "0"]) == 0
    with open(run / "eval-synthetic-test" / "metrics.json") as fh:
        metrics = json.load(fh)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(float(rows[-1][key]), rel=1e-5, abs=1e-4), key
    assert metrics["num_samples"] == 24
    assert (run / "eval-synthetic-test" / "scale_recall.png").is_file()


def _assert_same_run(a, b):
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"
    oa, ob = load_checkpoint(a)["optimizer"], load_checkpoint(b)["optimizer"]
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["momentum_buffer"], ob["state"][k]["momentum_buffer"])


@pytest.mark.parametrize("stop_step, recipe", [(4, "stable"), (2, "stable"), (2, "step")],
                         ids=["epoch_boundary", "mid_epoch", "mid_epoch_default_recipe"])
def test_resume_is_exact(stop_step, recipe, cache, tmp_path, monkeypatch, capsys):
    common = ("--deterministic", "--log-interval", "1", "--recipe", recipe)
    assert main(_argv(cache, tmp_path, "straight", *common)) == 0
    stop_at(monkeypatch, stop_step)
    code = main(_argv(cache, tmp_path, "interrupted", *common))
    assert code == 128 + signal.SIGINT
    out = capsys.readouterr().out
    assert "SIGINT" in out and "recovery checkpoint" in out
    monkeypatch.undo()
    recovery = tmp_path / "interrupted" / "recovery.pt"
    blob = load_checkpoint(recovery)
    assert (blob["epoch"], blob["step_in_epoch"]) == ((1, 0) if stop_step == 4 else (0, 2))
    assert any(k.startswith("teacher.") for k in blob["step_state"]["method"])  # the S-SD snapshot travels along
    assert main(["--resume", str(recovery)]) == 0
    out = capsys.readouterr().out
    assert "without S-SD" not in out  # the saved S-SD state was used
    _assert_same_run(tmp_path / "straight" / "last.pt", tmp_path / "interrupted" / "last.pt")
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "interrupted")
    for key in ("loss", "bce", "lsd", "rsd", "ssd", "mAP"):
        assert [r[key] for r in straight] == [r[key] for r in resumed], key


def test_resume_refuses_changed_settings(cache, tmp_path, capsys):
    assert main(_argv(cache, tmp_path, "base", epochs=1)) == 0
    last = str(tmp_path / "base" / "last.pt")
    with pytest.raises(SystemExit):
        main(["--resume", last, "--crops", "2", "--lr", "0.2"])
    err = capsys.readouterr().err
    assert "--crops 2" in err and "--lr" not in err.split("differ:")[1].split("(only")[0]  # --lr may change
    assert main(["--resume", last]) == 2  # already complete
    assert "already completed 1 epochs" in capsys.readouterr().err
    assert main(_argv(cache, tmp_path, "base", epochs=1)) == 2  # a folder holding a run is not overwritten
    assert "already holds a run" in capsys.readouterr().err


def test_ten_non_finite_steps_stop_with_a_recovery_checkpoint(cache, tmp_path, monkeypatch, capsys):
    original = MSKDLoss.forward

    def nan_loss(self, *args, **kwargs):  # (total, terms) or, on diagnostic steps, (total, terms, parts)
        total, *rest = original(self, *args, **kwargs)
        return (total * float("nan"), *rest)

    monkeypatch.setattr(MSKDLoss, "forward", nan_loss)
    code = main(_argv(cache, tmp_path, "nan", "--log-interval", "1", batch=8))
    assert code == 1
    out = capsys.readouterr().out
    assert "10 consecutive steps had a non-finite loss" in out
    blob = load_checkpoint(tmp_path / "nan" / "recovery.pt")
    assert blob["step_state"]["nonfinite_total"] == 10
    # every step was skipped: weights and BN statistics stayed finite, the checkpoint is usable
    assert all(torch.isfinite(v).all() for v in blob["model"].values() if v.is_floating_point())
    assert blob["optimizer"]["state"][0]["momentum_buffer"].count_nonzero() == 0


def test_ddp_two_processes_gloo_matches_single_process_evaluation(cache, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mskd_fast.train", *_argv(cache, tmp_path, "ddp", "--device", "cpu", batch=8)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ddp"
    rows = _rows(run)
    assert rows[-1]["eval_samples"] == "24"  # every eval sample exactly once over both shards
    # the collapse guard reads the same gathered eval logits (rank 0 reports it once)
    assert rows[-1]["collapse"] in ("0", "1") and 1 <= int(rows[-1]["top1_classes"]) <= 20
    assert 0 < float(rows[-1]["top1_mode_frac"]) <= 1 and float(rows[-1]["max_abs_logit"]) > 0
    assert proc.stdout.count("final: mAP") == 1  # only rank 0 reports
    assert evaluate_main(["--checkpoint", str(run / "last.pt"), "--loader", "torch", "-j", "0",
                          "--device", "cpu"]) == 0
    with open(run / "eval-synthetic-test" / "metrics.json") as fh:
        metrics = json.load(fh)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(float(rows[-1][key]), rel=1e-5, abs=1e-4), key
    blob = load_checkpoint(run / "last.pt")
    assert blob["world_size"] == 2 and len(blob["rng"]) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_end_to_end_default_loader(cache, tmp_path):
    argv = _argv(cache, tmp_path, "cuda", "--amp", "--device", "cuda", "--no-compile", epochs=1)
    argv[argv.index("--loader") + 1] = "auto"  # DALI (GPU decode) when installed, else torch
    assert main(argv) == 0
    rows = _rows(tmp_path / "cuda")
    assert rows[-1]["eval_samples"] == "24" and float(rows[-1]["loss"]) > 0
