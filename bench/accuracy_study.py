"""Vanilla vs MSKD (``stable`` and ``paper`` recipes) on the built-in synthetic dataset, several seeds, with
model selection on a validation split (the analogue of the paper's Table 1, Table 3 with ``--ablations``, and
Figure 5).

Every run is a plain ``python -m mskd_fast.train`` subprocess with the same model, data, budget and
``--seed``; only the method flags differ. It trains on ``train-fit`` (the synthetic ``train`` split minus its
last 20 %) and evaluates on ``val`` (that last 20 %) after its last epoch; the study then evaluates the run's
``last.pt`` with ``python -m mskd_fast.evaluate`` on the ``test`` split (the reported numbers) and on
``train-fit`` (train mAP, to show over-fitting). Choices (the ``iota`` of ``--ablations``) are made on ``val``
only, never on ``test``.

Outputs in ``--output DIR``: ``results.md`` (settings, mean +- std over the seeds of every metric on test, the
validation table, train vs test mAP, per-scale recall, collapse signals, the ``iota`` decision),
``results.json`` (every run's numbers), ``scale_recall.png``, ``runs/NAME-sSEED/`` (trainer run folders with
``eval-test/`` and ``eval-train/``) and ``logs/NAME-sSEED.log``. A finished run (all three outputs present) is
reused when the study is started again on the same folder, so an interrupted study continues where it stopped.

Profiles (``--profile``; ``auto`` = ``gpu`` on a CUDA device, else ``cpu``):

* ``cpu``: ResNet-10t (timm ``resnet10t``, random init, ``output_stride=16`` so the final feature map is 4x4 at
  64 px), 300 train (240 train-fit / 60 val) / 300 test images at 64 px, batch 32, 24 epochs, SGD LR 0.05
  (1 warm-up epoch, cosine), no RandAugment, float32, one thread per run, two runs at a time. Sized on ``val``
  so that vanilla reaches its plateau and over-fits (train-fit mAP well above val mAP) within the budget; at
  LR 0.1 the ``stable`` recipe destabilised on val (see docs/ACCURACY.md), hence 0.05.
* ``gpu``: ResNet-18, 128 px, 4,000 train / 1,000 test, batch 64, 12 epochs, LR 0.1, bf16, compiled, one run
  at a time. Not yet run (no GPU has been lent); its size is an estimate.
* ``tiny`` (``--tiny``): a ResNet-10t with channels (8, 16, 32, 64) at 32 px, 40 train / 24 test images,
  1 epoch. A smoke test (CI): it checks that the study runs end to end; its numbers mean nothing.

Usage::

    python bench/accuracy_study.py --profile cpu --device cpu --output study-cpu              # 3 x 3 runs
    python bench/accuracy_study.py --profile cpu --device cpu --output study-cpu --ablations  # + 5 x 3 runs
    python bench/accuracy_study.py --tiny --output /tmp/smoke                                  # CI smoke test
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_fashion as fashion  # noqa: E402  (bench/ is not a package)
from study_fashion import mean_std  # noqa: E402
from study_fashion import pm as _pm  # noqa: E402

PROFILES = {
    # The real-object study (docs/ACCURACY.md, "Real objects"): fashion-multi composites, a backbone pretrained here
    # on single Fashion-MNIST items (bench/fashion_pretrain.py), fine-tuned with the authors' regime (backbone LR
    # 0.1x, weight decay 1e-4, no warm-up). Variants and decision rules: bench/study_fashion.py. The head LR was
    # calibrated with vanilla only, on val, seed 1 (docs/ACCURACY.md): 0.02 / 0.05 / 0.1 / 0.2 / 0.4 / 0.8 / 1.6 gave
    # 63.7 / 69.1 / 72.0 / 74.3 / 75.8 / 77.4 / 78.0 val mAP; 0.8 was taken (1.6's +0.5 is within one seed's noise;
    # the lower LR is the closer to the paper's regime). The gpu variant's LR is the CPU one, not re-calibrated.
    "fashion": dict(
        suite="fashion", dataset="fashion-multi", model="resnet10t", model_kwargs=("output_stride=16",), img_size=64,
        synthetic_img_size=64, synthetic_size=1250, synthetic_test_size=1500, batch_size=32, epochs=8, lr=0.8,
        warmup_epochs=0, weight_decay=1e-4, amp=False, workers=0, loader="torch", randaugment=False, threads=1,
        jobs=2, pretrain=dict(epochs=3, lr=0.1, items=None),
    ),
    "fashion-gpu": dict(
        suite="fashion", dataset="fashion-multi", model="resnet18", model_kwargs=(), img_size=128,
        synthetic_img_size=128, synthetic_size=5000, synthetic_test_size=3000, batch_size=64, epochs=12, lr=0.8,
        warmup_epochs=0, weight_decay=1e-4, amp=True, workers=8, loader="auto", randaugment=True, threads=0, jobs=1,
        pretrain=dict(epochs=5, lr=0.1, items=None),
    ),
    # The schedule study (issue 23; rules in bench/study_schedule.py): the same data and backbone as "fashion", the
    # paper's schedule in miniature: RandAugment(2, 9), SGD momentum 0.9, weight decay 5e-4, cosine, 40 epochs; the
    # head LR is calibrated on val with vanilla (phase 0) and then set here (each calibration run names its own).
    "fashion-long": dict(
        suite="schedule", dataset="fashion-multi", model="resnet10t", model_kwargs=("output_stride=16",), img_size=64,
        synthetic_img_size=64, synthetic_size=1250, synthetic_test_size=1500, batch_size=32, epochs=40, lr=None,
        warmup_epochs=0, weight_decay=5e-4, amp=False, workers=0, loader="torch", randaugment=True, threads=1,
        jobs=2, eval_interval=1, stop_on_collapse=2, pretrain=dict(epochs=3, lr=0.1, items=None),
    ),
    "fashion-long-tiny": dict(
        suite="schedule", dataset="fashion-multi", model="resnet10t",
        model_kwargs=("channels=(8,16,32,64)", "stem_width=8"), img_size=32, synthetic_img_size=32, synthetic_size=20,
        synthetic_test_size=12, batch_size=10, epochs=2, lr=None, warmup_epochs=0, weight_decay=5e-4, amp=False,
        workers=0, loader="torch", randaugment=True, threads=1, jobs=2, eval_interval=1, stop_on_collapse=2,
        pretrain=dict(epochs=1, lr=0.1, items=256),
    ),
    "fashion-tiny": dict(
        suite="fashion", dataset="fashion-multi", model="resnet10t",
        model_kwargs=("channels=(8,16,32,64)", "stem_width=8"), img_size=32, synthetic_img_size=32, synthetic_size=20,
        synthetic_test_size=12, batch_size=10, epochs=1, lr=0.05, warmup_epochs=0, weight_decay=1e-4, amp=False,
        workers=0, loader="torch", randaugment=False, threads=1, jobs=2, pretrain=dict(epochs=1, lr=0.1, items=256),
    ),
    "gpu": dict(
        model="resnet18", model_kwargs=(), img_size=128, synthetic_img_size=128, synthetic_size=4000,
        synthetic_test_size=1000, batch_size=64, epochs=12, lr=0.1, warmup_epochs=1, amp=True, workers=8,
        loader="auto", randaugment=True, threads=0, jobs=1,
    ),
    "cpu": dict(
        model="resnet10t", model_kwargs=("output_stride=16",), img_size=64, synthetic_img_size=64,
        synthetic_size=300, synthetic_test_size=300, batch_size=32, epochs=24, lr=0.05, warmup_epochs=1,
        amp=False, workers=0, loader="torch", randaugment=False, threads=1, jobs=2,
    ),
    "tiny": dict(
        model="resnet10t", model_kwargs=("channels=(8,16,32,64)", "stem_width=8"), img_size=32,
        synthetic_img_size=32, synthetic_size=40, synthetic_test_size=24, batch_size=16, epochs=1, lr=0.05,
        warmup_epochs=0, amp=False, workers=0, loader="torch", randaugment=False, threads=1, jobs=2,
    ),
}

METRICS = ("mAP", "P@1", "R@1", "CF1", "OF1")
IOTA_GRID = (0.15, 0.5, 1.5)
PAPER_IOTA = 1.5
DEFAULT_SEEDS = (1, 2, 3)


@dataclass(frozen=True)
class Variant:
    """One method setting of the study: folder name, table label, the trainer flags that make it."""

    name: str
    label: str
    flags: tuple[str, ...]


def _iota_name(iota: float) -> str:
    return f"stable-iota{iota:g}"


VANILLA = Variant("vanilla", "Vanilla (BCE)", ("--method", "vanilla"))
PAPER = Variant("paper", "MSKD paper", ("--method", "mskd", "--recipe", "paper"))
STABLE_IOTA = tuple(Variant(_iota_name(i), f"MSKD stable, iota={i:g}",
                            ("--method", "mskd", "--recipe", "stable", "--iota", f"{i:g}")) for i in IOTA_GRID)
DROPS = tuple(Variant(f"stable-no-{t}", f"MSKD stable w/o {t.upper().replace('SD', '-SD')}",
                      ("--method", "mskd", "--recipe", "stable", f"--no-{t}")) for t in ("lsd", "rsd", "ssd"))


def stable_default() -> Variant:
    """The ``stable`` variant at the code's default ``iota`` (``mskd_fast.losses.RECIPES``)."""
    from mskd_fast.losses import RECIPES

    iota = RECIPES["stable"]["iota"]
    for v in STABLE_IOTA:
        if math.isclose(float(v.flags[-1]), iota):
            return v
    return Variant(_iota_name(iota), f"MSKD stable, iota={iota:g}",
                   ("--method", "mskd", "--recipe", "stable", "--iota", f"{iota:g}"))


