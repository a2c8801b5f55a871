"""Vanilla vs MSKD accuracy study on the built-in synthetic dataset (the analogue of the paper's Table 1,
Table 3 with ``--ablations``, and Figure 5).

Every run is a plain ``python -m mskd_fast.train`` run (called in-process through ``mskd_fast.train.main``)
with the same model, data, budget and ``--seed``; only the method flags differ. Each run trains from random
initialisation and is evaluated once, after its last epoch, on the synthetic test split. The study then
reads each run's ``summary.csv`` (last row: the final evaluation) and ``scale_recall.csv`` and writes:

* ``results.md``  - settings, the side-by-side table (mAP, P@1, R@1, CF1, OF1, OP, OR, CP, CR, train time),
  the per-scale recall table of every run, the machine and the command;
* ``results.json`` - the same numbers, machine-readable;
* ``scale_recall.png`` - recall by object scale of vanilla vs MSKD (paper Figure 5);
  with ``--ablations`` also ``scale_recall_all.png`` with every run;
* ``runs/NAME/`` - the trainer's run folders (args.yaml, summary.csv, checkpoints, reports);
  ``logs/NAME.log`` - each run's console output.

Profiles (``--profile``; ``auto`` = ``gpu`` on a CUDA device, else ``cpu``):

* ``gpu``: ResNet-18 (timm ``resnet18``, random init), 128 px, synthetic dataset 4,000 train / 1,000 test
  images generated at 128 px, batch 64, 12 epochs, LR 0.1 (1 warm-up epoch, cosine), bf16 autocast,
  ``torch.compile``, 8 loader workers. Sized so that vanilla + MSKD take about 5 minutes on one H100-class
  GPU (an estimate; see docs/ACCURACY.md for whether it has been timed).
* ``cpu``: ResNet-10t (timm ``resnet10t``, random init), 64 px, 640 train / 320 test images generated at
  64 px, batch 32, 5 epochs, LR 0.05 (1 warm-up epoch, cosine), float32; about 8-10 minutes for vanilla +
  MSKD on a shared 2-core CPU.
* ``tiny`` (``--tiny``): a ResNet-10t with channels (8, 16, 32, 64) at 32 px, 64 train / 32 test images,
  batch 16, 1 epoch, torch loader in the main process. A smoke test (CI): it checks that the study runs
  end to end, its numbers mean nothing.

The MSKD runs use the SPEC defaults (S=4 random crops, T=4, omega=0.5, gamma+=0.25, gamma-=1, 2 graph
layers, iota=1.5, kappa=2, lambda=2). Ablations (paper Table 3): MSKD without L-SD, without R-SD, without
S-SD, and with MBD replaced by softmax + KL (``--no-lsd``, ``--no-rsd``, ``--no-ssd``, ``--no-mbd``).

Usage::

    python bench/accuracy_study.py --output study-gpu                # GPU: vanilla + MSKD
    python bench/accuracy_study.py --output study-gpu --ablations    # + the four Table 3 ablations
    python bench/accuracy_study.py --profile cpu --output study-cpu  # CPU budget
    python bench/accuracy_study.py --tiny --output /tmp/smoke        # CI smoke test
"""

from __future__ import annotations

import argparse
import ast
import contextlib
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
from dataclasses import dataclass

PROFILES = {
    "gpu": dict(
        model="resnet18", model_kwargs=(), img_size=128, synthetic_img_size=128, synthetic_size=4000,
        synthetic_test_size=1000, batch_size=64, epochs=12, lr=0.1, warmup_epochs=1, amp=True, workers=8,
        loader="auto",
    ),
    "cpu": dict(
        model="resnet10t", model_kwargs=(), img_size=64, synthetic_img_size=64, synthetic_size=640,
        synthetic_test_size=320, batch_size=32, epochs=5, lr=0.05, warmup_epochs=1, amp=False, workers=1,
        loader="auto",
    ),
    "tiny": dict(
        model="resnet10t", model_kwargs=("channels=(8,16,32,64)", "stem_width=8"), img_size=32,
        synthetic_img_size=32, synthetic_size=64, synthetic_test_size=32, batch_size=16, epochs=1, lr=0.05,
        warmup_epochs=0, amp=False, workers=0, loader="torch",
    ),
}

