"""``bench/rsd_teacher_probe.py`` runs on a checkpoint the trainer wrote and prints one well-formed row per run."""

import argparse
import importlib.util
import os

import pytest
import torch
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


def test_probe_oracle_crops_on_the_objects(probe, tmp_path, capsys):
    """``--crop-mode boxes`` scores the teacher of crops placed on the annotated objects (the synthetic dataset
    has boxes); a dataset without boxes is refused with a message naming the mode."""
    assert main(tiny_run_argv(tmp_path / "cache", tmp_path, "run", "--method", "vanilla", epochs=1)) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "last.pt")
    assert probe.main(["--checkpoint", ckpt, "--split", "test", "--batch", "8", "--crop-mode", "boxes"]) == 0
    out = capsys.readouterr().out
    assert "boxes crops" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {ckpt} |"))
    assert all(0 < float(c) <= 100 for c in [c.strip() for c in row.strip("|").split("|")][2:7])

    class NoBoxes:
        boxes = image_sizes = None

        def summary(self):
            return "a dataset without boxes"

    with pytest.raises(ValueError, match="--crop-mode boxes needs a dataset with object boxes"):
        probe._objects(NoBoxes(), torch.tensor([0]), 64, 64)


def test_probe_objects_are_scaled_to_the_input(probe):
    import numpy as np

    class Index:
        boxes = [np.array([[10, 20, 30, 60]], dtype=np.float32), np.zeros((0, 4), dtype=np.float32)]
        image_sizes = np.array([[100, 200], [50, 50]])

    objs = probe._objects(Index(), torch.tensor([0, 1]), 64, 32)  # (height, width) of the loader's input
    assert torch.allclose(objs[0], torch.tensor([[3.2, 6.4, 9.6, 19.2]]))
    assert objs[1].shape == (0, 4)
