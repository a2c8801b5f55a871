"""``bench/rsd_teacher_probe.py`` runs on a checkpoint the trainer wrote and prints one well-formed row per run."""

import argparse
import importlib.util
import os

import pytest
from train_cli_helpers import tiny_run_argv

from mskd_fast.train import main

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "rsd_teacher_probe.py")


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("rsd_teacher_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_scores_the_crop_teacher_of_a_trained_run(probe, tmp_path, capsys):
    assert main(tiny_run_argv(tmp_path / "cache", tmp_path, "run", "--method", "vanilla", epochs=1)) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "last.pt")
    assert probe.main(["--checkpoint", ckpt, "--split", "test", "--batch", "8", "--crop-mode", "corners"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {ckpt} |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "vanilla"
    maps = [float(c) for c in cells[2:7]]  # q, crop mean, crop max, z, z matched
    assert all(0 < m <= 100 for m in maps)
    lowered, raised = (float(c.rstrip(" %")) for c in cells[7:9])
    assert 0 <= lowered <= 100 and 0 <= raised <= 100
    assert -1 <= float(cells[9]) <= 1 and float(cells[10]) > 0


def test_probe_result_fields(probe, tmp_path):
    assert main(tiny_run_argv(tmp_path / "cache", tmp_path, "run", epochs=1)) == 0
    opts = argparse.Namespace(
        split="test", batch=8, crops=4, crop_mode="random", crop_area=(0.5, 0.7), layers=2, crop_temperature=1.0,
        scale="none", mbd_form="paper", seed=0)
    out = probe.probe(str(tmp_path / "run" / "last.pt"), opts)
    assert out["method"] == "mskd/stable"
    assert set(out) >= {"q", "mean", "max", "z", "zm", "pos_lowered", "neg_raised", "cos", "row_std_q"}
