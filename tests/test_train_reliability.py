"""Reliability of the trainer through its CLI (issue 18): concurrent runs and the run-folder lock, decode
failures met during a run, full disks and unwritable folders, signals under torchrun, ignored arguments.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from data_helpers import break_huffman_table, png_bytes
from PIL import Image
from train_cli_helpers import tiny_run_argv

from mskd_fast import run_dir
from mskd_fast.checkpoint import load_checkpoint
from mskd_fast.data import dali_import_error
from mskd_fast.evaluate import main as evaluate_main
from mskd_fast.run_dir import LOCK_FILE, lock_run_folder
from mskd_fast.train import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
DALI_REASON = dali_import_error()
needs_dali = pytest.mark.skipif(DALI_REASON is not None, reason=f"DALI cannot be imported: {DALI_REASON}")


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
def _synthetic_test_index(cache, split="test"):
    from mskd_fast.data import SYNTHETIC_CLASSES
    from mskd_fast.data.synthetic import SyntheticConfig, ensure_synthetic
    from mskd_fast.data.voc import read_voc

    root = ensure_synthetic(SyntheticConfig(train_size=64, test_size=16, img_size=64, cache_dir=cache))
    return read_voc(root, split, classes=SYNTHETIC_CLASSES, name="synthetic")


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


# ---------------------------------------------------------------------------------------------- item 4
def _manifest_copy(cache, folder) -> str:
    """The tiny synthetic dataset (64 train, 16 test JPEGs) copied into a manifest folder of its own."""
    os.makedirs(folder)
    for split in ("train", "test"):
        index = _synthetic_test_index(cache, split)
        rows = []
        for k, path in enumerate(index.paths):
            name = f"{split}{k:03d}.jpg"
            shutil.copy(path, os.path.join(folder, name))
            rows.append(f"{name},{'|'.join(c for c, y in zip(index.class_names, index.labels[k]) if y)}\n")
        with open(os.path.join(folder, f"{split}.csv"), "w") as fh:
            fh.write("".join(rows))
    with open(os.path.join(folder, "classes.txt"), "w") as fh:
        fh.write("\n".join(index.class_names) + "\n")
    return str(folder)


def _manifest_argv(cache, data, out, name, *extra, epochs=1):
    argv = _argv(cache, out, name, "--dataset", "manifest", "--data-dir", data, "--eval-split", "test", *extra,
                 epochs=epochs)
    for flag in ("--synthetic-size", "--synthetic-test-size", "--synthetic-img-size", "--synthetic-cache"):
        at = argv.index(flag)
        del argv[at : at + 2]
    return argv


def _summary(folder):
    with open(os.path.join(folder, "summary.csv")) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.parametrize("loader, workers", [("torch", "0"), ("torch", "2"),
                                             pytest.param("dali", "1", marks=needs_dali)])
def test_a_training_image_that_fails_to_decode_mid_run(cache, tmp_path, capsys, loader, workers):
    """A JPEG with a valid header and a corrupt Huffman table: --on-bad-image error stops with the file named
    after writing recovery.pt (exit 1); the resume with skip leaves it out, counts it and finishes."""
    data = _manifest_copy(cache, tmp_path / "data")
    bad = break_huffman_table(os.path.join(data, "train005.jpg"))
    argv = _manifest_argv(cache, data, tmp_path, "run", "--loader", loader, "-j", workers, epochs=2)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert f"error: {bad}: cannot be decoded (Bogus Huffman table definition)" in captured.err
    recovery = tmp_path / "run" / "recovery.pt"
    assert f"recovery checkpoint {recovery}" in captured.out and "Traceback" not in captured.err
    blob = load_checkpoint(recovery)
    assert blob["kind"] == "bad_image" and blob["epoch"] == 0 and blob["step_in_epoch"] < 4
    assert main(["--resume", str(recovery), "--on-bad-image", "skip"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: skipped {bad}: cannot be decoded") == 1  # reported once, skipped every epoch
    assert "1 image(s) skipped so far in training" in err
    rows = _summary(tmp_path / "run")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[-1]["eval_samples"] == "16"


@pytest.mark.slow
def test_an_evaluation_image_that_fails_to_decode(cache, tmp_path, capsys):
    data = _manifest_copy(cache, tmp_path / "data")
    bad = break_huffman_table(os.path.join(data, "test003.jpg"))
    # error: the run stops after the epoch's training, before its evaluation, with recovery.pt
    assert main(_manifest_argv(cache, data, tmp_path, "run", epochs=2)) == 1
    captured = capsys.readouterr()
    assert f"error: {bad}: cannot be decoded" in captured.err
    blob = load_checkpoint(tmp_path / "run" / "recovery.pt")
    assert (blob["epoch"], blob["step_in_epoch"], blob["history"]) == (0, 4, [])
    # skip: the resume evaluates the pending epoch first (15 of 16 test images), then trains on
    assert main(["--resume", str(tmp_path / "run" / "recovery.pt"), "--on-bad-image", "skip"]) == 0
    assert f"warning: skipped {bad}" in capsys.readouterr().err
    rows = _summary(tmp_path / "run")
    assert [(r["epoch"], r["eval_samples"]) for r in rows] == [("1", "15"), ("2", "15")]
    # the evaluate CLI: error names the file (rc 2), skip reports the count in metrics.json
    last = str(tmp_path / "run" / "last.pt")
    assert evaluate_main(["--checkpoint", last, "--on-bad-image", "error", "--output", str(tmp_path / "e1")]) == 2
    assert f"{bad}: cannot be decoded" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", last, "--output", str(tmp_path / "e2")]) == 0
    assert "1 of 16 images could not be decoded and were left out" in capsys.readouterr().out
    with open(tmp_path / "e2" / "metrics.json") as fh:
        metrics = json.load(fh)
    assert (metrics["num_samples"], metrics["skipped_samples"]) == (15, 1)


# ---------------------------------------------------------------------------------------------- item 5
def _unshare_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_unshare = pytest.mark.skipif(not _unshare_available(), reason="needs unprivileged user and mount namespaces "
                                   "(unshare -rm) to mount a small or read-only tmpfs without root")


def _in_namespace(script: str, timeout=900) -> subprocess.CompletedProcess:
    """Run a shell script as root of a new user + mount namespace (its mounts vanish when it ends)."""
    return subprocess.run(["unshare", "-rm", "sh", "-euc", script], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_atomic_save_that_runs_out_of_room_names_the_file_and_keeps_the_old_one(tmp_path):
    """Public API, without privileges: a file-size limit (ulimit -f) makes the write fail part-way, the same
    short write a full disk gives (EFBIG instead of ENOSPC)."""
    target = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from mskd_fast.checkpoint import WriteError, atomic_save
        atomic_save({{"w": torch.zeros(10)}}, {str(target)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            atomic_save({{"w": torch.zeros(1_000_000)}}, {str(target)!r})
        except WriteError as exc:
            print("WriteError:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"WriteError: file too large while writing {target}: over the file-size limit" in proc.stdout
    assert "(3.9 MB needed, " in proc.stdout  # 1e6 float32 + the 64 KiB allowance for the container (MB = 2**20)
    assert load_checkpoint_like(target)["w"].numel() == 10  # the previous file is intact
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left


def load_checkpoint_like(path):
    import torch

    return torch.load(path, weights_only=True)


@pytest.mark.slow
@needs_unshare
def test_a_full_disk_during_a_checkpoint_save(cache, tmp_path):
    """A 16 MB tmpfs: epoch 1 saves; then the disk is filled up to less than a checkpoint, and the epoch-2
    save fails: exit 2 with "no space left on device while writing .../last.pt (N MB needed, M MB free)", no
    traceback, and last.pt is still epoch 1's."""
    main(_argv(cache, tmp_path / "warm", "warm"))  # the synthetic cache exists before the namespace
    disk, keep = tmp_path / "disk", tmp_path / "keep"
    disk.mkdir()
    keep.mkdir()
    python = sys.executable
    first = " ".join(f"'{a}'" for a in _argv(cache, disk, "run", epochs=1))
    fill = textwrap.dedent(f"""
        import os, shutil
        need = os.path.getsize('{disk}/run/last.pt')
        free = shutil.disk_usage('{disk}').free
        with open('{disk}/filler', 'wb') as fh:
            fh.write(b'x' * max(0, free - need // 2))
    """)
    script = f"""
        mount -t tmpfs -o size=16m none '{disk}'
        '{python}' -m mskd_fast.train {first} > '{keep}/out1' 2>&1
        cp '{disk}/run/last.pt' '{keep}/epoch1.pt'
        '{python}' -c "{fill}"
        set +e
        '{python}' -m mskd_fast.train --resume '{disk}/run/last.pt' --epochs 2 > '{keep}/out2' 2> '{keep}/err2'
        echo $? > '{keep}/rc2'
        set -e
        cp '{disk}/run/last.pt' '{keep}/after.pt'
        ls -a '{disk}/run' > '{keep}/listing'
    """
    proc = _in_namespace(script)
    assert proc.returncode == 0, proc.stderr[-3000:] + (keep / "out1").read_text()[-3000:]
    err = (keep / "err2").read_text()
    assert (keep / "rc2").read_text().strip() == "2", err + (keep / "out2").read_text()[-2000:]
    assert f"error: no space left on device while writing {disk}/run/last.pt (" in err
    assert " MB needed, " in err and " MB free)" in err and "Traceback" not in err
    assert (keep / "after.pt").read_bytes() == (keep / "epoch1.pt").read_bytes()  # epoch 1's last.pt kept
    assert not [n for n in (keep / "listing").read_text().split() if n.startswith(".last.pt.")]  # no temp left


