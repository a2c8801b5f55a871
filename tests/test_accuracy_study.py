"""Smoke test of ``bench/accuracy_study.py``: the ``--tiny`` study runs end to end on CPU and writes its
outputs (the side-by-side table with both methods, the per-scale recall plot, the JSON, every run's folder).
Scores are not checked: at this budget they carry no information.
"""

import importlib.util
import json
import math
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, os.pardir, "bench", "accuracy_study.py")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("accuracy_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _table_rows(markdown: str, header_start: str) -> dict[str, list[str]]:
    """Rows of the first markdown table whose header starts with ``header_start``, keyed by first cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_tiny_study_writes_table_plot_and_runs(study, tmp_path, capsys):
    out = tmp_path / "study"
    code = study.main(["--tiny", "--device", "cpu", "--output", str(out),
                       "--synthetic-cache", str(tmp_path / "cache")])
    assert code == 0

    md = (out / "results.md").read_text()
    rows = _table_rows(md, "| run |")
    assert set(rows) == {"Vanilla (BCE)", "MSKD"}
    for label, cells in rows.items():
        # mAP, P@1, R@1, CF1, OF1 are numbers in [0, 100]
        for value in cells[:5]:
            assert 0.0 <= float(value) <= 100.0, (label, cells)
        assert float(cells[-1]) > 0 and float(cells[-2]) > 0  # run wall, train time
    assert rows["MSKD"][5].startswith(("+", "-"))  # delta mAP vs vanilla
    assert "profile `tiny`" in md and "Recall by object scale" in md

    png = (out / "scale_recall.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not (out / "scale_recall_all.png").exists()  # only with --ablations

    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["vanilla", "mskd"]
    assert doc["settings"]["epochs"] == 1 and doc["profile"] == "tiny"
    for run in doc["runs"]:
        for key in ("mAP", "P@1", "R@1", "CF1", "OF1", "train_time_s"):
            assert isinstance(run["metrics"][key], float) and math.isfinite(run["metrics"][key]), key
        assert run["scale_recall"] and sum(b["objects"] for b in run["scale_recall"]) > 0
        run_dir = out / "runs" / run["name"]
        for name in ("summary.csv", "scale_recall.csv", "last.pt"):
            assert (run_dir / name).is_file(), name
        assert (out / "logs" / f"{run['name']}.log").read_text().startswith("python -m mskd_fast.train ")
    # the vanilla run trained BCE only, the MSKD run every term
    losses = {r["name"]: r["metrics"]["final_loss"] for r in doc["runs"]}
    assert losses["vanilla"]["lsd"] == losses["vanilla"]["rsd"] == losses["vanilla"]["ssd"] == 0
    assert losses["mskd"]["lsd"] > 0
    assert "| Vanilla (BCE) |" in capsys.readouterr().out


def test_refuses_to_overwrite_existing_runs(study, tmp_path, capsys):
    (tmp_path / "runs" / "vanilla").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        study.main(["--tiny", "--device", "cpu", "--output", str(tmp_path)])
    assert exc.value.code == 2
    assert "already holds runs ['vanilla']" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--profile", "gpu"], "--tiny conflicts with --profile gpu"),
    (["--tiny", "--epochs", "0"], "--epochs must be >= 1"),
    (["--tiny", "--device", "tpu"], "--device must be"),
])
def test_bad_flags_name_the_flag(study, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        study.main([*argv, "--output", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_ablation_runs_differ_only_in_their_method_flags(study):
    settings = dict(study.PROFILES["gpu"])
    variants = [study.VANILLA, study.MSKD, *study.ABLATIONS]
    argvs = [study.trainer_argv(v, settings, seed=3, device="cuda", runs_dir="/r", synthetic_cache=None)
             for v in variants]
    stripped = []
    for variant, argv in zip(variants, argvs):
        at = argv.index("--experiment")
        assert argv[at + 1] == variant.name
        assert tuple(argv[len(argv) - len(variant.flags):]) == variant.flags
        stripped.append(argv[:at] + argv[at + 2: len(argv) - len(variant.flags)])
    common = stripped[0]
    assert all(s == common for s in stripped)  # same budget, data, seed and device for every run
    assert {v.flags[-1] for v in study.ABLATIONS} == {"--no-lsd", "--no-rsd", "--no-ssd", "--no-mbd"}
    assert "--amp" in common and common[common.index("--seed") + 1] == "3"
    assert common[common.index("--epochs") + 1] == "12" and common[common.index("--model") + 1] == "resnet18"
