"""Shared pieces of the trainer CLI tests: the flags of a tiny synthetic run and reading its summary.csv."""

import csv
import os
import signal


def tiny_run_argv(cache, out, name, *extra, epochs=2, size=64, test_size=24, batch=16, log_interval=2, lr=0.05):
    """``python -m mskd_fast.train`` flags of a tiny CPU run: a narrow resnet10t at 64 px on ``size`` synthetic
    training images (cached in ``cache``), the torch loader in-process, run folder ``out/name``. The recipe is
    ``stable`` (all three self-distillation terms) unless ``extra`` names one: the default recipe ``step`` keeps
    S-SD only, and these tests exercise every term."""
    recipe = [] if "--recipe" in extra else ["--recipe", "stable"]
    return recipe + [
            "--synthetic-size", str(size), "--synthetic-test-size", str(test_size), "--synthetic-img-size", "64",
            "--synthetic-cache", str(cache), "--img-size", "64", "-b", str(batch), "--epochs", str(epochs),
            "--model", "resnet10t", "--model-kwargs", "channels=(8,16,32,64)", "stem_width=8", "--loader", "torch",
            "-j", "0", "--no-progress", "--log-interval", str(log_interval), "--lr", str(lr), "--output", str(out),
            "--experiment", name, *extra]


def summary_rows(run_dir) -> list[dict]:
    """The rows of ``run_dir/summary.csv`` as dicts (strings)."""
    with open(os.path.join(run_dir, "summary.csv")) as fh:
        return list(csv.DictReader(fh))


def stop_at(monkeypatch, global_step):
    """Make the next ``mskd_fast.train`` run receive a real SIGINT during the given (1-based) step."""
    from mskd_fast import train as train_mod

    original = train_mod.Trainer._fit

    def patched(self):
        step_fn = self.step.__call__
        count = {"n": 0}

        def wrapped(*args, **kwargs):
            out = step_fn(*args, **kwargs)
            count["n"] += 1
            if count["n"] == global_step:
                os.kill(os.getpid(), signal.SIGINT)
            return out

        self.step = _Proxy(self.step, wrapped)
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "_fit", patched)


class _Proxy:
    """``target`` with its ``__call__`` replaced by ``call`` (every other attribute passes through)."""

    def __init__(self, target, call):
        self._target, self._call = target, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._target, name)