def study_variants(ablations: bool) -> list[Variant]:
    """Vanilla, stable (default iota), paper; with ``ablations`` also the other iotas and the three drops."""
    main = [VANILLA, stable_default(), PAPER]
    if not ablations:
        return main
    return main + [v for v in STABLE_IOTA if v not in main] + list(DROPS)


# ---------------------------------------------------------------------------------------------- settings
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/accuracy_study.py",
        description="Train vanilla and MSKD (stable, paper; optionally the ablations) on the synthetic dataset with "
                    "the same budget for several seeds; select on val, report test (mean +- std).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, help="study folder (results.md, results.json, plots, runs/, logs/)")
    p.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                   help="budget: auto = gpu on a CUDA device, else cpu (see the module docstring)")
    p.add_argument("--tiny", action="store_true", help="same as --profile tiny (CPU smoke test)")
    p.add_argument("--ablations", action="store_true",
                   help="also stable with iota in {0.15, 0.5, 1.5} and without L-SD, R-SD, S-SD")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="trainer --seed of the runs")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the profile's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    p.add_argument("--synthetic-cache", default=None,
                   help="cache folder of the generated datasets and the pretrained backbone (default: the trainer's, "
                        "$MSKD_FAST_CACHE or ~/.cache)")
    p.add_argument("--fashion-dir", default=None,
                   help="fashion profiles: folder of the Fashion-MNIST IDX files (default: the Debian package's, "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--overwrite", action="store_true", help="re-train runs already finished in --output")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run with uncommitted changes to the package source (refused otherwise); the diff's hash "
                        "is recorded with every run")
    p.add_argument("--reuse-other-code", action="store_true",
                   help="reuse finished runs trained by another version of the package source (by default they "
                        "are trained again); the tables then name the code of every row")
    p.add_argument("--lr-check", type=float, nargs="+", default=None, metavar="LR",
                   help="fashion profiles: after the decision, also train vanilla and the chosen MSKD variant at "
                        "these head LRs (seeds as given), reported as an LR-sensitivity table")
    p.add_argument("--smoke", action="store_true",
                   help="fashion profiles: a smoke test of the study's machinery (one value per grid, four phase-1 "
                        "variants, one phase-2 run, no extra seeds); its numbers mean nothing")
    return p


def resolve_settings(args: argparse.Namespace) -> tuple[str, dict, str]:
    """``(profile name, settings dict, resolved device string)``; raises ``ValueError`` for bad flags."""
    from mskd_fast.distributed import resolve_device

    device = resolve_device(args.device)
    profile = "tiny" if args.tiny else args.profile
    if args.tiny and args.profile not in ("auto", "tiny"):
        raise ValueError(f"--tiny conflicts with --profile {args.profile}")
    if profile == "auto":
        profile = "gpu" if device.type == "cuda" else "cpu"
    settings = dict(PROFILES[profile])
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        settings["epochs"] = args.epochs
    if args.jobs is not None:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        settings["jobs"] = args.jobs
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0, got {args.seeds}")
    if settings["warmup_epochs"] >= settings["epochs"]:
        settings["warmup_epochs"] = 0
    if settings["amp"] and device.type != "cuda":
        settings["amp"] = False  # bf16 autocast on CPU is slower than float32 on most CPUs
    return profile, settings, str(device)


def _common_data_flags(settings: dict, synthetic_cache: str | None) -> list[str]:
    s = settings
    argv = ["--dataset", s.get("dataset", "synthetic"), "--synthetic-size", str(s["synthetic_size"]),
            "--synthetic-test-size", str(s["synthetic_test_size"]),
            "--synthetic-img-size", str(s["synthetic_img_size"])]
    if s.get("fashion_dir"):
        argv += ["--data-dir", s["fashion_dir"]]
    return argv + (["--synthetic-cache", synthetic_cache] if synthetic_cache else [])


def trainer_argv(variant: Variant, settings: dict, *, seed: int, device: str, runs_dir: str,
                 synthetic_cache: str | None) -> list[str]:
    """The ``python -m mskd_fast.train`` arguments of one run (every budget flag explicit)."""
    s = settings
    argv = [
        *_common_data_flags(s, synthetic_cache), "--train-split", "train-fit", "--eval-split", "val",
        "--model", s["model"], "--img-size", str(s["img_size"]), "-b", str(s["batch_size"]),
        "--epochs", str(s["epochs"] * getattr(variant, "epochs_factor", 1)),
        *([] if s["lr"] is None else ["--lr", str(s["lr"])]), "--warmup-epochs", str(s["warmup_epochs"]),
        "--loader", s["loader"], "-j", str(s["workers"]), "--randaugment" if s["randaugment"] else "--no-randaugment",
        "--eval-interval", str(s.get("eval_interval", 0)), "--seed", str(seed), "--device", device, "--no-progress",
        "--output", runs_dir, "--experiment", run_name(variant, seed),
    ]
    if s["model_kwargs"]:
        argv += ["--model-kwargs", *s["model_kwargs"]]
    if s.get("initial_checkpoint"):
        argv += ["--initial-checkpoint", s["initial_checkpoint"]]
    if s.get("stop_on_collapse"):
        argv += ["--stop-on-collapse", str(s["stop_on_collapse"])]
    if s.get("weight_decay") is not None:
        argv += ["--weight-decay", str(s["weight_decay"])]
    if s["amp"]:
        argv.append("--amp")
    return argv + list(variant.flags)


