"""Reliability of the trainer through its CLI (issue 18): concurrent runs and the run-folder lock, decode
failures met during a run, full disks and unwritable folders, signals under torchrun, ignored arguments.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from data_helpers import png_bytes
from PIL import Image
from train_cli_helpers import tiny_run_argv

from mskd_fast import run_dir
from mskd_fast.checkpoint import load_checkpoint
from mskd_fast.evaluate import main as evaluate_main
from mskd_fast.run_dir import LOCK_FILE, lock_run_folder
from mskd_fast.train import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _argv(cache, out, name, *extra, epochs=1, batch=16):
    return tiny_run_argv(cache, out, name, *extra, epochs=epochs, test_size=16, batch=batch, log_interval=1)


def _run_id(folder):
    import yaml

    with open(os.path.join(folder, "args.yaml")) as fh:
        return yaml.safe_load(fh)["resolved"]["run_id"]


# ---------------------------------------------------------------------------------------------- item 1
@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(cache, tmp_path):
    """A sweep started with ``&``: two processes, same --output and --experiment. Exactly one trains; the other
    is refused (rc 2) naming the folder, and every file in the folder belongs to the one run."""
    main(_argv(cache, tmp_path / "warm", "warm"))  # generate the synthetic cache before the race
    procs = [subprocess.Popen([sys.executable, "-m", "mskd_fast.train", *_argv(cache, tmp_path, "sweep", "--lr", lr)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lr in ("0.01", "0.05")]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[0] == 2)
    folder = str(tmp_path / "sweep")
    assert folder in refused[2] and ("in use by another run" in refused[2] or "already holds a run" in refused[2])
    run_id = _run_id(folder)
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(os.path.join(folder, name))["run_id"] == run_id, name
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))  # released at the end of the run


@pytest.mark.slow
def test_default_names_of_runs_started_in_the_same_second_never_clash(cache, tmp_path, monkeypatch, capsys):
    name = "20250101-120000-synthetic-resnet10t-mskd"
    monkeypatch.setattr(run_dir, "default_run_name", lambda args: name)  # both runs start in the same second
    argv = _argv(cache, tmp_path, "x")
    argv = argv[: argv.index("--experiment")]  # the default name DATE-TIME-DATASET-MODEL-METHOD
    original = run_dir.RunFolder.claim

    def other_run_claims_first(self):  # another process took the planned name between plan and claim
        os.mkdir(self.path)
        return original(self)

    monkeypatch.setattr(run_dir.RunFolder, "claim", other_run_claims_first)
    assert main(argv) == 0
    assert f"output {tmp_path / (name + '-2')}" in capsys.readouterr().out
    monkeypatch.setattr(run_dir.RunFolder, "claim", original)
    assert main(argv) == 0  # NAME and NAME-2 exist: NAME-3
    assert sorted(os.listdir(tmp_path)) == [name, name + "-2", name + "-3"]
    assert os.listdir(tmp_path / name) == []  # the other run's folder is untouched
    assert _run_id(tmp_path / (name + "-2")) != _run_id(tmp_path / (name + "-3"))


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_live_run_holds_the_folder(cache, tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from mskd_fast.run_dir import lock_run_folder
            lock = lock_run_folder({str(folder)!r})
            print("locked", flush=True)
            sys.stdin.read()
        """)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_argv(cache, tmp_path, "busy")) == 2
        err = capsys.readouterr().err
        assert f"{folder} is in use by another run (pid {holder.pid} on" in err
        assert os.listdir(folder) == [LOCK_FILE]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(_argv(cache, tmp_path, "busy")) == 0  # the holder exited: the folder is free
    # a resume of the same folder while it is held is refused too
    lock = lock_run_folder(str(folder))
    try:
        assert main(["--resume", str(folder / "last.pt"), "--epochs", "2"]) == 2
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        lock.release()
    assert main(["--resume", str(folder / "last.pt"), "--epochs", "2"]) == 0


# ---------------------------------------------------------------------------------------------- item 2
def _synthetic_test_index(cache):
    from mskd_fast.data import SYNTHETIC_CLASSES
    from mskd_fast.data.synthetic import SyntheticConfig, ensure_synthetic
    from mskd_fast.data.voc import read_voc

    root = ensure_synthetic(SyntheticConfig(train_size=64, test_size=16, img_size=64, cache_dir=cache))
    return read_voc(root, "test", classes=SYNTHETIC_CLASSES, name="synthetic")


def _png_manifest(index, folder, bits: int) -> str:
    """The images of ``index`` as 8- or 16-bit PNGs (16-bit: ``v * 257``, the same picture) in a manifest."""
    os.makedirs(folder)
    rows = []
    for k, path in enumerate(index.paths):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        data = png_bytes(pixels, 8, 2) if bits == 8 else png_bytes(pixels.astype(np.uint16) * 257, 16, 2)
        with open(os.path.join(folder, f"{k}.png"), "wb") as fh:
            fh.write(data)
        names = [c for c, y in zip(index.class_names, index.labels[k]) if y]
        rows.append(f"{k}.png,{'|'.join(names)}\n")
    with open(os.path.join(folder, "test.csv"), "w") as fh:
        fh.write("".join(rows))
    with open(os.path.join(folder, "classes.txt"), "w") as fh:
        fh.write("\n".join(index.class_names) + "\n")
    return str(folder)


@pytest.mark.slow
def test_a_checkpoint_scores_the_same_on_16bit_copies_of_its_test_images(cache, tmp_path):
    """Before the fix a 16-bit PNG kept its 0..65535 scale through the torch loader's eval resize."""
    import json

    assert main(_argv(cache, tmp_path, "run")) == 0
    index = _synthetic_test_index(cache)
    metrics = {}
    for bits in (8, 16):
        data = _png_manifest(index, tmp_path / f"png{bits}", bits)
        out = str(tmp_path / f"eval{bits}")
        assert evaluate_main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--dataset", "manifest",
                              "--data-dir", data, "--eval-split", "test", "--loader", "torch", "-j", "0",
                              "--output", out]) == 0
        with open(os.path.join(out, "metrics.json")) as fh:
            metrics[bits] = json.load(fh)
    assert metrics[8]["num_samples"] == metrics[16]["num_samples"] == 16
    for key in ("mAP", "OF1", "CF1", "P@1"):
        assert metrics[16][key] == metrics[8][key], key
