"""examples/*.py run as written (tiny synthetic data, one epoch) and report finite losses."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(EXAMPLES / script), "--epochs", "1", "--train-size", "40", "--cache",
           str(tmp_path / "cache"), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_plain_loop_example_trains(tmp_path):
    out = _run("plain_loop.py", tmp_path)
    line = re.search(r"epoch 1: loss (\S+) bce (\S+) lsd (\S+) rsd (\S+) ssd (\S+)", out)
    assert line, out
    values = [float(v) for v in line.groups()]
    assert all(v == v and abs(v) < 1e3 for v in values) and values[-1] > 0  # S-SD active after the first update


@pytest.mark.slow
def test_timm_task_example_trains_evaluates_and_checkpoints(tmp_path):
    out = _run("timm_task.py", tmp_path, "--output", str(tmp_path / "run"))
    line = re.search(r"epoch 1: loss (\S+) ssd (\S+) eval loss (\S+) mAP (\S+)", out)
    assert line, out
    assert 0.0 <= float(line.group(4)) <= 100.0
    assert (tmp_path / "run" / "last.pth.tar").is_file()