def evaluate_argv(run_dir: str, split: str, settings: dict, device: str, synthetic_cache: str | None) -> list[str]:
    """``python -m mskd_fast.evaluate`` arguments: the run's ``last.pt`` on ``split`` into ``run_dir/eval-*``."""
    out = os.path.join(run_dir, "eval-test" if split == "test" else "eval-train")
    argv = ["--checkpoint", os.path.join(run_dir, "last.pt"), "--eval-split", split, "--loader", settings["loader"],
            "-j", str(settings["workers"]), "--device", device, "--output", out]
    return argv + (["--synthetic-cache", synthetic_cache] if synthetic_cache else [])


def run_name(variant: Variant, seed: int) -> str:
    return f"{variant.name}-s{seed}"


# ---------------------------------------------------------------------------------------------- running
def prepare_dataset(settings: dict, synthetic_cache: str | None) -> str:
    """Generate (or find) the profile's dataset before the first run; returns a one-line summary per split."""
    from mskd_fast.data import SyntheticConfig, load_index

    config = SyntheticConfig(train_size=settings["synthetic_size"], test_size=settings["synthetic_test_size"],
                             img_size=settings["synthetic_img_size"], cache_dir=synthetic_cache)
    dataset = settings.get("dataset", "synthetic")
    data_dir = settings.get("fashion_dir") if dataset == "fashion-multi" else None
    return "; ".join(load_index(dataset, data_dir, split, synthetic=config).summary()
                     for split in ("train-fit", "val", "test"))


def prepare_backbone(settings: dict, synthetic_cache: str | None) -> str:
    """Pretrain (or find in the cache) the profile's backbone on single Fashion-MNIST items; returns its path."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fashion_pretrain import build_config, pretrain

    p = settings["pretrain"]
    config = build_config(settings["model"], list(settings["model_kwargs"]), settings["img_size"], p["epochs"],
                          p["lr"], items=p.get("items"))
    return pretrain(config, synthetic_cache, settings.get("fashion_dir"), log=lambda m: print(m, flush=True))


def _finished(run_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(run_dir, *p)) for p in
               (("summary.csv",), ("last.pt",), ("eval-test", "metrics.json"), ("eval-train", "metrics.json")))


# ---------------------------------------------------------------------------------------------- which code ran
CODE_FILE = "code.json"


def harness_provenance(env: dict | None = None) -> dict:
    """The code the runs will execute: ``mskd_fast._provenance.code_provenance()`` evaluated the way a run imports
    the package (``python`` with ``cwd`` and ``PYTHONPATH`` at this checkout)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    code = "import json, mskd_fast._provenance as p; print(json.dumps(p.code_provenance()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"could not read the package's provenance: {done.stderr.strip()}")
    return json.loads(done.stdout)


def code_label(code: dict | None) -> str:
    """``commit[:9] / source sha256[:10]`` (``+ diff sha256[:8]`` when the tree was dirty)."""
    if not code:
        return "unknown (no code.json: trained before runs recorded their code)"
    commit = (code.get("commit") or "no commit")[:9]
    text = f"{commit} / src {str(code.get('source_hash'))[:10]}"
    return text + (f" + diff {str(code.get('diff_hash'))[:8]}" if code.get("dirty") else "")


