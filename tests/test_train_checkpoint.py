"""mskd_fast.checkpoint: atomic writes, validated reads, RNG capture/restore."""

import argparse
import os
import random
import stat

import numpy as np
import pytest
import torch

from mskd_fast.checkpoint import FORMAT, atomic_save, capture_rng, load_checkpoint, restore_rng


def test_atomic_save_round_trip_mode_and_no_leftovers(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    blob = {"format": FORMAT, "model": {"w": torch.arange(4.0)}, "history": [{"epoch": 1, "mAP": float("nan")}]}
    atomic_save(blob, path)
    atomic_save(blob, path)  # overwrite in place
    assert os.listdir(tmp_path / "sub") == ["last.pt"]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], torch.arange(4.0))


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"format": FORMAT, "model": {}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"format": FORMAT, "model": Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["model"] == {}


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="is not a checkpoint: not a file written by torch.save"):
        load_checkpoint(bad)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="is not a checkpoint") as info:
        load_checkpoint(noise)
    assert "weights_only" not in str(info.value)  # torch's "retry with weights_only=False" advice is not shown
    truncated = tmp_path / "truncated.pt"
    atomic_save({"format": FORMAT, "model": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(ValueError, match="not a checkpoint|truncated"):
        load_checkpoint(truncated)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "obj": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(ValueError, match="Python objects other than tensors") as info:
        load_checkpoint(pickled)
    assert "weights_only" not in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="--initial-checkpoint"):
        load_checkpoint(foreign)
    partial = tmp_path / "partial.pt"
    torch.save({"format": FORMAT}, partial)
    with pytest.raises(ValueError, match="lacks"):
        load_checkpoint(partial, require=("model", "optimizer"))


def test_rng_capture_restore_round_trip_through_a_file(tmp_path):
    gen = torch.Generator().manual_seed(11)
    torch.rand(5, generator=gen)
    state = capture_rng(gen)
    atomic_save({"format": FORMAT, "model": {}, "rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen))  # noqa: NPY002
    for _ in range(3):  # advance every stream
        random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen)  # noqa: NPY002
    assert restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"], gen) == []
    again = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen))  # noqa: NPY002
    assert expected[0] == again[0] and expected[1] == again[1]
    assert torch.equal(expected[2], again[2]) and torch.equal(expected[3], again[3])
