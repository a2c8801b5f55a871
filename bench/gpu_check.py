"""Driver of ``bench/gpu_check.sh``: the one-shot check for a lent GPU machine, and its CPU rehearsal.

Usage: ``python bench/gpu_check.py [--rehearse] [--out DIR] [--budget SECONDS]`` (``bench/gpu_check.sh``
passes its arguments through). The lent machine gives one command at most 10 minutes and returns at most
8 files, so the check is two phases under one time budget:

* **Phase 1 (the verdict, run first; not yet timed on a GPU):** versions; build and editable install of the
  package (``MSKD_FAST_BUILD_CUDA=1``; when that fails, again with ``MSKD_FAST_BUILD_CUDA=0`` so the Triton tests
  and loss benchmarks still run, and the summary says so); every test of the kernel, op, compile, crop and ROI
  test files (whole files, not only ``-m cuda``); the headline trainer-step benchmark group.
* **Phase 2 (may be cut by the budget without losing phase 1):** the other ``cuda``-marked tests and the other
  benchmark files, each with its own JSON.

Every pytest run has per-test limits (pytest-timeout) and keeps going after failures; a step that would not
fit the remaining budget is skipped and said so; a step past its own limit is killed. Whatever happened, the
report is written from what exists: ``<out>/gpu_check_summary.md`` (each phase's steps passed/failed/skipped,
failed test ids, the ratio table of ``bench/report.py``, the versions) and ``<out>/gpu_check_logs.tar.gz``
(logs, JUnit XML, benchmark JSON). ``<out>`` is ``$OUT`` when set, else ``./gpu_check_out``.

``--rehearse`` runs the same phases on a CPU machine: CPU-only build, the same test files under the Triton
interpreter (a deterministic sample of their tests, ``--sample-every``), the CPU twins of the benchmarks with
minimal rounds (timings meaningless), then checks that the summary and the tarball are well formed. The exit
status is 0 when every step that ran passed (or found no tests), else 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_NAME = "gpu_check_summary.md"
TARBALL_NAME = "gpu_check_logs.tar.gz"

# Whole test files run in phase 1 (every test in them, CUDA or not: several switch to CUDA by themselves).
PHASE1_TEST_FILES = [
    "tests/test_kernel_mbd.py",
    "tests/test_kernel_relation.py",
    "tests/test_kernel_graph.py",
    "tests/test_kernel_codegen.py",
    "tests/test_compile_ops.py",
    "tests/test_ops_api.py",
    "tests/test_crop_resize.py",
    "tests/test_roi_pool.py",
    "tests/test_spec_data.py",
]
HEADLINE_BENCH = "bench/test_bench_step.py"
PHASE2_BENCH = [
    "bench/test_bench_losses.py",
    "bench/test_bench_crops.py",
    "bench/test_bench_reference.py",
    "bench/test_bench_loaders.py",
    "bench/test_bench_scaling.py",
]
# The rehearsal's benchmark entries: CPU twins of the CUDA entries, a cheap few per file (every CPU twin runs in
# CI's `pytest bench/ --benchmark-disable`; these prove the check's machinery, JSON and report).
REHEARSE_SELECTION = {
    "bench/test_bench_step.py": "cpu",
    "bench/test_bench_losses.py": "cpu and B64 and mbd",
    "bench/test_bench_crops.py": "cpu and roi_pool and max and 512",
    "bench/test_bench_reference.py": "cpu and B64 and relation",
    "bench/test_bench_loaders.py": "torch-cpu and eval",
    "bench/test_bench_scaling.py": "cpu and B8 and not S2",
}
SECTIONS = ("## Verdict", "## Versions", "## Phase 1", "## Phase 2", "## Benchmark ratios")

VERSION_PROBE = r"""
import importlib, importlib.metadata, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
for key, dist in (("torch", "torch"), ("triton", "triton"), ("torchvision", "torchvision"),
                  ("setuptools", "setuptools"), ("ninja", "ninja"), ("pytest", "pytest"),
                  ("pytest_benchmark", "pytest-benchmark"), ("pytest_timeout", "pytest-timeout"),
                  ("xdist", "pytest-xdist"), ("timm", "timm"), ("numpy", "numpy")):
    try:
        out[key] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        out[key] = "missing"