def read_code(run_dir: str) -> dict | None:
    """The ``code.json`` of a finished run (``None`` when it has none)."""
    path = os.path.join(run_dir, CODE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _recorded_hashes(run_dir: str) -> dict[str, str | None]:
    """The ``source_hash`` the trainer (``args.yaml``) and each evaluation (``metrics.json``) recorded."""
    import yaml

    out = {}
    with open(os.path.join(run_dir, "args.yaml"), encoding="utf-8") as fh:
        out["train"] = ((yaml.safe_load(fh) or {}).get("resolved") or {}).get("code", {}).get("source_hash")
    for sub in ("eval-test", "eval-train"):
        with open(os.path.join(run_dir, sub, "metrics.json"), encoding="utf-8") as fh:
            out[sub] = (json.load(fh).get("code") or {}).get("source_hash")
    return out


def run_job(variant: Variant, seed: int, settings: dict, device: str, out_dir: str,
            synthetic_cache: str | None) -> None:
    """Train one run and evaluate it on test and train-fit (subprocesses, output in ``logs/``); then check that
    the trainer and both evaluations ran the code of ``settings["code"]`` and write it as ``code.json``."""
    runs_dir, logs_dir = os.path.join(out_dir, "runs"), os.path.join(out_dir, "logs")
    name = run_name(variant, seed)
    run_dir = os.path.join(runs_dir, name)
    env = dict(os.environ)
    if settings["threads"]:
        env.update(OMP_NUM_THREADS=str(settings["threads"]), MKL_NUM_THREADS=str(settings["threads"]))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    commands = [
        ["mskd_fast.train", *trainer_argv(variant, settings, seed=seed, device=device, runs_dir=runs_dir,
                                          synthetic_cache=synthetic_cache)],
        ["mskd_fast.evaluate", *evaluate_argv(run_dir, "test", settings, device, synthetic_cache)],
        ["mskd_fast.evaluate", *evaluate_argv(run_dir, "train-fit", settings, device, synthetic_cache)],
    ]
    with open(os.path.join(logs_dir, f"{name}.log"), "w", encoding="utf-8") as log:
        for module, *argv in commands:
            log.write(f"python -m {module} {' '.join(argv)}\n")
            log.flush()
            code = subprocess.run([sys.executable, "-m", module, *argv], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=REPO).returncode
            if code != 0:
                raise RuntimeError(f"run {name}: python -m {module} failed with exit code {code}; see "
                                   f"{os.path.join(logs_dir, name + '.log')}")
    expected = settings.get("code")
    if expected is not None:
        seen = _recorded_hashes(run_dir)
        changed = {k: v for k, v in seen.items() if v != expected["source_hash"]}
        if changed:
            raise RuntimeError(f"run {name}: the package source changed while it ran (expected source hash "
                               f"{expected['source_hash'][:10]}, recorded {changed}); it is not counted")
        from mskd_fast.reports import write_text

        write_text(os.path.join(run_dir, CODE_FILE), json.dumps(expected, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- reading
def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


ALL_METRICS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1", "P@1", "R@1")
LOSS_KEYS = ("loss", "bce", "lsd", "rsd", "ssd", "ud")
DIAG_PREFIXES = ("gnorm_", "gcos_")
DIAG_KEYS = ("train_logit_row_std", "clip_frac")


def read_run(run_dir: str, epochs: int) -> dict:
    """Val metrics, collapse signals, losses and gradient diagnostics (last row of ``summary.csv``; the losses of
    every epoch too), test and train-fit metrics (``eval-*/metrics.json``) and the test per-scale recall of one
    finished run."""
    path = os.path.join(run_dir, "summary.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1] if rows else {}
    stopped = bool(rows) and last.get("epoch") != str(epochs) and _float(last.get("collapse")) == 1
    if not rows or (last.get("epoch") != str(epochs) and not stopped):
        raise RuntimeError(f"{path}: the run did not finish its {epochs} epochs")
    with open(os.path.join(run_dir, "eval-test", "metrics.json")) as fh:
        test = json.load(fh)
    with open(os.path.join(run_dir, "eval-train", "metrics.json")) as fh:
        train = json.load(fh)
    with open(os.path.join(run_dir, "eval-test", "scale_recall.csv"), newline="") as fh:
        scale = [{"bin_lo": _float(r["bin_lo"]), "bin_hi": _float(r["bin_hi"]), "objects": int(r["objects"]),
                  "found": int(r["found"]), "recall": _float(r["recall"])} for r in csv.DictReader(fh)]
    signals = {k: _float(last.get(k)) for k in ("top1_mode_frac", "max_abs_logit", "top1_classes", "collapse",
                                                 "bce_rise")}
    # The flag is the trainer's own: the guard of the code that trained the run (frozen with its source hash).
    # The guard of this checkout (mskd_fast/collapse.py) re-derives it from the recorded signals beside it, so a
    # guard changed during a study shows up as a disagreement in the tables, with both verdicts.
    from mskd_fast.collapse import collapse_reasons

    signals["collapse_trainer"] = signals["collapse"]
    signals["collapse_current_guard"] = float(bool(collapse_reasons(signals)))
    return {
        "test": {k: _float(test[k]) for k in ALL_METRICS if k in test},  # mskd_fast.evaluate's flat metrics.json
        "val": {k: _float(last[k]) for k in ALL_METRICS if k in last},
        "train_fit_mAP": _float(train["mAP"]),
        "losses": {k: _float(last[k]) for k in LOSS_KEYS if k in last},
        "loss_history": [{k: _float(r[k]) for k in LOSS_KEYS if k in r} for r in rows],
        "diagnostics": {k: _float(v) for k, v in last.items() if k.startswith(DIAG_PREFIXES) or k in DIAG_KEYS},
        "sd_opposes_bce": [r.get("sd_opposes_bce", "") for r in rows],
        "signals": signals,
        "train_time_s": sum(_float(r["train_time_s"]) for r in rows),
        "scale_recall": scale,
        "val_history": [_float(r.get("mAP")) for r in rows],
        "stopped_epoch": int(last["epoch"]) if stopped else None,  # --stop-on-collapse ended it there
        "code": read_code(run_dir),
    }


# ---------------------------------------------------------------------------------------------- statistics
def choose_iota(val_map: dict[float, list[float]], paper_iota: float = PAPER_IOTA) -> dict:
    """The documented rule: best mean val mAP over the seeds, except that ``paper_iota`` is kept when its mean
    is within one standard deviation (of the best iota's seeds) of the best mean. Returns the decision."""
    stats = {iota: mean_std(v) for iota, v in val_map.items()}
    best = max(stats, key=lambda i: stats[i][0])
    chosen, why = best, "best mean val mAP"
    if paper_iota in stats and best != paper_iota:
        gap = stats[best][0] - stats[paper_iota][0]
        if not math.isnan(stats[best][1]) and gap <= stats[best][1]:
            chosen, why = paper_iota, f"paper's value kept: {gap:.2f} below the best, within its std"
    return {"chosen": chosen, "best": best, "why": why,
            "val_mAP": {f"{i:g}": {"mean": m, "std": s} for i, (m, s) in stats.items()}}


def aggregate(runs: list[dict], variants: list[Variant]) -> list[dict]:
    """One entry per variant: the per-seed runs and their mean/std of every reported number."""
    out = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v.name]
        if mine:
            out.append({"variant": v, "runs": mine})
    return out


def test_table(groups: list[dict]) -> str:
    base = next((g for g in groups if g["variant"].name == VANILLA.name), None)
    head = ["run", "seeds", *METRICS, "mAP vs vanilla", "train-fit mAP", "train - test mAP", "collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for g in groups:
        rs = g["runs"]
        delta = "-"
        if base is not None and g is not base:
            d = mean_std([r["test"]["mAP"] for r in rs])[0] - mean_std([r["test"]["mAP"] for r in base["runs"]])[0]
            delta = f"{d:+.2f}"
        collapsed = sum(1 for r in rs if r["signals"]["collapse"] == 1)
        gap = [r["train_fit_mAP"] - r["test"]["mAP"] for r in rs]
        lines.append("| " + " | ".join([g["variant"].label, str(len(rs)),
                                         *(_pm([r["test"][k] for r in rs]) for k in METRICS), delta,
                                         _pm([r["train_fit_mAP"] for r in rs]), _pm(gap),
                                         f"{collapsed}/{len(rs)}"]) + " |")
    return "\n".join(lines) + "\n"


def val_table(groups: list[dict]) -> str:
    head = ["run", "seeds", "val mAP", "val P@1", "val CF1", "final BCE", "top-1 mode fraction (val)",
            "max abs logit (val)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for g in groups:
        rs = g["runs"]
        lines.append("| " + " | ".join([g["variant"].label, str(len(rs)), _pm([r["val"]["mAP"] for r in rs]),
                                         _pm([r["val"]["P@1"] for r in rs]), _pm([r["val"]["CF1"] for r in rs]),
                                         _pm([r["losses"]["bce"] for r in rs], 3),
                                         _pm([r["signals"]["top1_mode_frac"] for r in rs]),
                                         _pm([r["signals"]["max_abs_logit"] for r in rs], 1)]) + " |")
    return "\n".join(lines) + "\n"


def scale_table(groups: list[dict]) -> str:
    ref = groups[0]["runs"][0]["scale_recall"]
    head = ["sqrt(area) px", "objects", *(g["variant"].label for g in groups)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for k, row in enumerate(ref):
        if row["objects"] == 0:
            continue
        cells = [f"[{row['bin_lo']:g}, {row['bin_hi']:g})", str(row["objects"])]
        cells += [_pm([r["scale_recall"][k]["recall"] for r in g["runs"] if k < len(r["scale_recall"])])
                  for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- writing
def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # e.g. run from a `git archive` snapshot
        commit = os.environ.get("MSKD_FAST_COMMIT", "unknown (not a git checkout; set MSKD_FAST_COMMIT)")
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return {"device": device, "device_name": name, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def settings_text(profile: str, settings: dict, seeds: list[int]) -> str:
    from mskd_fast.data.datasets import synthetic_val_size

    s = settings
    kwargs = f" ({', '.join(s['model_kwargs'])})" if s["model_kwargs"] else ""
    n_val = synthetic_val_size(s["synthetic_size"])
    fashion_suite = s.get("suite") in ("fashion", "schedule")
    init = "pretrained here on single Fashion-MNIST items" if fashion_suite else "random init"
    data = ("fashion-multi (10 classes, 1-4 Fashion-MNIST items per image, items 50,000-59,999 for train, the "
            "official test items for test)" if fashion_suite else "synthetic dataset (20 classes)")
    return (
        f"- profile `{profile}`: timm `{s['model']}`{kwargs}, {init}, {s['img_size']} px, batch "
        f"{s['batch_size']}, {s['epochs']} epochs, SGD momentum 0.9, head LR "
        f"{'calibrated on val (phase 0)' if s['lr'] is None else s['lr']} (cosine, {s['warmup_epochs']} warm-up "
        f"epochs), weight decay {s.get('weight_decay') or 5e-4:g}, "
        f"RandAugment {'on' if s['randaugment'] else 'off'}, {'bf16 autocast' if s['amp'] else 'float32'}, "
        f"loader {s['loader']}, {s['threads'] or 'all'} thread(s) per run, {s['jobs']} run(s) at a time; "
        f"seeds {', '.join(map(str, seeds))}\n"
        f"- data: {data} generated at {s['synthetic_img_size']} px: train-fit "
        f"{s['synthetic_size'] - n_val} / val {n_val} (the last 20 % of train) / test {s['synthetic_test_size']}; "
        f"each run is evaluated on val {'after every epoch' if s.get('eval_interval') == 1 else 'after its last epoch'}"
        f" (trainer), then on test and train-fit (evaluate)\n"
    )


def write_outputs(out_dir: str, runs: list[dict], variants: list[Variant], profile: str, settings: dict,
                  seeds: list[int], device: str, command: str, ablations: bool) -> dict:
    """Write results.md, results.json and scale_recall.png; returns the JSON document."""
    from mskd_fast.metrics import plot_scale_recall
    from mskd_fast.reports import write_text

    info = machine_info(device)
    groups = aggregate(runs, variants)
    iota = None
    if ablations:
        val_map = {float(v.flags[-1]): [r["val"]["mAP"] for r in runs if r["variant"] == v.name] for v in STABLE_IOTA}
        if all(val_map.values()):
            iota = choose_iota(val_map)
    curves = {}
    for g in groups[:3]:
        bins = g["runs"][0]["scale_recall"]
        curves[g["variant"].label] = [
            {**b, "recall": mean_std([r["scale_recall"][k]["recall"] for r in g["runs"]])[0]}
            for k, b in enumerate(bins)]
    plot_scale_recall(curves, os.path.join(out_dir, "scale_recall.png"))
    md = [
        "# Accuracy study: vanilla vs MSKD on the synthetic dataset", "",
        f"- machine: {info['device_name']} ({info['device']}); host CPU {info['cpu']}, {info['cpu_count']} cores; "
        f"python {info['python']}, torch {info['torch']}; commit {info['commit']}; {info['date']}",
        settings_text(profile, settings, seeds).rstrip("\n"),
        "- MSKD: S=4 random crops, T=4, omega=0.5, gamma+=0.25, gamma-=1, 2 graph layers, kappa=2, lambda=2; "
        "recipes per SPEC 6 (stable: MBD divergence, R-SD teacher scale match; paper: as written, iota=1.5)",
        f"- command: `{command}`", "- every cell: mean ± sample standard deviation over the seeds", "",
        "## Test split (percent; last epoch's model)", "", test_table(groups),
        "collapsed = runs the trainer's collapse guard flagged at its last evaluation.", "",
        "## Validation split (percent; used for every choice)", "", val_table(groups),
    ]
    if iota is not None:
        md += ["## iota decision (rule: best mean val mAP; the paper's 1.5 is kept when within one std of the best)",
               "", "| iota | val mAP |", "|---:|---:|"]
        md += [f"| {k} | {v['mean']:.2f} ± {v['std']:.2f} |" for k, v in iota["val_mAP"].items()]
        md += ["", f"chosen: **iota = {iota['chosen']:g}** ({iota['why']}; best mean: {iota['best']:g})", ""]
    md += ["## Recall by object scale on test (percent; sqrt(object area) at the training resolution)", "",
           scale_table(groups), "Plot: `scale_recall.png` (mean over seeds of the first three rows).", ""]
    write_text(os.path.join(out_dir, "results.md"), "\n".join(md))
    doc = {"profile": profile, "settings": {**settings, "model_kwargs": list(settings["model_kwargs"])},
           "seeds": seeds, "machine": info, "command": command, "iota_decision": iota,
           "variants": [{"name": v.name, "label": v.label, "flags": list(v.flags)} for v in variants],
           "runs": runs}
    write_text(os.path.join(out_dir, "results.json"), json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")
    return doc


# ---------------------------------------------------------------------------------------------- main
def _reusable(run_dir: str, code: dict | None, reuse_other_code: bool) -> bool:
    """A finished run is reused when it recorded the current source hash (``code``), or with
    ``reuse_other_code`` whatever code trained it (the tables then name its code). Without ``code`` (a study
    that does not track its code) every finished run is reused."""
    if not _finished(run_dir):
        return False
    if code is None or reuse_other_code:
        return True
    recorded = read_code(run_dir)
    return recorded is not None and recorded.get("source_hash") == code["source_hash"]


def _pending(variants, seeds, runs_dir: str, overwrite: bool, code: dict | None = None,
             reuse_other_code: bool = False) -> tuple[list, list[str]]:
    """The ``(variant, seed)`` jobs still to train and the names of finished runs that are reused (only those
    trained by the current code, :func:`_reusable`; the others are trained again)."""
    jobs, reused = [], []
    for v in variants:
        for seed in seeds:
            run_dir = os.path.join(runs_dir, run_name(v, seed))
            if _reusable(run_dir, code, reuse_other_code) and not overwrite:
                reused.append(run_name(v, seed))
                continue
            if os.path.exists(run_dir):  # unfinished (or --overwrite): train it again from scratch
                shutil.rmtree(run_dir)
            jobs.append((v, seed))
    return jobs, reused


def train_jobs(jobs: list, settings: dict, device: str, out_dir: str, synthetic_cache: str | None) -> list[str]:
    """Train ``jobs`` (``settings["jobs"]`` at a time); returns the failure messages (the others still finish)."""
    failures = []

    def work(job):
        v, seed = job
        t0 = time.perf_counter()
        try:
            run_job(v, seed, settings, device, out_dir, synthetic_cache)
        except RuntimeError as exc:
            failures.append(str(exc))
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        print(f"done {run_name(v, seed)} in {time.perf_counter() - t0:.0f}s", flush=True)

    with ThreadPoolExecutor(max_workers=settings["jobs"]) as pool:
        list(pool.map(work, jobs))
    return failures


def collect(variants, seeds, settings: dict, runs_dir: str) -> list[dict]:
    """The finished runs of ``variants`` x ``seeds`` (read with :func:`read_run`)."""
    runs = []
    for v in variants:
        for seed in seeds:
            run_dir = os.path.join(runs_dir, run_name(v, seed))
            if _finished(run_dir):
                epochs = settings["epochs"] * getattr(v, "epochs_factor", 1)
                runs.append({"variant": v.name, "seed": seed, "run_dir": run_dir, **read_run(run_dir, epochs)})
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns 0, or 1 when a run failed (the others still finish and are reported)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profile, settings, device = resolve_settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    out_dir = os.path.abspath(args.output)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        parser.error(f"--output {out_dir} exists and is not a folder")
    runs_dir, logs_dir = os.path.join(out_dir, "runs"), os.path.join(out_dir, "logs")
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(logs_dir, exist_ok=True)
    command = "python bench/accuracy_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        settings["code"] = code = harness_provenance()
    except RuntimeError as exc:
        parser.error(str(exc))
    if code.get("dirty") and not args.allow_dirty:
        parser.error(f"the package source in {REPO} has uncommitted changes (mskd_fast/, kernels/, csrc/, setup.py, "
                     "pyproject.toml): commit them, or pass --allow-dirty to record the diff's hash with every run")
    print(f"code: {code_label(code)} (source sha256 {code['source_hash']})", flush=True)
    if settings.get("suite") == "fashion":
        return main_fashion(args, profile, settings, device, out_dir, command)
    if settings.get("suite") == "schedule":
        return main_schedule(args, profile, settings, device, out_dir, command)
    variants = study_variants(args.ablations)
    jobs, reused = _pending(variants, args.seeds, runs_dir, args.overwrite, code, args.reuse_other_code)
    print(f"accuracy study: profile {profile} on {device}; {len(variants)} variants x {len(args.seeds)} seeds; "
          f"{len(jobs)} runs to train, {len(reused)} reused", flush=True)
    print(settings_text(profile, settings, args.seeds), end="", flush=True)
    print(f"data: {prepare_dataset(settings, args.synthetic_cache)}", flush=True)
    failures = train_jobs(jobs, settings, device, out_dir, args.synthetic_cache)
    runs = collect(variants, args.seeds, settings, runs_dir)
    if runs:
        write_outputs(out_dir, runs, variants, profile, settings, args.seeds, device, command, args.ablations)
        print("\n" + test_table(aggregate(runs, variants)), end="")
        print(f"\nwrote {os.path.join(out_dir, 'results.md')}, results.json and scale_recall.png", flush=True)
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------- real objects
def main_fashion(args, profile: str, settings: dict, device: str, out_dir: str, command: str) -> int:
    """The real-object study (bench/study_fashion.py): pretraining, phase 1, the val rules, phase 2, the decision."""
    settings["fashion_dir"] = args.fashion_dir
    runs_dir = os.path.join(out_dir, "runs")
    seeds = list(args.seeds)
    print(f"accuracy study: profile {profile} on {device} (real objects, bench/study_fashion.py)", flush=True)
    print(settings_text(profile, settings, seeds), end="", flush=True)
    print(f"data: {prepare_dataset(settings, args.synthetic_cache)}", flush=True)
    settings["initial_checkpoint"] = prepare_backbone(settings, args.synthetic_cache)
    failures: list[str] = []

    def run(variants, run_seeds, phase: str) -> None:
        jobs, reused = _pending(variants, run_seeds, runs_dir, args.overwrite, settings["code"],
                                args.reuse_other_code)
        print(f"{phase}: {len(variants)} variants x {len(run_seeds)} seeds; {len(jobs)} runs to train, "
              f"{len(reused)} reused", flush=True)
        failures.extend(train_jobs(jobs, settings, device, out_dir, args.synthetic_cache))

    def val(variant, pool=None) -> list[float]:
        return [r["val"]["mAP"] for r in collect([variant], pool or seeds_all, settings, runs_dir)]

    seeds_all = seeds if args.smoke else sorted(set(seeds) | set(fashion.EXTRA_SEEDS))
    ud_grid, ssd_grid = (fashion.UD[1:2], fashion.SSD[1:2]) if args.smoke else (fashion.UD, fashion.SSD)
    phase1 = [fashion.VANILLA, fashion.STABLE, *ud_grid, *ssd_grid] if args.smoke else list(fashion.PHASE1)
    run(phase1, seeds, "phase 1")
    ud_best = next(v for v in ud_grid if v.name == fashion.best_of({v.name: val(v, seeds) for v in ud_grid}))
    ssd_best = next(v for v in ssd_grid if v.name == fashion.best_of({v.name: val(v, seeds) for v in ssd_grid}))
    candidates1 = [v for v in phase1 if v.kind == "mskd" and (v not in ssd_grid or v == ssd_best)]
    best1 = fashion.choose_default({v.name: _candidate(v, seeds, settings, runs_dir) for v in candidates1})
    best_variant = next((v for v in candidates1 if v.name == best1["chosen"]), fashion.STABLE)
    phase2 = fashion.phase2(best_variant, ssd_best)[:1] if args.smoke else fashion.phase2(best_variant, ssd_best)
    run(phase2, seeds, "phase 2 (ablations of the best MSKD candidate, S-SD alone: batch teacher, 2x epochs)")
    same_budget = [v for v in [*phase1, *phase2] if v.epochs_factor == 1]
    ranked = sorted((v for v in same_budget if v.kind != "vanilla"), key=lambda v: -fashion.mean_std(val(v, seeds))[0])
    extra = [fashion.VANILLA, *ranked[:2]]
    if not args.smoke:
        run(extra, list(fashion.EXTRA_SEEDS), "extra seeds (vanilla and the two best by val mAP)")
    mskd_all = [v for v in same_budget if v.kind == "mskd" and (v not in ssd_grid or v == ssd_best)]
    decision = fashion.choose_default({v.name: _candidate(v, seeds_all, settings, runs_dir) for v in mskd_all})
    variants = [*phase1, *phase2]
    if args.lr_check and decision["chosen"] is not None:
        chosen = next(v for v in mskd_all if v.name == decision["chosen"])
        check = fashion.lr_check(chosen, args.lr_check)
        run(check, seeds, f"LR check (vanilla and the default at LR {', '.join(map(str, args.lr_check))})")
        variants += check
    runs = collect(variants, seeds_all, settings, runs_dir)
    decisions = {"ud_c": ud_best.name, "ssd_lambda": ssd_best.name, "phase1_best": best1, "default": decision,
                 "extra_seeds": [v.name for v in extra]}
    if runs:
        write_outputs_fashion(out_dir, runs, variants, decisions, profile, settings, seeds_all, device, command)
        print(f"\nwrote {os.path.join(out_dir, 'results.md')} and results.json; default: {decision['chosen']}",
              flush=True)
    return 1 if failures else 0


def _candidate(variant, seeds, settings: dict, runs_dir: str) -> dict:
    rs = collect([variant], seeds, settings, runs_dir)
    return {"val": [r["val"]["mAP"] for r in rs], "collapsed": [int(r["signals"]["collapse"] == 1) for r in rs]}


def write_outputs_fashion(out_dir: str, runs: list[dict], variants: list, decisions: dict, profile: str,
                          settings: dict, seeds: list[int], device: str, command: str) -> dict:
    """results.md (every table of the real-object study) and results.json."""
    from mskd_fast.reports import write_text

    info = machine_info(device)
    groups = [(v, [r for r in runs if r["variant"] == v.name]) for v in variants]
    groups = [(v, rs) for v, rs in groups if rs]
    same = [(v, rs) for v, rs in groups if v.epochs_factor == 1 and v.kind != "lr-check"]
    vanilla = next((rs for v, rs in groups if v.kind == "vanilla"), [])
    label = {v.name: v.label for v in variants}
    d = decisions["default"]
    best1 = decisions["phase1_best"]["chosen"]
    ranking = "\n".join(f"| {label.get(n, n)} | {m:.2f} | {c} |" for n, m, c in d["ranking"])
    md = [
        "# Accuracy study: real objects (fashion-multi), pretrained backbone", "",
        f"- machine: {info['device_name']} ({info['device']}); host CPU {info['cpu']}, {info['cpu_count']} cores; "
        f"python {info['python']}, torch {info['torch']}; commit {info['commit']}; {info['date']}",
        settings_text(profile, settings, seeds).rstrip("\n"),
        f"- backbone: `{os.path.basename(settings['initial_checkpoint'])}` (bench/fashion_pretrain.py: single items of "
        "the pretrain pool, classifier dropped), fine-tuned with backbone LR x0.1, weight decay "
        f"{settings.get('weight_decay')}",
        f"- command: `{command}`", "- every cell: mean ± sample standard deviation over the seeds run", "",
        "## Test split (percent; the last epoch's model)", "", fashion.test_table(same, vanilla),
        "collapsed = seeds the trainer's collapse guard flagged at its final (val) evaluation.", "",
        "## Validation split (percent; every choice is made here)", "", fashion.val_table(same),
        "## Gradient diagnostics (last epoch; on the classifier, weighted terms; mskd_fast.diagnostics)", "",
        fashion.diagnostics_table(same),
        "## Decisions (rules in bench/study_fashion.py, written before the runs; val only)", "",
        f"- label-push control weight: **{label[decisions['ud_c']]}**",
        f"- S-SD alone: **{label[decisions['ssd_lambda']]}**",
        f"- best MSKD candidate after phase 1 (its ablations ran in phase 2): **{label.get(best1, best1)}**",
        f"- seeds 4-5 for: {', '.join(label[n] for n in decisions['extra_seeds'])}", "",
        "Default decision (best mean val mAP among MSKD variants without a collapsed seed):", "",
        "| candidate | val mAP | collapsed seeds |", "|---|---:|---:|", ranking, "",
        f"**chosen: {label.get(d['chosen'], d['chosen'])}**", "",
        "## Recall by object size on test (percent of items whose class scored >= 0.5 in its image)", "",
        fashion.scale_table(same), "",
    ]
    lr_rows = [(v, rs) for v, rs in groups if v.kind == "lr-check"]
    if lr_rows:
        base = [(v, rs) for v, rs in same if v.kind == "vanilla" or v.name == d["chosen"]]
        md += ["## LR sensitivity (after the decision; same seeds, only the head LR differs)", "",
               fashion.lr_table(base, lr_rows, settings["lr"]), ""]
    long = [(v, rs) for v, rs in groups if v.epochs_factor != 1]
    if long:
        md += ["## S-SD alone for twice the epochs: is its term bounded?", ""]
        md += [fashion.term_history_table(v, rs) for v, rs in long]
        md += [fashion.test_table(long, []), ""]
    write_text(os.path.join(out_dir, "results.md"), "\n".join(md))
    doc = {"profile": profile, "settings": {**settings, "model_kwargs": list(settings["model_kwargs"])},
           "seeds": seeds, "machine": info, "command": command, "decisions": decisions,
           "variants": [{"name": v.name, "label": v.label, "flags": list(v.flags), "kind": v.kind,
                         "epochs_factor": v.epochs_factor} for v in variants], "runs": runs}
    write_text(os.path.join(out_dir, "results.json"), json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")
    return doc



# ---------------------------------------------------------------------------------------------- the schedule
def main_schedule(args, profile: str, settings: dict, device: str, out_dir: str, command: str) -> int:
    """The schedule study (bench/study_schedule.py): LR calibration, phase 1, stable's fallbacks, ablations and
    extra seeds, the decision; writes results.md, results.json and val_map_per_epoch.png."""
    import study_schedule as sched

    settings["fashion_dir"] = args.fashion_dir
    runs_dir = os.path.join(out_dir, "runs")
    seeds = list(args.seeds)
    smoke = args.smoke
    print(f"accuracy study: profile {profile} on {device} (the paper's schedule in miniature, "
          "bench/study_schedule.py)", flush=True)
    print(settings_text(profile, settings, seeds), end="", flush=True)
    print(f"data: {prepare_dataset(settings, args.synthetic_cache)}", flush=True)
    settings["initial_checkpoint"] = prepare_backbone(settings, args.synthetic_cache)
    failures: list[str] = []

    def run(variants, run_seeds, phase: str) -> None:
        jobs, reused = _pending(variants, run_seeds, runs_dir, args.overwrite, settings["code"],
                                args.reuse_other_code)
        print(f"{phase}: {len(variants)} variants x {len(run_seeds)} seeds; {len(jobs)} runs to train, "
              f"{len(reused)} reused", flush=True)
        failures.extend(train_jobs(jobs, settings, device, out_dir, args.synthetic_cache))

    def cand(variants, pool) -> dict:
        return {v.name: _candidate(v, pool, settings, runs_dir) for v in variants}

    # Phase 0: the head LR, vanilla only.
    calib = sched.calibration()[:2] if smoke else sched.calibration()
    run(calib, seeds[:1], "phase 0 (head LR, vanilla, first seed)")
    val_by_lr = {}
    for v in calib:
        rs = collect([v], seeds[:1], settings, runs_dir)
        val_by_lr[float(v.flags[-1])] = rs[0]["val"]["mAP"] if rs else math.nan
    lr_choice = sched.choose_lr(val_by_lr)
    if lr_choice["chosen"] is None:
        print("error: no calibration run finished; the study cannot go on", file=sys.stderr, flush=True)
        return 1
    lr = lr_choice["chosen"]
    settings["lr"] = lr
    print(f"head LR: {lr:g} (rule 0; val mAP by LR: "
          + ", ".join(f"{k:g}: {m:.2f}" for k, m in val_by_lr.items()) + ")", flush=True)

    # Phase 1.
    phase1 = [sched.VANILLA, sched.DEFAULT, sched.STABLE] if smoke else list(sched.PHASE1)
    run(phase1, seeds, f"phase 1 (at head LR {lr:g})")
    stable_rows = collect([sched.STABLE], seeds, settings, runs_dir)
    stable_collapsed = any(r["signals"]["collapse"] == 1 for r in stable_rows)

    # Phase 2: can the full method train at all under this schedule?
    phase2: list = []
    stable_highest_ok = None
    if stable_collapsed or smoke:
        phase2.append(sched.STABLE_BN_BATCH)
        why = "stable collapsed" if stable_collapsed else "smoke test"
        run([sched.STABLE_BN_BATCH], seeds, f"phase 2 ({why}: a batch-statistics S-SD teacher)")
        for lower in sched.lower_lrs(lr)[:1] if smoke else sched.lower_lrs(lr):
            v = sched.stable_at(lower)
            phase2.append(v)
            run([v], seeds, f"phase 2 (stable at head LR {lower:g})")
            rows = collect([v], seeds, settings, runs_dir)
            if rows and not any(r["signals"]["collapse"] == 1 for r in rows):
                stable_highest_ok = v.name
                break

    # Phase 3: the ablations of the best MSKD variant, then the extra seeds.
    mskd_same = [v for v in [*phase1, *phase2] if v.kind == "mskd"]
    best = sched.best_mskd(cand([v for v in mskd_same if "--lr" not in v.flags], seeds))
    best_variant = next((v for v in mskd_same if v.name == best), None)
    ablations = fashion.ablations(best_variant) if best_variant is not None else []
    if smoke:
        ablations = ablations[:1]
    if ablations:
        run(ablations, seeds, f"phase 3 (ablations of {best})")
    same_budget = [v for v in [*phase1, *phase2, *ablations] if "--lr" not in v.flags]
    ranked = sorted((v for v in same_budget if v.kind != "vanilla"),
                    key=lambda v: -fashion.mean_std([r["val"]["mAP"] for r in collect([v], seeds, settings,
                                                                                         runs_dir)])[0])
    extra = [sched.VANILLA, *ranked[:2]]
    seeds_all = seeds if smoke else sorted(set(seeds) | set(sched.EXTRA_SEEDS))
    if not smoke:
        run(extra, list(sched.EXTRA_SEEDS), "phase 3 (seeds 4-5 of vanilla and the two best by val mAP)")

    # Rule 3.
    candidates = [v for v in [*phase1, *phase2, *ablations] if v.kind == "mskd" and "--lr" not in v.flags]
    vanilla_val = [r["val"]["mAP"] for r in collect([sched.VANILLA], seeds_all, settings, runs_dir)]
    decision = sched.decide(cand(candidates, seeds_all), vanilla_val, sched.DEFAULT.name)
    variants = [*calib, *phase1, *phase2, *ablations]
    runs = collect(variants, seeds_all, settings, runs_dir)
    decisions = {"lr": lr_choice, "stable_collapsed": stable_collapsed, "stable_highest_ok": stable_highest_ok,
                 "best_for_ablations": best, "extra_seeds": [v.name for v in extra], "default": decision}
    if runs:
        write_outputs_schedule(out_dir, runs, variants, decisions, profile, settings, seeds_all, device, command)
        print(f"\nwrote {os.path.join(out_dir, 'results.md')}, results.json and val_map_per_epoch.png; default "
              f"{'becomes ' + str(decision['default']) if decision['changes'] else 'unchanged'}", flush=True)
    return 1 if failures else 0


def write_outputs_schedule(out_dir: str, runs: list[dict], variants: list, decisions: dict, profile: str,
                           settings: dict, seeds: list[int], device: str, command: str) -> dict:
    """results.md (every table of the schedule study), results.json and the per-epoch val mAP plot."""
    import study_schedule as sched

    from mskd_fast.reports import write_text

    info = machine_info(device)
    groups = [(v, [r for r in runs if r["variant"] == v.name]) for v in variants]
    groups = [(v, rs) for v, rs in groups if rs]
    main_rows = [(v, rs) for v, rs in groups if v.kind != "calibration"]
    vanilla = next((rs for v, rs in groups if v.kind == "vanilla"), [])
    label = {v.name: v.label for v in variants}
    d, lr = decisions["default"], decisions["lr"]
    codes = sorted({code_label(r.get("code")) for r in runs})
    plot = sched.plot_val_curves([(v, rs) for v, rs in main_rows if "--lr" not in v.flags],
                                 os.path.join(out_dir, "val_map_per_epoch.png"))
    ranking = "\n".join(f"| {label.get(n, n)} | {m:.2f} | {c} |" for n, m, c in d["ranking"])
    verdict = (f"**the default becomes {label.get(d['default'], d['default'])}**" if d["changes"] and
               d["default"] != sched.DEFAULT.name else
               "**the default recipe stays `step`**" + (" (it is the best variant and clears the margin)"
                                                        if d["changes"] else " (no MSKD variant clears the margin)"))
    md = [
        "# Accuracy study: the paper's schedule in miniature (fashion-multi, pretrained backbone)", "",
        f"- machine: {info['device_name']} ({info['device']}); host CPU {info['cpu']}, {info['cpu_count']} cores; "
        f"python {info['python']}, torch {info['torch']}; harness commit {info['commit']}; {info['date']}",
        "- code that trained the rows (commit / package source sha256): " + "; ".join(codes)
        + (" (one version for every row)" if len(codes) == 1 else " (**several versions: see the code column**)"),
        settings_text(profile, settings, seeds).rstrip("\n"),
        f"- backbone: `{os.path.basename(settings['initial_checkpoint'])}` (bench/fashion_pretrain.py), fine-tuned "
        f"with backbone LR x0.1",
        f"- command: `{command}`", "- every cell: mean ± sample standard deviation over the seeds run",
        "- rules: bench/study_schedule.py (written before the runs); collapsed = the trainer's own guard", "",
        "## Phase 0: head LR (vanilla, seed 1, val mAP after the last epoch)", "",
        sched.lr_calibration_table(lr), "",
        "## Test split (percent; the last epoch's model)", "", fashion.test_table(main_rows, vanilla),
        "## Validation split (percent; every choice is made here)", "", fashion.val_table(main_rows),
        "## Code and collapse verdicts per row", "", sched.code_table(main_rows, code_label),
        "## Gradient diagnostics (last epoch; on the classifier, weighted terms; mskd_fast.diagnostics)", "",
        fashion.diagnostics_table(main_rows),
        "## Validation mAP per epoch (mean over seeds)", "", sched.curve_table(main_rows),
        f"Plot: `{os.path.basename(plot)}`.", "",
        "## Decisions (val only)", "",
        f"- head LR: **{lr['chosen']:g}** (best {lr['best']:g}; a lower LR within {sched.LR_TIE} mAP is preferred)",
        f"- `stable` collapsed at that LR (any seed): {'yes' if decisions['stable_collapsed'] else 'no'}"
        + (f"; highest LR without a collapsed seed: {label.get(decisions['stable_highest_ok'])}"
           if decisions["stable_highest_ok"] else ""),
        f"- ablations ran for: {label.get(decisions['best_for_ablations'], decisions['best_for_ablations'])}",
        f"- seeds 4-5 for: {', '.join(label[n] for n in decisions['extra_seeds'])}"
        + (" (not run: smoke test)" if max(seeds) < max(sched.EXTRA_SEEDS) else ""), "",
        "Rule 3: the best MSKD variant without a collapsed seed becomes the default only if its mean val mAP beats "
        "vanilla's by more than one standard deviation (the larger of the two).", "",
        "| candidate | val mAP | collapsed seeds |", "|---|---:|---:|", ranking, "",
        f"best: {label.get(d['best'], d['best'])}; margin over vanilla {d['margin']:+.2f} mAP, needed > "
        f"{d['threshold']:.2f}: {verdict}", "",
        "## Recall by object size on test (percent of items whose class scored >= 0.5 in its image)", "",
        fashion.scale_table(main_rows), "",
    ]
    write_text(os.path.join(out_dir, "results.md"), "\n".join(md))
    doc = {"profile": profile, "settings": {**settings, "model_kwargs": list(settings["model_kwargs"])},
           "seeds": seeds, "machine": info, "command": command, "decisions": decisions,
           "variants": [{"name": v.name, "label": v.label, "flags": list(v.flags), "kind": v.kind}
                        for v in variants], "runs": runs}
    write_text(os.path.join(out_dir, "results.json"), json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")
    return doc


if __name__ == "__main__":
    raise SystemExit(main())