METRICS = ("mAP", "P@1", "R@1", "CF1", "OF1")
MORE_METRICS = ("OP", "OR", "CP", "CR")


@dataclass(frozen=True)
class Variant:
    """One training run of the study: its folder name, table label and the trainer flags that make it."""

    name: str
    label: str
    flags: tuple[str, ...]


VANILLA = Variant("vanilla", "Vanilla (BCE)", ("--method", "vanilla"))
MSKD = Variant("mskd", "MSKD", ("--method", "mskd"))
ABLATIONS = (
    Variant("mskd-no-lsd", "MSKD w/o L-SD", ("--method", "mskd", "--no-lsd")),
    Variant("mskd-no-rsd", "MSKD w/o R-SD", ("--method", "mskd", "--no-rsd")),
    Variant("mskd-no-ssd", "MSKD w/o S-SD", ("--method", "mskd", "--no-ssd")),
    Variant("mskd-no-mbd", "MSKD w/o MBD (softmax+KL)", ("--method", "mskd", "--no-mbd")),
)


# ---------------------------------------------------------------------------------------------- settings
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/accuracy_study.py",
        description="Train vanilla and MSKD (optionally the Table 3 ablations) on the synthetic dataset with the "
                    "same budget and seed; write a side-by-side table and the per-scale recall plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, help="study folder (results.md, results.json, plots, runs/, logs/)")
    p.add_argument("--profile", choices=("auto", *PROFILES), default="auto",
                   help="budget: auto = gpu on a CUDA device, else cpu (see the module docstring)")
    p.add_argument("--tiny", action="store_true", help="same as --profile tiny (CPU smoke test)")
    p.add_argument("--ablations", action="store_true",
                   help="also train MSKD without L-SD, R-SD, S-SD and with softmax+KL instead of MBD")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=42, help="trainer --seed of every run (init, crops, data order)")
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    p.add_argument("--synthetic-cache", default=None,
                   help="synthetic dataset cache folder (default: the trainer's, $MSKD_FAST_CACHE or ~/.cache)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete this study's run folders in --output (runs/NAME) before training them again")
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
    if settings["warmup_epochs"] >= settings["epochs"]:
        settings["warmup_epochs"] = 0
    if settings["amp"] and device.type != "cuda":
        settings["amp"] = False  # bf16 autocast on CPU is slower than float32 on most CPUs
    return profile, settings, str(device)


def trainer_argv(variant: Variant, settings: dict, *, seed: int, device: str, runs_dir: str,
                 synthetic_cache: str | None) -> list[str]:
    """The ``python -m mskd_fast.train`` arguments of one run (every budget flag explicit)."""
    s = settings
    argv = [
        "--dataset", "synthetic",
        "--synthetic-size", str(s["synthetic_size"]), "--synthetic-test-size", str(s["synthetic_test_size"]),
        "--synthetic-img-size", str(s["synthetic_img_size"]),
        "--model", s["model"], "--img-size", str(s["img_size"]), "-b", str(s["batch_size"]),
        "--epochs", str(s["epochs"]), "--lr", str(s["lr"]), "--warmup-epochs", str(s["warmup_epochs"]),
        "--loader", s["loader"], "-j", str(s["workers"]),
        "--eval-interval", "0", "--seed", str(seed), "--device", device, "--no-progress",
        "--output", runs_dir, "--experiment", variant.name,
    ]
    if s["model_kwargs"]:
        argv += ["--model-kwargs", *s["model_kwargs"]]
    if s["amp"]:
        argv.append("--amp")
    if synthetic_cache:
        argv += ["--synthetic-cache", synthetic_cache]
    return argv + list(variant.flags)


# ---------------------------------------------------------------------------------------------- running
def prepare_dataset(settings: dict, synthetic_cache: str | None) -> str:
    """Generate (or find in the cache) the synthetic dataset of ``settings`` before the first run, so that
    no run's wall time includes the generation. Returns a one-line summary."""
    from mskd_fast.data import SyntheticConfig, load_index

    config = SyntheticConfig(train_size=settings["synthetic_size"], test_size=settings["synthetic_test_size"],
                             img_size=settings["synthetic_img_size"], cache_dir=synthetic_cache)
    return "; ".join(load_index("synthetic", None, split, synthetic=config).summary() for split in ("train", "test"))


