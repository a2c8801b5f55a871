"""Turn a pytest-benchmark JSON file into one markdown table of ratios against same-run baselines.

Usage: ``python bench/report.py BENCH.json [MORE.json ...] [--title TEXT] > report.md``

Within each benchmark group the baseline is the entry whose ``extra_info["baseline"]`` is true
(else the slowest entry). Every row shows its mean time, the speed-up of the group's baseline over
it (``baseline_mean / mean``; > 1 means faster than the baseline) and, on CUDA, peak memory.
The header names the machine (CPU or GPU model), the versions and the commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def render(data: dict, title: str = "Benchmark report") -> str:
    """Markdown for the parsed pytest-benchmark JSON ``data``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        groups[bench.get("group") or bench["name"]].append(bench)
    machine = data.get("machine_info", {})
    devices = sorted({b.get("extra_info", {}).get("device", "cpu") for b in data.get("benchmarks", [])})
    versions = data.get("versions") or {}
    cpu = machine.get("cpu", {})
    commit = data.get("commit_info", {}).get("id", _commit())[:10]
    lines = [
        f"## {title}",
        "",
        f"- devices: {', '.join(devices) or 'none'}; host CPU: {cpu.get('brand_raw', 'unknown')}"
        f" ({cpu.get('count', '?')} cores)",
        f"- python {machine.get('python_version', '?')}; commit {commit}",
    ]
    lines += [f"- {name}: {value}" for name, value in sorted(versions.items())]
    lines += [
        "",
        "| group | entry | mean | median | speed-up vs baseline | peak mem (MiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for group in sorted(groups):
        entries = groups[group]
        base = next((b for b in entries if b.get("extra_info", {}).get("baseline")), None)
        if base is None:
            base = max(entries, key=lambda b: b["stats"]["mean"])
        for bench in sorted(entries, key=lambda b: b["stats"]["mean"]):
            stats, extra = bench["stats"], bench.get("extra_info", {})
            ratio = base["stats"]["mean"] / stats["mean"]
            mark = " (baseline)" if bench is base else ""
            mem = extra.get("peak_mem_mb")
            name = bench["name"].split("[", 1)[-1].rstrip("]") if "[" in bench["name"] else bench["name"]
            lines.append(
                f"| {group} | {name}{mark} | {_fmt_time(stats['mean'])} | {_fmt_time(stats['median'])} | "
                f"{ratio:.2f}x | {'' if mem is None else f'{mem:.0f}'} |"
            )
    lines += step_comparison(groups)
    return "\n".join(lines) + "\n"


def _entry_kind(bench: dict) -> str | None:
    return bench.get("extra_info", {}).get("kind")


def step_comparison(groups: dict[str, list[dict]]) -> list[str]:
    """For every trainer-step group (``step-*``): the MSKD step against the floor, vanilla and the plain-PyTorch
    MSKD step, as mean-time ratios, and peak memory against vanilla (CUDA). Goals (ResNet-34 on a GPU): MSKD
    <= 1.15x the floor, plain / MSKD >= 1.3, peak memory <= 1.3x vanilla."""
    rows = []
    for group in sorted(g for g in groups if g.startswith("step-")):
        kinds = {_entry_kind(b): b for b in groups[group]}
        mskd = kinds.get("mskd")
        if mskd is None:
            continue

        def ratio(num, den):
            return f"{num['stats']['mean'] / den['stats']['mean']:.2f}x" if num and den else "n/a"

        def mem(num, den):
            a, b = (x.get("extra_info", {}).get("peak_mem_mb") if x else None for x in (num, den))
            return f"{a / b:.2f}x" if a and b else "n/a"

        floor, vanilla, plain = kinds.get("floor"), kinds.get("vanilla"), kinds.get("plain")
        rows.append(f"| {group} | {ratio(mskd, floor)} | {ratio(mskd, vanilla)} | {ratio(plain, mskd)} | "
                    f"{mem(mskd, vanilla)} |")
    if not rows:
        return []
    return [
        "",
        "Trainer step (mean-time ratios of the same run; goals for the compiled ResNet-34 GPU step in brackets):",
        "",
        "| group | MSKD / floor (<= 1.15x) | MSKD / vanilla | plain PyTorch / MSKD (>= 1.3x) | "
        "peak mem MSKD / vanilla (<= 1.3x) |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]


def load(paths) -> dict:
    """Merge pytest-benchmark JSON files into one dict (``benchmarks`` concatenated; the first file's machine
    and commit info). Raises ``FileNotFoundError`` / ``ValueError`` (naming the file) for a missing or invalid file."""
    data: dict = {"benchmarks": []}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"benchmark JSON not found: {path}")
        try:
            part = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        for key in ("machine_info", "commit_info"):
            data.setdefault(key, part.get(key, {}))
        data["benchmarks"].extend(part.get("benchmarks", []))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_paths", type=Path, nargs="+", help="files written by pytest --benchmark-json")
    parser.add_argument("--title", default="Benchmark report")
    parser.add_argument("--versions", action="store_true", help="add torch/triton versions found in this process")
    args = parser.parse_args(argv)
    try:
        data = load(args.json_paths)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.versions:
        import torch

        data["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
        try:
            import triton

            data["versions"]["triton"] = triton.__version__
        except ImportError:
            data["versions"]["triton"] = "missing"
        if torch.cuda.is_available():
            data["versions"]["gpu"] = torch.cuda.get_device_name()
    sys.stdout.write(render(data, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
