"""Resume and run-folder rules through the CLI (issue 13 items 1, 2, 4, 5), plus unit tests of mskd_fast.run_dir.

* a run stopped for non-finite losses resumes (new streak, total kept) with ``--lr`` / ``--clip-grad``
  changed and recorded; a second stop keeps the first ``recovery.pt``;
* one skipped step does not make the epoch's mean loss NaN;
* a copied run folder resumes in place, ``--output`` forks into a new folder, the original is untouched,
  another run's folder or checkpoint is never overwritten;
* stale temporary files are removed at start and resume; a ``best.pt`` that lags its record is repaired.
"""

import argparse
import os
import shutil

import pytest
import torch
import yaml
from train_cli_helpers import summary_rows, tiny_run_argv

from mskd_fast.checkpoint import load_checkpoint
from mskd_fast.losses import MSKDLoss
from mskd_fast.run_dir import choose_run_folder, keep_old_recovery, remove_stale_temps, repair_best
from mskd_fast.train import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _argv(cache, out, name, *extra, epochs=1, batch=16):
    return tiny_run_argv(cache, out, name, *extra, epochs=epochs, test_size=16, batch=batch, log_interval=1)


_rows = summary_rows


def _nan_after(monkeypatch, first_bad: int, last_bad: int | None = None):
    """Make MSKDLoss return NaN on calls first_bad..last_bad (1-based; None = every later call)."""
    original = MSKDLoss.forward
    count = {"n": 0}

    def patched(self, *args, **kwargs):  # (total, terms) or, on diagnostic steps, (total, terms, parts)
        total, *rest = original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] >= first_bad and (last_bad is None or count["n"] <= last_bad):
            total = total * float("nan")
        return (total, *rest)

    monkeypatch.setattr(MSKDLoss, "forward", patched)


# ---------------------------------------------------------------------------------------------- unit
def test_choose_run_folder_rules(tmp_path):
    args = argparse.Namespace(output=str(tmp_path / "out"), experiment="orig", dataset="d", model="m", method="x")
    assert choose_run_folder(args, set(), None) == str(tmp_path / "out" / "orig")
    ckpt = str(tmp_path / "copy" / "last.pt")
    # resume: next to the checkpoint, whatever output/experiment the checkpoint recorded
    assert choose_run_folder(args, set(), ckpt) == str(tmp_path / "copy")
    args.output = str(tmp_path / "forks")
    assert choose_run_folder(args, {"output"}, ckpt) == str(tmp_path / "forks" / "copy")
    args.experiment = "try2"
    assert choose_run_folder(args, {"experiment"}, ckpt) == str(tmp_path / "try2")
    assert choose_run_folder(args, {"output", "experiment"}, ckpt) == str(tmp_path / "forks" / "try2")