def _model_kwargs(items) -> dict:
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        out[key] = ast.literal_eval(raw)
    return out


def warm_up(settings: dict, device: str, steps: int = 2) -> None:
    """A few eager vanilla and MSKD steps of the profile's model on random data (not timed, weights thrown
    away), so that one-time costs of the process (CUDA context, cuDNN/oneDNN set-up, lazy imports) are not
    charged to whichever run comes first."""
    import torch

    from mskd_fast.losses import MSKDLoss
    from mskd_fast.models import create_model, eval_twin
    from mskd_fast.step import StepConfig, TrainStep, build_optimizer

    dev = torch.device(device)
    b, size, classes = settings["batch_size"], settings["img_size"], 20
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=gen).to(dev).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(b, classes, generator=gen) < 0.15).float().to(dev)
    amp = torch.bfloat16 if settings["amp"] else None
    for method in ("vanilla", "mskd"):
        on = method == "mskd"
        use = dict(use_lsd=on, use_rsd=on, use_ssd=on)
        model, _ = create_model(settings["model"], classes, img_size=size, **_model_kwargs(settings["model_kwargs"]))
        model = model.to(dev).to(memory_format=torch.channels_last)
        teacher = eval_twin(model)
        model.train()
        step = TrainStep(model, teacher, MSKDLoss(**use), build_optimizer(model, 1e-3), None,
                         StepConfig(method=method, amp_dtype=amp, **use), torch.Generator(device=dev).manual_seed(0))
        for _ in range(steps):
            step(images, targets, images)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Tee:
    """A text stream writing to several streams (the console and a run's log file)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False


def run_trainer(argv: list[str], log_path: str, device: str) -> tuple[int, float, float | None]:
    """Run ``mskd_fast.train.main(argv)`` in this process, its output teed into ``log_path``.

    Returns ``(exit code, wall seconds, peak CUDA memory in MiB or None)``. ``torch._dynamo`` is reset
    first, so that compiled graphs of earlier runs neither count against the recompile limit nor are reused.
    """
    import torch

    from mskd_fast.train import main as train_main

    torch._dynamo.reset()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("python -m mskd_fast.train " + " ".join(argv) + "\n")
        with contextlib.redirect_stdout(_Tee(sys.stdout, log)), contextlib.redirect_stderr(_Tee(sys.stderr, log)):
            try:
                code = train_main(argv)
            except SystemExit as exc:  # argparse errors exit with status 2
                code = exc.code if isinstance(exc.code, int) else 2
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return int(code or 0), wall, peak


# ---------------------------------------------------------------------------------------------- reading
def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_summary(run_dir: str, epochs: int) -> dict:
    """Final metrics and total train time of a finished run, from its ``summary.csv``."""
    path = os.path.join(run_dir, "summary.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run did not write its summary: {path} is missing")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != epochs or rows[-1].get("epoch") != str(epochs):
        raise RuntimeError(f"{path}: expected {epochs} epoch rows ending at epoch {epochs}, found {len(rows)} "
                           f"(last epoch {rows[-1].get('epoch') if rows else None}): the run did not finish")
    last = rows[-1]
    out = {key: _float(last[key]) for key in (*METRICS, *MORE_METRICS)}
    out["train_time_s"] = sum(_float(r["train_time_s"]) for r in rows)
    out["img_s_last_epoch"] = _float(last["img_s"])
    out["eval_samples"] = int(last["eval_samples"])
    out["final_loss"] = {k: _float(last[k]) for k in ("loss", "bce", "lsd", "rsd", "ssd")}
    return out


def read_scale_recall(run_dir: str) -> list[dict]:
    """The per-scale recall table a run wrote at its last evaluation (``scale_recall.csv``)."""
    path = os.path.join(run_dir, "scale_recall.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run did not write its per-scale recall: {path} is missing")
    with open(path, newline="") as fh:
        return [
            {"bin_lo": _float(r["bin_lo"]), "bin_hi": _float(r["bin_hi"]), "objects": int(r["objects"]),
             "found": int(r["found"]), "recall": _float(r["recall"])}
            for r in csv.DictReader(fh)
        ]


# ---------------------------------------------------------------------------------------------- writing
def _cell(value: float, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.2f}"


def metrics_table(results: list[dict]) -> str:
    """Markdown: one row per run, the five paper metrics, delta mAP vs vanilla, the other metrics, times."""
    base = next((r for r in results if r["name"] == VANILLA.name), None)
    show_mem = any(r.get("peak_mem_mb") is not None for r in results)
    head = ["run", *METRICS, "mAP vs vanilla", *MORE_METRICS, "train time (s)", "run wall (s)"]
    if show_mem:
        head.append("peak GPU mem (MiB)")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        m = r["metrics"]
        delta = m["mAP"] - base["metrics"]["mAP"] if base is not None else math.nan
        cells = [r["label"], *(_cell(m[k]) for k in METRICS), _signed(delta) if r is not base else "",
                 *(_cell(m[k]) for k in MORE_METRICS), _cell(m["train_time_s"], 1), _cell(r["wall_s"], 1)]
        if show_mem:
            cells.append(_cell(r.get("peak_mem_mb"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scale_table(results: list[dict]) -> str:
    """Markdown: recall (%) per object-scale bin, one column per run, plus the object counts."""
    n_bins = max(len(r["scale_recall"]) for r in results)
    ref = max((r["scale_recall"] for r in results), key=len)
    head = ["sqrt(area) px", "objects", *(r["label"] for r in results)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for k in range(n_bins):
        row = ref[k]
        if row["objects"] == 0:
            continue
        cells = [f"[{row['bin_lo']:g}, {row['bin_hi']:g})", str(row["objects"])]
        cells += [_cell(r["scale_recall"][k]["recall"]) if k < len(r["scale_recall"]) else "-" for r in results]
        lines.append("| " + " | ".join(cells) + " |")
    totals = ["all", str(sum(b["objects"] for b in ref))]
    for r in results:
        objects = sum(b["objects"] for b in r["scale_recall"])
        found = sum(b["found"] for b in r["scale_recall"])
        totals.append(_cell(100.0 * found / objects) if objects else "-")
    lines.append("| " + " | ".join(totals) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(obj):
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    """Where the study ran: device name, CPU, core count, versions, commit."""
    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return {"device": device, "device_name": name, "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "commit": _commit(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def settings_text(profile: str, settings: dict, seed: int) -> str:
    s = settings
    kwargs = f" ({', '.join(s['model_kwargs'])})" if s["model_kwargs"] else ""
    return (
        f"- profile `{profile}`: timm `{s['model']}`{kwargs}, random init, {s['img_size']} px, "
        f"batch {s['batch_size']}, {s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}, SGD LR {s['lr']} "
        f"(cosine, {s['warmup_epochs']} warm-up epochs), "
        f"{'bf16 autocast' if s['amp'] else 'float32'}, loader {s['loader']} ({s['workers']} workers), seed {seed}\n"
        f"- data: built-in synthetic dataset (20 classes), {s['synthetic_size']} train / {s['synthetic_test_size']} "
        f"test images generated at {s['synthetic_img_size']} px (generator seed 0); one evaluation, after the last "
        f"epoch, on the whole test split\n"
    )


def write_outputs(out_dir: str, results: list[dict], profile: str, settings: dict, seed: int, device: str,
                  command: str) -> dict:
    """Write results.md, results.json and the scale-recall plot(s); returns the JSON document."""
    from mskd_fast.metrics import plot_scale_recall
    from mskd_fast.reports import write_text

    info = machine_info(device)
    pair = {r["label"]: r["scale_recall"] for r in results if r["name"] in (VANILLA.name, MSKD.name)}
    plot_scale_recall(pair, os.path.join(out_dir, "scale_recall.png"))
    plots = ["scale_recall.png"]
    if len(results) > 2:
        plot_scale_recall({r["label"]: r["scale_recall"] for r in results},
                          os.path.join(out_dir, "scale_recall_all.png"))
        plots.append("scale_recall_all.png")
    md = [
        "# Accuracy study: vanilla vs MSKD on the synthetic dataset",
        "",
        f"- machine: {info['device_name']} ({info['device']}); host CPU {info['cpu']}, {info['cpu_count']} cores; "
        f"python {info['python']}, torch {info['torch']}; commit {info['commit']}; {info['date']}",
        settings_text(profile, settings, seed).rstrip("\n"),
        "- MSKD: SPEC defaults (S=4 random crops, T=4, omega=0.5, gamma+=0.25, gamma-=1, 2 graph layers, "
        "iota=1.5, kappa=2, lambda=2)",
        f"- command: `{command}`",
        "- one seed per run: differences of a point or two can be run-to-run noise at this budget",
        "",
        "## Final evaluation (percent)",
        "",
        metrics_table(results),
        "train time = the trainer's per-epoch training time summed over epochs (includes compilation, excludes "
        "evaluation); run wall = the whole run (setup, training, evaluation, reports).",
        "",
        "## Recall by object scale (percent; sqrt(object area) at the training resolution)",
        "",
        scale_table(results),
        "Plot: " + ", ".join(f"`{p}`" for p in plots) + ".",
        "",
    ]
    write_text(os.path.join(out_dir, "results.md"), "\n".join(md))
    doc = {"profile": profile, "settings": {**settings, "model_kwargs": list(settings["model_kwargs"])},
           "seed": seed, "machine": info, "command": command, "runs": results, "plots": plots}
    write_text(os.path.join(out_dir, "results.json"), json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")
    return doc


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the exit code (0, or the first failing run's non-zero code)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profile, settings, device = resolve_settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    variants = [VANILLA, MSKD, *(ABLATIONS if args.ablations else ())]
    out_dir = os.path.abspath(args.output)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        parser.error(f"--output {out_dir} exists and is not a folder")
    runs_dir, logs_dir = os.path.join(out_dir, "runs"), os.path.join(out_dir, "logs")
    existing = [v.name for v in variants if os.path.exists(os.path.join(runs_dir, v.name))]
    if existing and not args.overwrite:
        parser.error(f"--output {out_dir} already holds runs {existing}; choose another --output or pass --overwrite")
    for name in existing:
        shutil.rmtree(os.path.join(runs_dir, name))
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(logs_dir, exist_ok=True)
    command = "python bench/accuracy_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"accuracy study: profile {profile} on {device}; runs: {', '.join(v.name for v in variants)}", flush=True)
    print(settings_text(profile, settings, args.seed), end="", flush=True)

    t0 = time.perf_counter()
    print(f"data: {prepare_dataset(settings, args.synthetic_cache)}", flush=True)
    warm_up(settings, device)
    print(f"data ready and device warmed up in {time.perf_counter() - t0:.1f}s", flush=True)
    results = []
    for variant in variants:
        run_argv = trainer_argv(variant, settings, seed=args.seed, device=device, runs_dir=runs_dir,
                                synthetic_cache=args.synthetic_cache)
        print(f"\n=== {variant.label}: python -m mskd_fast.train {' '.join(run_argv)}", flush=True)
        code, wall, peak = run_trainer(run_argv, os.path.join(logs_dir, f"{variant.name}.log"), device)
        if code != 0:
            print(f"error: run {variant.name} failed with exit code {code}; see {logs_dir}/{variant.name}.log",
                  file=sys.stderr)
            return code
        run_dir = os.path.join(runs_dir, variant.name)
        results.append({
            "name": variant.name, "label": variant.label, "trainer_flags": list(variant.flags),
            "wall_s": wall, "peak_mem_mb": peak, "metrics": read_summary(run_dir, settings["epochs"]),
            "scale_recall": read_scale_recall(run_dir), "run_dir": run_dir,
        })
    write_outputs(out_dir, results, profile, settings, args.seed, device, command)
    print("\n" + metrics_table(results), end="")
    print(f"\nwrote {os.path.join(out_dir, 'results.md')}, results.json and scale_recall.png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
