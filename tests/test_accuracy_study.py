"""``bench/accuracy_study.py``: the ``--tiny`` study runs end to end on CPU and writes its outputs; the variants
differ only in their method flags; the ``iota`` rule and the statistics are right. Scores of the tiny study are
not checked: at that budget they carry no information.
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
def test_tiny_study_writes_tables_plot_and_runs(study, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--tiny", "--device", "cpu", "--seeds", "1", "--output", str(out),
            "--synthetic-cache", str(tmp_path / "cache")]
    assert study.main(argv) == 0

    md = (out / "results.md").read_text()
    rows = _table_rows(md, "| run |")
    stable_label = study.stable_default().label
    assert set(rows) == {"Vanilla (BCE)", stable_label, "MSKD paper"}
    for label, cells in rows.items():
        assert cells[0] == "1"  # seeds
        for value in cells[1:6]:  # mAP, P@1, R@1, CF1, OF1 (one seed: no spread)
            assert 0.0 <= float(value) <= 100.0, (label, cells)
    assert rows["MSKD paper"][6].startswith(("+", "-"))  # delta mAP vs vanilla
    assert "profile `tiny`" in md and "Validation split" in md and "Recall by object scale" in md
    assert "train-fit 32 / val 8 " in md  # the sizes of the carved splits (40 train images, the last 20 % val)

    png = (out / "scale_recall.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    doc = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in doc["runs"]] == ["vanilla", study.stable_default().name, "paper"]
    assert doc["iota_decision"] is None  # only with --ablations
    for run in doc["runs"]:
        for split in ("test", "val"):
            assert all(isinstance(run[split][k], float) and math.isfinite(run[split][k]) for k in study.METRICS)
        assert math.isfinite(run["train_fit_mAP"])
        assert run["scale_recall"] and sum(b["objects"] for b in run["scale_recall"]) > 0
        run_dir = out / "runs" / f"{run['variant']}-s1"
        for name in ("summary.csv", "last.pt", "eval-test/metrics.json", "eval-train/metrics.json"):
            assert (run_dir / name).is_file(), name
        assert json.loads((run_dir / "eval-test" / "metrics.json").read_text())["split"] == "test"
        assert (out / "logs" / f"{run['variant']}-s1.log").read_text().startswith("python -m mskd_fast.train ")
    losses = {r["variant"]: r["losses"] for r in doc["runs"]}
    assert losses["vanilla"]["lsd"] == losses["vanilla"]["rsd"] == losses["vanilla"]["ssd"] == 0
    assert losses["paper"]["lsd"] > 0
    assert "| Vanilla (BCE) |" in capsys.readouterr().out

    # A second start reuses every finished run (an interrupted study continues where it stopped).
    assert study.main(argv) == 0
    assert "0 runs to train, 3 reused" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--profile", "gpu"], "--tiny conflicts with --profile gpu"),
    (["--tiny", "--epochs", "0"], "--epochs must be >= 1"),
    (["--tiny", "--jobs", "0"], "--jobs must be >= 1"),
    (["--tiny", "--seeds", "1", "1"], "--seeds must be distinct"),
    (["--tiny", "--device", "tpu"], "--device must be"),
])
def test_bad_flags_name_the_flag(study, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        study.main([*argv, "--output", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_variants_differ_only_in_their_method_flags(study):
    settings = dict(study.PROFILES["cpu"])
    variants = study.study_variants(ablations=True)
    assert len({v.name for v in variants}) == len(variants) == 8
    argvs = [study.trainer_argv(v, settings, seed=3, device="cpu", runs_dir="/r", synthetic_cache=None)
             for v in variants]
    stripped = []
    for variant, argv in zip(variants, argvs):
        at = argv.index("--experiment")
        assert argv[at + 1] == f"{variant.name}-s3"
        assert tuple(argv[len(argv) - len(variant.flags):]) == variant.flags
        stripped.append(argv[:at] + argv[at + 2: len(argv) - len(variant.flags)])
    common = stripped[0]
    assert all(s == common for s in stripped)  # same budget, data, seed and device for every run
    # trained on train-fit, selected on val; the test split is only seen by the evaluation afterwards
    assert common[common.index("--train-split") + 1] == "train-fit"
    assert common[common.index("--eval-split") + 1] == "val"
    assert "output_stride=16" in common  # 4x4 final feature map at 64 px
    iotas = sorted(float(v.flags[-1]) for v in variants if "--iota" in v.flags)
    assert iotas == sorted(study.IOTA_GRID)
    assert {v.flags[-1] for v in study.DROPS} == {"--no-lsd", "--no-rsd", "--no-ssd"}
    ev = study.evaluate_argv("/r/x", "test", settings, "cpu", None)
    assert ev[ev.index("--eval-split") + 1] == "test" and ev[ev.index("--checkpoint") + 1] == "/r/x/last.pt"


def test_main_variants_use_the_code_default_iota(study):
    from mskd_fast.losses import RECIPES

    names = [v.name for v in study.study_variants(ablations=False)]
    assert names == ["vanilla", f"stable-iota{RECIPES['stable']['iota']:g}", "paper"]


def test_choose_iota_rule(study):
    # best mean wins ...
    d = study.choose_iota({0.15: [30.0, 31.0, 32.0], 0.5: [29.0, 29.5, 30.0], 1.5: [27.0, 27.5, 28.0]})
    assert d["chosen"] == 0.15 and d["best"] == 0.15
    # ... unless the paper's 1.5 is within one std (of the best's seeds) of the best mean
    d = study.choose_iota({0.15: [28.0, 31.0, 34.0], 0.5: [29.0, 29.5, 30.0], 1.5: [29.5, 30.0, 30.5]})
    assert d["best"] == 0.15 and d["chosen"] == 1.5 and "kept" in d["why"]
    d = study.choose_iota({0.15: [30.0, 30.0, 30.0], 1.5: [33.0, 33.0, 33.0]})
    assert d["chosen"] == 1.5 and d["why"] == "best mean val mAP"
    assert d["val_mAP"]["0.15"]["mean"] == 30.0


def test_mean_std(study):
    m, s = study.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == 1.0
    m, s = study.mean_std([4.0])
    assert m == 4.0 and math.isnan(s)
    assert math.isnan(study.mean_std([math.nan])[0])


def test_synthetic_val_is_the_last_fifth_of_train_and_disjoint_from_train_fit(tmp_path):
    from mskd_fast.data import SyntheticConfig, load_index

    config = SyntheticConfig(train_size=12, test_size=4, img_size=32, cache_dir=str(tmp_path))
    train, fit, val = (load_index("synthetic", None, s, synthetic=config) for s in ("train", "train-fit", "val"))
    assert (fit.split, val.split) == ("train-fit", "val")
    assert len(val) == 2 and len(fit) == 10  # round(0.2 * 12)
    assert fit.paths + val.paths == train.paths  # the last images are val; nothing shared, nothing lost
    assert not set(val.paths) & set(load_index("synthetic", None, "test", synthetic=config).paths)


@pytest.mark.slow
def test_fashion_smoke_study_runs_every_phase(study, tmp_path, capsys):
    """The real-object study's machinery end to end on tiny fake Fashion-MNIST files (never the Debian package):
    pretraining, phase 1, the val rules, phase 2, results.md with every table and the decision."""
    from data_helpers import make_fake_fashion_mnist

    fake = make_fake_fashion_mnist(str(tmp_path / "idx"))
    out = tmp_path / "study"
    argv = ["--profile", "fashion-tiny", "--smoke", "--device", "cpu", "--seeds", "1", "--output", str(out),
            "--synthetic-cache", str(tmp_path / "cache"), "--fashion-dir", fake, "--lr-check", "0.1"]
    assert study.main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrained backbone written" in printed and "phase 1: 4 variants" in printed and "phase 2" in printed
    md = (out / "results.md").read_text()
    for heading in ("## Test split", "## Validation split", "## Gradient diagnostics", "## Decisions",
                    "## Recall by object size", "## LR sensitivity"):
        assert heading in md, heading
    rows = _table_rows(md, "| run | seeds | mAP | OP |")
    assert {"Vanilla (BCE)", "MSKD stable"} <= set(rows) and len(rows) == 5  # the LR check has its own table
    lr_rows = _table_rows(md, "| head LR |")
    assert set(lr_rows) == {"0.05 (study)", "0.1"}
    for cells in rows.values():
        assert all(0.0 <= float(v) <= 100.0 for v in cells[1:10])  # the nine metrics
    doc = json.loads((out / "results.json").read_text())
    assert doc["decisions"]["default"]["chosen"] in {v["name"] for v in doc["variants"] if v["kind"] == "mskd"}
    run = next(r for r in doc["runs"] if r["variant"] == "stable")
    assert "gnorm_bce" in run["diagnostics"] and len(run["loss_history"]) == 1
    args = (out / "runs" / "stable-s1" / "args.yaml").read_text()
    assert "fashion-multi" in args and "initial_checkpoint" in args and "weight_decay: 0.0001" in args


def test_fashion_rules(study):
    import study_fashion as sf

    assert sf.best_of({"a": [1.0, 2.0], "b": [2.0, 1.0], "c": [1.0, 1.0]}) == "a"  # ties: the first in order
    d = sf.choose_default({"x": {"val": [50.0, 52.0], "collapsed": [0, 1]},
                           "y": {"val": [49.0, 49.5], "collapsed": [0, 0]},
                           "z": {"val": [40.0], "collapsed": [0]}})
    assert d["chosen"] == "y" and d["excluded"] == ["x"] and [r[0] for r in d["ranking"]] == ["x", "y", "z"]
    assert sf.choose_default({"x": {"val": [1.0], "collapsed": [1]}})["chosen"] is None
    drops = sf.ablations(sf.STABLE)
    assert [v.flags[-1] for v in drops] == ["--no-lsd", "--no-rsd", "--no-ssd"]
    assert all(v.flags[:-1] == sf.STABLE.flags for v in drops)
    assert sf.ablations(sf.SSD[0]) == []  # dropping its only term would be vanilla
    p2 = sf.phase2(sf.STABLE, sf.SSD[1])
    assert p2[-1].epochs_factor == 2 and "--teacher-bn" in p2[-2].flags and "0.25" in p2[-1].flags
    names = [v.name for v in sf.PHASE1]
    assert len(set(names)) == len(names)
    assert {v.kind for v in sf.PHASE1} == {"vanilla", "mskd", "control", "method"}
    from mskd_fast.methods import METHODS

    assert {v.name for v in sf.METHODS} | {"ud"} == set(METHODS)  # every comparison method is in the study


def test_schedule_rules(study):
    import study_schedule as ss

    # rule 0: the best LR, unless a lower one is within LR_TIE of it (the lowest such)
    assert ss.choose_lr({0.01: 70.0, 0.05: 74.0, 0.2: 75.0, 0.8: 74.9})["chosen"] == 0.2
    c = ss.choose_lr({0.01: 70.0, 0.05: 74.8, 0.2: 75.0, 0.8: 74.0})
    assert c["best"] == 0.2 and c["chosen"] == 0.05
    assert ss.choose_lr({0.01: math.nan, 0.05: 60.0})["chosen"] == 0.05
    assert ss.choose_lr({0.01: math.nan})["chosen"] is None
    assert ss.lower_lrs(0.2) == [0.05, 0.01] and ss.lower_lrs(0.01) == []
    # rule 3: the best non-collapsed MSKD variant must beat vanilla by more than the larger std
    vanilla = [75.0, 75.5, 76.0]  # std 0.5
    d = ss.decide({"a": {"val": [76.2, 76.4, 76.6], "collapsed": [0, 0, 0]},
                   "b": {"val": [80.0, 80.0, 80.0], "collapsed": [0, 1, 0]}}, vanilla, "default")
    assert d["best"] == "a" and math.isclose(d["margin"], 0.9) and math.isclose(d["threshold"], 0.5)
    assert d["changes"] and d["default"] == "a"
    d = ss.decide({"a": {"val": [75.5, 76.5, 77.5], "collapsed": [0, 0, 0]}}, vanilla, "default")  # std 1.0
    assert d["best"] == "a" and not d["changes"] and d["default"] == "default"
    d = ss.decide({"a": {"val": [70.0], "collapsed": [1]}}, vanilla, "default")
    assert d["best"] is None and not d["changes"]
    names = [v.name for v in ss.PHASE1]
    assert len(set(names)) == len(names) and names[0] == "vanilla"
    from mskd_fast.losses import DEFAULT_RECIPE

    assert ss.DEFAULT.flags[-1] == DEFAULT_RECIPE  # the code's default recipe
    cal = ss.calibration()
    assert [float(v.flags[-1]) for v in cal] == list(ss.LR_GRID) and all(v.flags[-2] == "--lr" for v in cal)
    assert ss.stable_at(0.05).flags[-2:] == ("--lr", "0.05") and ss.stable_at(0.05).kind == "mskd"


def test_schedule_profile_is_the_papers_schedule(study):
    s = study.PROFILES["fashion-long"]
    assert s["randaugment"] and s["weight_decay"] == 5e-4 and s["epochs"] >= 40 and s["eval_interval"] == 1
    assert s["lr"] is None  # calibrated on val first (phase 0)
    fashion = study.PROFILES["fashion"]
    for key in ("dataset", "model", "model_kwargs", "img_size", "synthetic_size", "synthetic_test_size",
                "batch_size", "pretrain"):
        assert s[key] == fashion[key], key  # the same data and backbone as the 2026-12-02 study
    import study_schedule as ss

    argv = study.trainer_argv(ss.calibration()[0], dict(s), seed=1, device="cpu", runs_dir="/r",
                              synthetic_cache=None)
    assert argv.count("--lr") == 1 and argv[argv.index("--lr") + 1] == "0.01"
    assert "--randaugment" in argv and argv[argv.index("--eval-interval") + 1] == "1"


def test_study_refuses_a_dirty_tree_and_reruns_runs_of_other_code(study, tmp_path, monkeypatch, capsys):
    dirty = {"commit": "abc", "dirty": True, "diff_hash": "d" * 64, "source_hash": "s" * 64, "roots": []}
    monkeypatch.setattr(study, "harness_provenance", lambda env=None: dirty)
    with pytest.raises(SystemExit) as exc:
        study.main(["--tiny", "--output", str(tmp_path / "x")])
    assert exc.value.code == 2 and "--allow-dirty" in capsys.readouterr().err
    # reuse: only a finished run whose code.json names the current source hash
    run_dir = tmp_path / "runs" / "vanilla-s1"
    for name in ("summary.csv", "last.pt", "eval-test/metrics.json", "eval-train/metrics.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    code = {"source_hash": "a" * 64}
    v = study.VANILLA
    jobs, reused = study._pending([v], [1], str(tmp_path / "runs"), False, code)
    assert reused == [] and jobs == [(v, 1)] and not run_dir.exists()  # no code.json: trained again
    for name in ("summary.csv", "last.pt", "eval-test/metrics.json", "eval-train/metrics.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    (run_dir / "code.json").write_text(json.dumps({"source_hash": "b" * 64}))
    assert study._pending([v], [1], str(tmp_path / "runs"), False, code, reuse_other_code=True)[1] == ["vanilla-s1"]
    assert study._pending([v], [1], str(tmp_path / "runs"), False, {"source_hash": "b" * 64})[1] == ["vanilla-s1"]
    assert study._pending([v], [1], str(tmp_path / "runs"), False, code)[1] == []  # another hash: trained again


@pytest.mark.slow
def test_schedule_smoke_study_runs_every_phase(study, tmp_path, capsys):
    """The schedule study's machinery end to end on tiny fake Fashion-MNIST files: LR calibration, phase 1, the
    stable fallbacks, every table, the per-epoch plot, each run's code.json; its numbers mean nothing."""
    from data_helpers import make_fake_fashion_mnist

    fake = make_fake_fashion_mnist(str(tmp_path / "idx"))
    out = tmp_path / "study"
    argv = ["--profile", "fashion-long-tiny", "--smoke", "--device", "cpu", "--seeds", "1", "--output", str(out),
            "--synthetic-cache", str(tmp_path / "cache"), "--fashion-dir", fake, "--allow-dirty"]
    assert study.main(argv) == 0
    printed = capsys.readouterr().out
    assert "phase 0 (head LR" in printed and "head LR: " in printed and "phase 2" in printed
    md = (out / "results.md").read_text()
    for heading in ("## Phase 0: head LR", "## Test split", "## Validation split", "## Code and collapse verdicts",
                    "## Gradient diagnostics", "## Validation mAP per epoch", "## Decisions", "## Recall by object"):
        assert heading in md, heading
    assert "one version for every row" in md
    curves = _table_rows(md, "| run | ep 1 |")
    assert {"Vanilla (BCE)", "MSKD stable"} <= set(curves) and all(len(c) == 3 for c in curves.values())
    png = (out / "val_map_per_epoch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    doc = json.loads((out / "results.json").read_text())
    source = doc["settings"]["code"]["source_hash"]
    for run in doc["runs"]:
        assert run["code"]["source_hash"] == source and len(run["val_history"]) == 2
        assert all(0.0 <= m <= 100.0 for m in run["val_history"])
    args = (out / "runs" / "vanilla-s1" / "args.yaml").read_text()
    assert "weight_decay: 0.0005" in args and "randaugment: true" in args and source in args
    assert doc["decisions"]["lr"]["chosen"] in (0.01, 0.05)
    # A second start reuses every run (same code).
    assert study.main(argv) == 0
    phases = [line for line in capsys.readouterr().out.splitlines() if "runs to train" in line]
    assert phases and all("; 0 runs to train" in line for line in phases)