def test_remove_stale_temps_only_touches_run_file_temporaries(tmp_path):
    stale = [".last.pt.abcd_123.pt", ".best.pt.zz99yy88.pt", ".summary.csv.q1w2e3r4.csv", ".args.yaml.aaaaaaaa.yaml"]
    keep = [".last.pt.short.pt", ".mydata.abcdefgh.pt", "last.pt", ".last.pt.abcdefgh.csv", "notes.txt"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert remove_stale_temps(str(tmp_path / "missing")) == []


def test_keep_old_recovery_never_overwrites(tmp_path):
    assert keep_old_recovery(str(tmp_path)) is None
    torch.save({"epoch": 1, "step_in_epoch": 3}, tmp_path / "recovery.pt")
    first = keep_old_recovery(str(tmp_path))
    assert os.path.basename(first) == "recovery-E1-S3.pt" and not (tmp_path / "recovery.pt").exists()
    torch.save({"epoch": 1, "step_in_epoch": 3}, tmp_path / "recovery.pt")
    second = keep_old_recovery(str(tmp_path))
    assert os.path.basename(second) == "recovery-E1-S3-2.pt" and os.path.isfile(first)


def test_repair_best_copies_a_matching_best_from_the_checkpoint_folder(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    torch.save({"epoch": 1, "step_in_epoch": 0, "w": torch.arange(4)}, src / "best.pt")
    blob = {"epoch": 2, "step_in_epoch": 0, "best": {"mAP": 50.0, "epoch": 1}}  # last.pt: not the best model
    note = repair_best(str(dst), blob, str(src / "last.pt"))
    assert note == f"best.pt copied from {src / 'best.pt'} (epoch 1)"
    assert (dst / "best.pt").read_bytes() == (src / "best.pt").read_bytes()
    assert repair_best(str(dst), blob, str(src / "last.pt")) is None  # now right: nothing to do
    (src / "best.pt").unlink()
    (dst / "best.pt").unlink()
    assert repair_best(str(dst), blob, str(src / "last.pt")).startswith("warning: best.pt is missing")


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_non_finite_stop_resumes_with_new_lr_and_clip_grad(cache, tmp_path, monkeypatch, capsys):
    # 4 steps per epoch, 6 epochs = 24 steps; every loss NaN: the stop comes after step 10
    _nan_after(monkeypatch, 1)
    argv = _argv(cache, tmp_path, "nan", epochs=6, batch=16)
    assert main(argv) == 1
    run = tmp_path / "nan"
    first = load_checkpoint(run / "recovery.pt")
    assert first["global_step"] == 10 and int(first["step_state"]["nonfinite_max_streak"]) == 10
    capsys.readouterr()
    # a retry that still fails: it gets a fresh streak of 10 (so it trains 10 steps, not 1), and the first
    # recovery.pt is kept under its own name
    assert main(["--resume", str(run / "recovery.pt"), "--lr", "0.01"]) == 1
    out = capsys.readouterr().out
    assert "changed at resume: --lr 0.05 -> 0.01" in out
    assert "previous recovery.pt is kept as" in out
    kept = run / f"recovery-E{first['epoch']}-S{first['step_in_epoch']}.pt"
    assert kept.is_file() and load_checkpoint(kept)["global_step"] == 10
    second = load_checkpoint(run / "recovery.pt")
    assert second["global_step"] == 20 and int(second["step_state"]["nonfinite_total"]) == 20
    assert second["args"]["lr"] == 0.01
    assert [g["initial_lr"] for g in second["optimizer"]["param_groups"]] == [0.01, 0.01]  # backbone x1.0
    # the fix works: resume with a changed clipping, the run completes, counters and history are kept
    monkeypatch.undo()
    assert main(["--resume", str(run / "recovery.pt"), "--clip-grad", "5"]) == 0
    out = capsys.readouterr().out
    assert "changed at resume: --clip-grad 10.0 -> 5.0" in out
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 6 and int(last["step_state"]["nonfinite_total"]) == 20
    assert (last["args"]["lr"], last["args"]["clip_grad"]) == (0.01, 5.0)
    assert [(r["changed"]) for r in last["resumes"]] == [{"lr": [0.05, 0.01]}, {"clip_grad": [10.0, 5.0]}]
    with open(run / "args.yaml") as fh:
        info = yaml.safe_load(fh)
    assert info["args"]["lr"] == 0.01 and info["args"]["clip_grad"] == 5.0
    assert [r["changed"] for r in info["resumes"]] == [{"lr": [0.05, 0.01]}, {"clip_grad": [10.0, 5.0]}]
    rows = _rows(run)
    assert [r["nonfinite_skipped"] for r in rows] == ["4", "4", "4", "4", "4", "0"]
    assert rows[-1]["loss"] != "nan" and float(rows[-1]["loss"]) > 0
    assert rows[0]["loss"] == "nan" and rows[0]["steps_counted"] == "0"  # no step counted: no mean


@pytest.mark.slow
def test_one_skipped_step_keeps_the_epoch_mean_finite(cache, tmp_path, monkeypatch, capsys):
    _nan_after(monkeypatch, 2, 2)  # only the second step is non-finite
    assert main(_argv(cache, tmp_path, "one", epochs=1)) == 0
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "one")
    assert rows[0]["nonfinite_skipped"] == "1" and rows[0]["steps_counted"] == "3"
    for key in ("loss", "bce", "lsd"):
        assert rows[0][key] != "nan" and float(rows[0][key]) > 0, key
    assert "1 non-finite steps skipped (loss means over the 3 that counted)" in out
    assert "| amp off |" in out  # the header said "amp None" without --amp
    table = out[out.index("epoch  "):out.index("final: ")]
    assert "nan" not in table.lower() and "-" not in table.splitlines()[2].split()


@pytest.mark.slow
def test_copied_run_folder_resumes_in_place_and_forks_never_touch_the_original(cache, tmp_path, capsys):
    assert main(_argv(cache, tmp_path, "orig")) == 0
    orig = tmp_path / "orig"
    before = {name: (orig / name).read_bytes() for name in ("last.pt", "best.pt", "summary.csv", "args.yaml")}
    shutil.copytree(orig, tmp_path / "copy")
    assert main(["--resume", str(tmp_path / "copy" / "last.pt"), "--epochs", "2"]) == 0
    assert "output " + str(tmp_path / "copy") in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "copy" / "last.pt")["epoch"] == 2
    assert len(_rows(tmp_path / "copy")) == 2
    # --output: a fork into a new folder, with the best checkpoint carried over
    assert main(["--resume", str(orig / "last.pt"), "--epochs", "2", "--output", str(tmp_path / "forks")]) == 0
    fork = tmp_path / "forks" / "orig"
    assert load_checkpoint(fork / "last.pt")["epoch"] == 2 and (fork / "best.pt").is_file()
    assert {name: (orig / name).read_bytes() for name in before} == before  # the original run is untouched
    # a folder holding a run is never the target of another run's resume
    capsys.readouterr()
    assert main(["--resume", str(orig / "last.pt"), "--epochs", "2", "--output", str(tmp_path),
                 "--experiment", "copy"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # nor is a checkpoint of another run overwritten when its folder receives a foreign checkpoint
    assert main(_argv(cache, tmp_path, "other")) == 0
    shutil.copy(orig / "last.pt", tmp_path / "other" / "foreign.pt")
    other_last = (tmp_path / "other" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "other" / "foreign.pt"), "--epochs", "2"]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert (tmp_path / "other" / "last.pt").read_bytes() == other_last
    assert {name: (orig / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_stale_temps_removed_and_lagging_best_repaired(cache, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.k1ll3d00.pt").write_bytes(b"\0" * 1000)  # a kill during the very first save
    assert main(_argv(cache, tmp_path, "run")) == 0
    assert not (run / ".last.pt.k1ll3d00.pt").exists()
    assert "removed a stale temporary file" in capsys.readouterr().out
    e1 = tmp_path / "e1.pt"
    shutil.copy(run / "last.pt", e1)
    assert main(["--resume", str(run / "last.pt"), "--epochs", "2"]) == 0
    # simulate a kill between the last.pt and best.pt writes of an improving epoch 2: last.pt records best
    # epoch 2 (with an mAP no later epoch beats), best.pt still holds epoch 1, plus temp files of both writes
    blob = torch.load(run / "last.pt", weights_only=True)
    blob["best"] = {"mAP": 1000.0, "epoch": 2}
    torch.save(blob, run / "last.pt")
    shutil.copy(e1, run / "best.pt")
    for name in (".best.pt.a1b2c3d4.pt", ".summary.csv.a1b2c3d4.csv", ".unrelated.a1b2c3d4.pt"):
        (run / name).write_bytes(b"x")
    capsys.readouterr()
    assert main(["--resume", str(run / "last.pt"), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "best.pt holds epoch 1 but the best record says epoch 2: rewritten" in out
    assert sorted(p for p in os.listdir(run) if p.startswith(".")) == [".unrelated.a1b2c3d4.pt"]
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == 2 and best["kind"] == "best"
    for key, value in blob["model"].items():
        assert torch.equal(best["model"][key], value), key