try:
    import torch
    out["torch_cuda"] = str(torch.version.cuda)
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        out["card"] = torch.cuda.get_device_name()
        out["capability"] = "%d.%d" % torch.cuda.get_device_capability()
except Exception as exc:
    out["torch_error"] = repr(exc)
try:
    import ninja
    out["ninja_module_bin"] = ninja.BIN_DIR
except Exception:
    pass
try:
    import mskd_fast._C, mskd_fast
    out["installed_from"] = mskd_fast.__file__
    out["extension_file"] = mskd_fast._C.__file__
except Exception as exc:
    out["installed_from"] = f"not importable ({type(exc).__name__})"
print(json.dumps(out))
"""

INFO_PROBE = r"""
import json, mskd_fast
import mskd_fast._C
print(json.dumps(mskd_fast.info(), default=str))
"""


@dataclass
class Step:
    """One unit of the check: a command, its limits and what came of it."""

    name: str
    phase: int
    cmd: list[str] = field(default_factory=list)
    limit: float = 60.0
    status: str = "not run"  # passed | failed | timed out | skipped | no tests | not run
    seconds: float = 0.0
    rc: int | None = None
    counts: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    note: str = ""
    log: str = ""
    json_path: Path | None = None

    @property
    def bad(self) -> bool:
        return self.status in ("failed", "timed out")


class Check:
    """Runs the steps in order under one deadline and writes the summary and the tarball."""

    def __init__(self, args):
        self.args = args
        self.rehearse = args.rehearse
        self.python = args.python
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.steps: list[Step] = []
        self.versions: dict = {}
        self.machine: dict = {}
        self.build_notes: list[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("OUT", None)  # tests must not write where the machine returns files from
        paths = [str(ROOT / "bench")] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else [])
        self.env["PYTHONPATH"] = os.pathsep.join(paths)  # bench/ holds the rehearsal's sampling plugin
        if self.rehearse:
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    # ------------------------------------------------------------------ running
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: Step, *, env: dict | None = None, min_seconds: float = 20.0) -> Step:
        """Run ``step.cmd`` with its limit cut to the remaining budget (minus the report's reserve)."""
        self.steps.append(step)
        limit = min(step.limit, self.remaining() - self.args.reserve)
        log = self.work / f"{len(self.steps):02d}_{_slug(step.name)}.log"
        step.log = log.name
        if limit < min_seconds:
            step.status = "skipped"
            step.note = (step.note + "; " if step.note else "") + f"time budget ({self.remaining():.0f} s left)"
            log.write_text(f"skipped: {step.note}\n")
            print(f"--- {step.name}: skipped ({step.note})", flush=True)
            return step
        print(f"--- {step.name} (limit {limit:.0f} s): {shlex.join(step.cmd)}", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as fh:
            fh.write(f"$ {shlex.join(step.cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                step.rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                step.rc = None
        step.seconds = time.monotonic() - t0
        if step.rc is None:
            step.status = "timed out"
            step.note = (step.note + "; " if step.note else "") + f"killed after {limit:.0f} s"
        elif step.rc == 0:
            step.status = "passed"
        elif step.rc == 5:
            step.status = "no tests"
        else:
            step.status = "failed"
        print(f"    {step.status} in {step.seconds:.0f} s (exit {step.rc})", flush=True)
        return step

    def pytest(self, name: str, phase: int, targets: list[str], extra: list[str], *, limit: float,
               per_test: float, parallel: bool = False, bench_json: bool = False) -> Step:
        junit = self.work / f"{_slug(name)}.xml"
        cmd = [self.python, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-rfE",
               f"--junitxml={junit}", *extra]
        if self.versions.get("pytest_timeout", "missing").startswith("missing"):
            note = "no per-test limit (pytest-timeout missing)"
        else:
            cmd.append(f"--timeout={per_test:.0f}")
            note = ""
        if parallel and self.args.workers > 1 and not self.versions.get("xdist", "missing").startswith("missing"):
            cmd += ["-n", str(self.args.workers)]
        step = Step(name, phase, cmd, limit=limit, note=note)
        if bench_json:
            step.json_path = self.work / f"{_slug(name)}.json"
            cmd.append(f"--benchmark-json={step.json_path}")
        self.run(step)
        _read_junit(step, junit)
        return step

    def _extension_up_to_date(self) -> bool:
        """The probed interpreter imports this checkout's ``mskd_fast._C``, newer than every ``csrc/`` file."""
        installed, ext = self.versions.get("installed_from", ""), self.versions.get("extension_file")
        if not ext or not Path(installed).resolve().is_relative_to(ROOT / "mskd_fast"):
            return False
        sources = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()] + [ROOT / "setup.py"]
        return Path(ext).stat().st_mtime > max(p.stat().st_mtime for p in sources)

    # ------------------------------------------------------------------ phases
    def probe_versions(self) -> None:
        step = Step("versions", 1, [self.python, "-c", VERSION_PROBE], limit=60)
        self.run(step, min_seconds=5)
        try:
            lines = (self.work / step.log).read_text().strip().splitlines()
            self.versions = json.loads(lines[-1])
        except (ValueError, IndexError) as exc:
            step.status, step.note = "failed", f"version probe unreadable: {exc}"
        self.machine = _machine_facts()
        ninja_exe = shutil.which("ninja", path=self.env.get("PATH"))
        if ninja_exe:
            self.machine["ninja executable"] = ninja_exe
        elif self.versions.get("ninja_module_bin") and Path(self.versions["ninja_module_bin"], "ninja").exists():
            self.env["PATH"] = self.versions["ninja_module_bin"] + os.pathsep + self.env.get("PATH", "")
            self.machine["ninja executable"] = f"{self.versions['ninja_module_bin']}/ninja (the ninja module's)"
            self.build_notes.append("no `ninja` on PATH: added the ninja Python module's executable (parallel build)")
        else:
            self.machine["ninja executable"] = "none on PATH"
            self.build_notes.append("no `ninja` executable on PATH: the extension build is serial")
        if not self.rehearse and not self.versions.get("cuda_available"):
            step.status = "failed"
            step.note = "torch sees no CUDA device (use --rehearse on a CPU machine)"

    def build(self) -> None:
        """Editable install without dependencies; CUDA build first (GPU), CPU-only as the fallback."""
        cmd = [self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
               "--no-build-isolation", "-e", "."]
        env = dict(self.env, MAX_JOBS=str(self.env.get("MAX_JOBS") or os.cpu_count() or 4))
        attempts = ["0"] if self.rehearse else ["1", "0"]
        if self.rehearse and not self.args.rebuild and self._extension_up_to_date():
            # CI's `make test` has just built and installed this checkout with the same pip flags; a second
            # CPU build would take most of the rehearsal's three minutes
            self.steps.append(Step("build (CPU only)", 1, cmd, status="passed", note="reused the up-to-date "
                                   "editable install of this checkout (--rebuild builds again)"))
            attempts = []
        if not self.rehearse and not env.get("TORCH_CUDA_ARCH_LIST") and self.versions.get("capability"):
            env["TORCH_CUDA_ARCH_LIST"] = self.versions["capability"]
        for flag in attempts:
            label = "build (CUDA)" if flag == "1" else "build (CPU only)"
            step = self.run(Step(label, 1, cmd, limit=self.args.build_limit, note=f"MSKD_FAST_BUILD_CUDA={flag}"),
                            env=dict(env, MSKD_FAST_BUILD_CUDA=flag))
            if step.status == "passed":
                break
            if flag == "1":
                self.build_notes.append("the CUDA build FAILED (log in the tarball); rebuilt with "
                                        "MSKD_FAST_BUILD_CUDA=0: the crop/ROI CUDA tests cannot pass")
        info = self.run(Step("import mskd_fast._C", 1, [self.python, "-c", INFO_PROBE], limit=60), min_seconds=5)
        try:
            lines = (self.work / info.log).read_text().strip().splitlines()
            self.machine["mskd_fast.info()"] = lines[-1] if info.status == "passed" else "import failed"
        except IndexError:
            pass

    def phase1(self) -> None:
        self.probe_versions()
        self.build()
        sample = ["-p", "gpu_check_sample", f"--sample-every={self.args.sample_every}"] if self.rehearse else []
        self.pytest("kernel, op, crop and ROI tests", 1, PHASE1_TEST_FILES, sample,
                    limit=self.args.test_limit, per_test=self.args.per_test, parallel=True)
        step_k = ["-k", self.selection(HEADLINE_BENCH)]
        self.pytest("trainer-step benchmark", 1, [HEADLINE_BENCH], [*step_k, *self.bench_opts],
                    limit=self.args.step_limit, per_test=self.args.per_bench, bench_json=True)

    def phase2(self) -> None:
        ignore = [f"--ignore={f}" for f in PHASE1_TEST_FILES]
        self.pytest("other CUDA-marked tests", 2, ["tests", *ignore], ["-m", "cuda"],
                    limit=self.args.test_limit, per_test=self.args.per_test, parallel=True)
        for path in PHASE2_BENCH:
            name = Path(path).stem.removeprefix("test_bench_") + " benchmarks"
            self.pytest(name, 2, [path], ["-k", self.selection(path), *self.bench_opts],
                        limit=self.args.bench_limit, per_test=self.args.per_bench, bench_json=True)

    def selection(self, path: str) -> str:
        """``-k`` expression of a benchmark file: its CUDA entries, or for the rehearsal a few CPU twins."""
        return REHEARSE_SELECTION[path] if self.rehearse else "cuda"

    @property
    def bench_opts(self) -> list[str]:
        if self.rehearse:  # prove the machinery, not the speed: one round per entry
            return ["--benchmark-only", "--benchmark-min-rounds=1", "--benchmark-max-time=0.000001",
                    "--benchmark-warmup=off"]
        return ["--benchmark-only", "--benchmark-min-rounds=5", "--benchmark-max-time=0.3"]

    # ------------------------------------------------------------------ report
    def write_outputs(self) -> tuple[Path, Path]:
        jsons = [s.json_path for s in self.steps
                 if s.json_path and s.json_path.is_file() and s.json_path.stat().st_size]
        summary = self.summary(jsons)
        (self.work / SUMMARY_NAME).write_text(summary)
        tar_path = self.out / TARBALL_NAME
        with tarfile.open(tar_path, "w:gz") as tar:
            for path in sorted(self.work.iterdir()):
                tar.add(path, arcname=f"gpu_check_logs/{path.name}")
        summary_path = self.out / SUMMARY_NAME
        summary_path.write_text(summary)
        return summary_path, tar_path

    def summary(self, jsons: list[Path]) -> str:
        p1 = [s for s in self.steps if s.phase == 1]
        p2 = [s for s in self.steps if s.phase == 2]
        title = "GPU check rehearsal (CPU, Triton interpreter; timings are not measurements)" if self.rehearse \
            else "GPU check"
        elapsed = time.monotonic() - self.start
        lines = [f"# {title}", "", f"{dt.datetime.now().isoformat(timespec='seconds')}, {elapsed:.0f} s of a "
                 f"{self.args.budget:.0f} s budget", "", "## Verdict", ""]
        lines.append(f"- phase 1 (build, kernel/op/crop/ROI tests, trainer-step benchmark): **{_phase_status(p1)}**")
        lines.append(f"- phase 2 (other CUDA tests, other benchmarks): **{_phase_status(p2)}**")
        lines += [f"- {note}" for note in self.build_notes]
        lines += ["", "## Versions", ""]
        v = self.versions
        rows = [
            ("card", v.get("card", "none (no CUDA device)")), ("capability", v.get("capability", "-")),
            ("driver", self.machine.get("driver", "-")), ("torch", v.get("torch", "?")),
            ("torch CUDA", v.get("torch_cuda", "?")), ("nvcc", self.machine.get("nvcc", "-")),
            ("triton", v.get("triton", "?")), ("torchvision", v.get("torchvision", "?")),
            ("python", f"{v.get('python', '?')} ({v.get('executable', '?')})"),
            ("setuptools", v.get("setuptools", "?")), ("ninja (module)", v.get("ninja", "?")),
            ("ninja executable", self.machine.get("ninja executable", "?")),
            ("pytest / benchmark / timeout / xdist", " / ".join(
                v.get(k, "?") for k in ("pytest", "pytest_benchmark", "pytest_timeout", "xdist"))),
            ("timm / numpy", f"{v.get('timm', '?')} / {v.get('numpy', '?')}"),
            ("CPU cores", str(os.cpu_count())), ("commit", self.machine.get("commit", "?")),
            ("mskd_fast.info()", self.machine.get("mskd_fast.info()", "-")),
        ]
        lines += ["| what | version |", "|---|---|"] + [f"| {k} | {_cell(val)} |" for k, val in rows]
        for phase, steps in ((1, p1), (2, p2)):
            lines += ["", f"## Phase {phase}", "", "| step | status | passed | failed | errors | skipped | seconds | "
                      "note | log |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
            for s in steps:
                c = s.counts
                lines.append(f"| {s.name} | {s.status} | {c.get('passed', '')} | {c.get('failed', '')} | "
                             f"{c.get('errors', '')} | {c.get('skipped', '')} | {s.seconds:.0f} | {_cell(s.note)} | "
                             f"{s.log} |")
            for s in steps:
                if s.failures:
                    lines += ["", f"Failed in *{s.name}* ({len(s.failures)}):", ""]
                    lines += [f"- `{f}`" for f in s.failures[:40]]
                    if len(s.failures) > 40:
                        lines.append(f"- ... {len(s.failures) - 40} more (JUnit XML in the tarball)")
        lines += ["", "## Benchmark ratios", ""]
        lines += self.ratio_table(jsons)
        lines += ["", f"Logs, JUnit XML and benchmark JSON: `{TARBALL_NAME}` (folder `gpu_check_logs/`)."]
        return "\n".join(lines) + "\n"

    def ratio_table(self, jsons: list[Path]) -> list[str]:
        if not jsons:
            return ["No benchmark JSON was written."]
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            import report  # bench/report.py (standard library only)

            data = report.load(jsons)
            text = report.render(data, "Same-run ratios").splitlines()
            return text[2:] if text and text[0].startswith("## ") else text
        except Exception as exc:  # the summary must be written whatever the JSON holds
            return [f"bench/report.py failed on {[p.name for p in jsons]}: {exc!r}"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_junit(step: Step, path: Path) -> None:
    """Counts and failed test ids from pytest's JUnit XML (absent when pytest was killed or never ran)."""
    if not path.is_file():
        if step.status not in ("skipped",):
            step.note = (step.note + "; " if step.note else "") + "no JUnit XML (pytest killed or did not start)"
        return
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        step.note = (step.note + "; " if step.note else "") + f"unreadable JUnit XML: {exc}"
        return
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    step.counts = {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"],
    }
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            message = (bad.get("message") or "").strip().splitlines()
            tid = f"{case.get('classname', '')}::{case.get('name', '')}"
            step.failures.append(f"{tid}: {message[0][:160] if message else bad.tag}")


def _phase_status(steps: list[Step]) -> str:
    if not steps:
        return "not run"
    if any(s.bad for s in steps):
        bad = ", ".join(s.name for s in steps if s.bad)
        return f"FAILED ({bad})"
    if all(s.status == "skipped" for s in steps):
        return "SKIPPED (time budget)"
    skipped = [s.name for s in steps if s.status == "skipped"]
    return "PASSED" + (f" (skipped: {', '.join(skipped)})" if skipped else "")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _machine_facts() -> dict:
    facts = {}

    def first_line(cmd):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        lines = [x for x in res.stdout.strip().splitlines() if x.strip()]
        return lines if res.returncode == 0 and lines else None

    smi = first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    facts["driver"] = smi[0] if smi else "no nvidia-smi"
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc")
    out = first_line([nvcc, "--version"])
    facts["nvcc"] = out[-1] if out else "not found"
    commit = first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    facts["commit"] = (commit[0] if commit else "unknown") + (" (with uncommitted changes)" if dirty else "")
    return facts


def verify_outputs(summary: Path, tarball: Path, *, need_json: bool = True) -> list[str]:
    """Problems with the written summary and tarball (empty when both are well formed).

    ``need_json``: the tarball must hold benchmark JSON (the rehearsal always writes some; a GPU run whose
    budget ran out before any benchmark may not)."""
    problems = []
    if not summary.is_file():
        return [f"{summary} missing"]
    text = summary.read_text()
    problems += [f"summary lacks section {s!r}" for s in SECTIONS if s not in text]
    if "phase 1" not in text.lower():
        problems.append("summary lacks the phase-1 verdict")
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            names = tar.getnames()
    except (OSError, tarfile.TarError) as exc:
        return problems + [f"tarball unreadable: {exc}"]
    for suffix in (".log", ".xml", SUMMARY_NAME) + ((".json",) if need_json else ()):
        if not any(n.endswith(suffix) for n in names):
            problems.append(f"tarball holds no {suffix} file")
    for name in names:
        if name.endswith(".json"):
            with tarfile.open(tarball, "r:gz") as tar:
                member = tar.extractfile(name)
                try:
                    json.loads(member.read())
                except ValueError as exc:
                    problems.append(f"{name} in the tarball is not valid JSON: {exc}")
    return problems


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rehearse", action="store_true", help="run every phase on CPU (interpreter, CPU twins)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu_check_out"),
                   help="folder for the summary and the tarball (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for everything (default 540 on a GPU, 175 for --rehearse)")
    p.add_argument("--rebuild", action="store_true",
                   help="--rehearse: build even when this checkout's extension is installed and up to date")
    p.add_argument("--reserve", type=float, default=10.0, help="seconds kept back for the report")
    p.add_argument("--workers", type=int, default=None, help="pytest-xdist workers for the test steps")
    p.add_argument("--sample-every", type=int, default=6, help="--rehearse: run every N-th test of phase 1")
    args = p.parse_args(argv)
    for flag, value, low in (("--budget", args.budget, 1), ("--reserve", args.reserve, 0),
                             ("--workers", args.workers, 1), ("--sample-every", args.sample_every, 1)):
        if value is not None and value < low:
            p.error(f"{flag} must be >= {low}, got {value:g}")
    gpu = not args.rehearse
    args.budget = args.budget or (540.0 if gpu else 175.0)
    args.workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if gpu else 1)
    args.build_limit = 200.0 if gpu else 150.0
    args.test_limit = 150.0 if gpu else 60.0
    args.step_limit = 200.0 if gpu else 45.0
    args.bench_limit = 150.0 if gpu else 40.0
    args.per_test = 90.0 if gpu else 45.0
    args.per_bench = 150.0 if gpu else 30.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args)
    print(f"gpu_check: {'rehearsal on CPU' if args.rehearse else 'GPU'}; budget {args.budget:.0f} s; "
          f"work folder {check.work}; outputs in {check.out}", flush=True)
    try:
        check.phase1()
        check.phase2()
    except KeyboardInterrupt:
        check.build_notes.append("interrupted (KeyboardInterrupt): the report shows what ran before")
    finally:
        summary, tarball = check.write_outputs()
    print(summary.read_text(), flush=True)
    problems = verify_outputs(summary, tarball, need_json=args.rehearse)
    for problem in problems:
        print(f"gpu_check: malformed output: {problem}", file=sys.stderr)
    bad = [s.name for s in check.steps if s.bad]
    print(f"gpu_check: summary {summary}, tarball {tarball}; failed steps: {bad or 'none'}", flush=True)
    return 1 if bad or problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