@pytest.mark.slow
def test_setup_time_filesystem_errors_name_the_path_with_exit_code_2(cache, tmp_path, capsys):
    main(_argv(cache, tmp_path, "run"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    capsys.readouterr()
    # --output is a file; the run folder's name is taken by a file; the synthetic cache is a file
    argv = _argv(cache, blocker, "x")
    assert main(argv) == 2
    assert f"run folder {blocker}/x: cannot be a folder (its parent {blocker} is a file)" in capsys.readouterr().err
    assert main(_argv(cache, tmp_path, "a_file")) == 2
    assert f"run folder {blocker}: cannot be a folder: it is a file" in capsys.readouterr().err
    argv = _argv(str(blocker), tmp_path, "y")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"synthetic dataset cache {blocker}: cannot write the dataset there" in err and "--synthetic-cache" in err
    assert not (tmp_path / "y").exists()
    # evaluate --output that cannot be written: refused before the evaluation runs
    with pytest.raises(SystemExit) as info:
        evaluate_main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--output", str(blocker / "eval")])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert f"--output {blocker}/eval: cannot be a folder (its parent {blocker} is a file)" in captured.err
    assert "mAP" not in captured.out


@pytest.mark.slow
@needs_unshare
def test_read_only_output_cache_and_report_folders(cache, tmp_path):
    main(_argv(cache, tmp_path, "run"))
    ro, keep = tmp_path / "ro", tmp_path / "keep"
    ro.mkdir()
    keep.mkdir()
    python = sys.executable
    train_ro = " ".join(f"'{a}'" for a in _argv(cache, ro / "out", "x"))
    cache_ro = " ".join(f"'{a}'" for a in _argv(str(ro / "cache"), tmp_path, "y"))
    script = f"""
        mount -t tmpfs -o size=8m none '{ro}'
        cp '{tmp_path}/run/last.pt' '{ro}/last.pt'
        mount -o remount,ro '{ro}'
        set +e
        '{python}' -m mskd_fast.train {train_ro} > /dev/null 2> '{keep}/train'; echo $? >> '{keep}/train'
        '{python}' -m mskd_fast.train {cache_ro} > /dev/null 2> '{keep}/cache'; echo $? >> '{keep}/cache'
        '{python}' -m mskd_fast.evaluate --checkpoint '{ro}/last.pt' > '{keep}/eval_out' 2> '{keep}/eval'
        echo $? >> '{keep}/eval'
    """
    proc = _in_namespace(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, cache_err, evaluation = ((keep / n).read_text() for n in ("train", "cache", "eval"))
    assert train.splitlines()[-1] == "2" and f"run folder {ro}/out/x: cannot write there (in {ro}): Read-only" in train
    assert cache_err.splitlines()[-1] == "2" and f"synthetic dataset cache {ro}/cache: cannot write" in cache_err
    assert "Read-only file system" in cache_err and not (tmp_path / "y").exists()
    assert evaluation.splitlines()[-1] == "2" and "Traceback" not in evaluation
    assert f"report folder (set another with --output) {ro}/eval-synthetic-test: cannot write there" in evaluation
    assert "mAP" not in (keep / "eval_out").read_text()


# ---------------------------------------------------------------------------------------------- item 3
def _wait_for(path, text, proc, timeout=300):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) and text in open(path).read():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen (rc {proc.poll()}): {open(path).read()[-3000:]}")


def _interrupt_twice(groups, gap=0.1):
    """A Ctrl-C forwarded as two signals: SIGINT, then SIGTERM ``gap`` seconds later, to each process group."""
    import signal
    import time

    for group in groups:
        os.killpg(group, signal.SIGINT)
    time.sleep(gap)
    for group in groups:
        os.killpg(group, signal.SIGTERM)


@pytest.mark.slow
def test_sigint_then_sigterm_still_writes_the_recovery_checkpoint(cache, tmp_path):
    """Single process, -j 2: the second signal within the grace period must not abort the recovery save."""
    main(_argv(cache, tmp_path / "warm", "warm"))
    log = tmp_path / "log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mskd_fast.train", *_argv(cache, tmp_path, "run", "-j", "2",
                                                                                epochs=6)],
                                env=ENV, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(log, "epoch 1 step 2/", proc)
        _interrupt_twice([proc.pid])  # the trainer and its loader workers, as a terminal's Ctrl-C
        assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert "SIGINT: stopped after epoch" in out and "Traceback" not in out
    assert load_checkpoint(tmp_path / "run" / "recovery.pt")["kind"] == "signal"


@pytest.mark.slow
def test_ctrl_c_under_torchrun_writes_recovery_and_resumes(cache, tmp_path):
    """torchrun (2 gloo ranks, -j 2): Ctrl-C reaches the agent, which forwards it to each rank's process group;
    a SIGTERM follows 0.1 s later (as some launchers send). Every rank stops at the same step and rank 0 writes
    recovery.pt, which a torchrun resume continues to the end."""
    main(_argv(cache, tmp_path / "warm", "warm"))
    log = tmp_path / "log"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = _argv(cache, tmp_path, "ddp", "--device", "cpu", "-j", "2", epochs=6, batch=8)
    with open(log, "w") as fh:
        proc = subprocess.Popen([*torchrun, "-m", "mskd_fast.train", *argv], env=ENV, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(log, "epoch 1 step 2/", proc)
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        os.killpg(proc.pid, __import__("signal").SIGINT)  # the terminal: the agent's process group
        _interrupt_twice([int(r) for r in ranks], gap=0.1)  # each rank's own group (torchrun starts sessions)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    recovery = tmp_path / "ddp" / "recovery.pt"
    assert recovery.is_file(), out[-4000:]
    blob = load_checkpoint(recovery)
    assert blob["kind"] == "signal" and blob["world_size"] == 2 and len(blob["rng"]) == 2
    assert "SIGINT: stopped after epoch" in out
    resumed = subprocess.run([*torchrun, "-m", "mskd_fast.train", "--resume", str(recovery)], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["epoch"] == 6


# ---------------------------------------------------------------------------------------------- item 9
def test_model_kwargs_drop_rate_is_honoured_by_the_mskd_head():
    """timm applies drop_rate in its own classifier head, which MSKD replaces: before the fix the flag was
    recorded in args.yaml and did nothing."""
    import torch

    from mskd_fast.models import create_model

    model, _ = create_model("resnet10t", 5, drop_rate=0.5, channels=(8, 16, 32, 64), stem_width=8)
    images, boxes = torch.randn(4, 3, 32, 32), torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]).repeat(4, 1, 1)
    model.train()
    torch.manual_seed(0)
    q1, r1 = model(images, boxes)
    torch.manual_seed(1)
    q2, r2 = model(images, boxes)
    assert not torch.equal(q1, q2) and not torch.equal(r1, r2)  # dropout acts on both paths
    model.eval()
    assert torch.equal(model(images), model(images))  # and never in eval (the teacher)
    plain, _ = create_model("resnet10t", 5, channels=(8, 16, 32, 64), stem_width=8)
    assert set(plain.state_dict()) == set(model.state_dict())  # checkpoints are unchanged


@pytest.mark.parametrize("extra, message", [
    (["--model-kwargs", "channels=(8,16,32,64)", "stem_width=8", "drop_rate=abc"],
     "--model-kwargs drop_rate must be a number in [0, 1), got 'abc'"),
    (["--model-kwargs", "channels=(8,16,32,64)", "stem_width=8", "drop_rate=1.5"],
     "--model-kwargs drop_rate must be a number in [0, 1), got 1.5"),
    (["--seed", "-1"], "--seed must be an int in [0, 2**32 - 1], got -1"),
    (["--seed", "123456789012345678901"], "--seed must be an int in [0, 2**32 - 1], got 123456789012345678901"),
])
def test_arguments_that_would_be_ignored_or_overflow_are_refused_up_front(cache, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(_argv(cache, tmp_path, "run", *extra))
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder exists


# ---------------------------------------------------------------------------------------------- item 10
def _ctrl_c_runs(cache, tmp_path, common):
    """Runs of test_ctrl_c_with_loader_workers_resumes_bit_exactly: straight (-j 2), straight0 (-j 0), and one
    interrupted by SIGINT to its process group, then resumed."""
    import signal

    assert main(_argv(cache, tmp_path, "straight", *common, epochs=2)) == 0
    assert main(_argv(cache, tmp_path, "straight0", "--deterministic", epochs=2)) == 0  # -j 0
    log = tmp_path / "log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mskd_fast.train",
                                 *_argv(cache, tmp_path, "interrupted", *common, epochs=2)],
                                env=ENV, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(log, "epoch 1 step 1/", proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    recovery = load_checkpoint(tmp_path / "interrupted" / "recovery.pt")
    assert 1 <= recovery["global_step"] < 8  # stopped inside the run
    assert main(["--resume", str(tmp_path / "interrupted" / "recovery.pt")]) == 0


@pytest.mark.slow
def test_ctrl_c_with_loader_workers_resumes_bit_exactly(cache, tmp_path):
    """docs/TRAINING.md said resume is exact only with -j 0. The torch loader seeds each sample's augmentation
    from (seed, epoch, shard, position), so with -j 2 a Ctrl-C (to the whole process group, as a terminal
    sends it) and a resume give the very weights of an uninterrupted run, which equal those of -j 0."""
    import torch

    common = ("--deterministic", "-j", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the interrupted subprocess (OMP_NUM_THREADS=1): CPU kernels round by thread count
    try:
        _ctrl_c_runs(cache, tmp_path, common)
    finally:
        torch.set_num_threads(threads)
    ref = load_checkpoint(tmp_path / "straight" / "last.pt")
    for other in ("interrupted", "straight0"):
        blob = load_checkpoint(tmp_path / other / "last.pt")
        for key, value in ref["model"].items():
            assert torch.equal(blob["model"][key], value), (other, key)
        for k, state in ref["optimizer"]["state"].items():
            assert torch.equal(blob["optimizer"]["state"][k]["momentum_buffer"], state["momentum_buffer"]), other
    rows = {name: _summary(tmp_path / name) for name in ("straight", "interrupted")}
    for key in ("loss", "bce", "lsd", "rsd", "ssd", "mAP"):
        assert [r[key] for r in rows["straight"]] == [r[key] for r in rows["interrupted"]], key


# ---------------------------------------------------------------------------------------------- --dist-timeout
@pytest.mark.slow
def test_a_rank_that_stops_responding_ends_the_job_after_dist_timeout(cache, tmp_path):
    """SIGSTOP one of two gloo ranks: rank 0's next collective fails after --dist-timeout (15 s here, instead
    of the 30 min default gloo timeout that held the job before) with a message naming the flag; torchrun
    then ends the job."""
    import signal
    import time

    main(_argv(cache, tmp_path / "warm", "warm"))
    log = tmp_path / "log"
    argv = _argv(cache, tmp_path, "ddp", "--device", "cpu", "--dist-timeout", "0.25", epochs=50, batch=8)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "mskd_fast.train", *argv], env=ENV, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    stopped = None
    try:
        _wait_for(log, "epoch 1 step 2/", proc)
        for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
            if env.get(b"RANK") == b"1":
                stopped = int(pid)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        proc.wait(timeout=240)
        elapsed = time.monotonic() - t0
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert proc.returncode != 0
    assert "a collective operation waited --dist-timeout 0.25 min for the other ranks and gave up" in out, out[-4000:]
    assert elapsed < 120, elapsed  # 15 s timeout + torchrun's 30 s grace for the stopped rank, not 30 min
