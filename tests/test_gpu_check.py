"""``bench/gpu_check.py``'s machinery with a fake interpreter (no build, no real tests, a second or two).

The fake ``python`` fails the CUDA build and succeeds the CPU-only one, and answers pytest runs with a JUnit
XML of one pass, one failure and one skip. Checked: the CPU-only fallback and its note, the counts and failed
test ids, a step skipped for the time budget, and a well-formed summary and tarball written from what exists.
"""

import stat
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check  # noqa: E402

FAKE = r"""#!/usr/bin/env bash
case "$*" in
  *"pip install"*) [ "$MSKD_FAST_BUILD_CUDA" = "1" ] && { echo "nvcc: error" >&2; exit 1; }; exit 0 ;;
  *"-m pytest"*)
    for a in "$@"; do case "$a" in --junitxml=*) xml="${a#--junitxml=}" ;; esac; done
    cat > "$xml" <<'XML'
<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">
<testcase classname="tests.test_x" name="test_ok"/>
<testcase classname="tests.test_x" name="test_bad"><failure message="AssertionError: 1 != 2">trace</failure></testcase>
<testcase classname="tests.test_x" name="test_skip"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>
XML
    exit 1 ;;
  *) echo '{"python": "3", "torch": "2.11.0", "cuda_available": true, "capability": "9.0", "pytest_timeout": "2.3"}' ;;
esac
"""


def _check(tmp_path, budget=120.0):
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    args = gpu_check.parse_args(["--out", str(tmp_path / "out"), "--python", str(fake), "--budget", str(budget)])
    return gpu_check.Check(args)


def test_cuda_build_failure_falls_back_to_cpu_only_and_report_is_written(tmp_path):
    check = _check(tmp_path)
    check.probe_versions()
    check.build()
    names = [(s.name, s.status) for s in check.steps]
    assert ("build (CUDA)", "failed") in names and ("build (CPU only)", "passed") in names
    assert any("MSKD_FAST_BUILD_CUDA=0" in note for note in check.build_notes)
    step = check.pytest("kernel tests", 1, ["tests/test_x.py"], [], limit=30, per_test=10)
    assert step.status == "failed" and step.counts == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert step.failures == ["tests.test_x::test_bad: AssertionError: 1 != 2"]
    assert "--timeout=10" in step.cmd
    summary, tarball = check.write_outputs()
    text = summary.read_text()
    assert "FAILED" in text and "tests.test_x::test_bad" in text and "rebuilt with" in text
    assert gpu_check.verify_outputs(summary, tarball, need_json=False) == []
    with tarfile.open(tarball) as tar:
        assert any(n.endswith("_build_CUDA.log") for n in tar.getnames())
    assert sorted(p.name for p in summary.parent.iterdir()) == [gpu_check.TARBALL_NAME, gpu_check.SUMMARY_NAME]


def test_step_past_the_budget_is_skipped_not_run(tmp_path):
    check = _check(tmp_path, budget=15.0)  # less than the reserve plus a step's minimum
    step = check.pytest("benchmarks", 2, ["bench/x.py"], [], limit=60, per_test=10)
    assert step.status == "skipped" and "time budget" in step.note
    assert gpu_check._phase_status([step]).startswith("SKIPPED")
    summary, tarball = check.write_outputs()
    problems = gpu_check.verify_outputs(summary, tarball, need_json=True)
    assert any("no .json" in p for p in problems)



@pytest.mark.parametrize("argv, message", [(["--budget", "-5"], "--budget must be >= 1"),
                                           (["--workers", "0"], "--workers must be >= 1"),
                                           (["--sample-every", "0"], "--sample-every must be >= 1")])
def test_bad_option_values_name_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_report_step_comparison_and_load_errors(tmp_path):
    import report  # bench/report.py, which the summary's ratio tables come from

    def entry(kind, mean, mem=None):
        extra = {"kind": kind, "baseline": kind == "floor", **({"peak_mem_mb": mem} if mem else {})}
        return {"name": f"test_bench_train_step[cuda-{kind}]", "group": "step-x",
                "stats": {"mean": mean, "median": mean}, "extra_info": extra}

    data = {"benchmarks": [entry("floor", 1.0), entry("vanilla", 0.8, 100.0), entry("mskd", 1.1, 130.0),
                           entry("plain", 2.2)]}
    assert "| step-x | 1.10x | 1.38x | 2.00x | 1.30x |" in report.render(data)
    data["benchmarks"] = data["benchmarks"][:3]  # no plain entry (e.g. it failed)
    assert "| step-x | 1.10x | 1.38x | n/a | 1.30x |" in report.step_comparison({"step-x": data["benchmarks"]})
    assert report.step_comparison({"losses-mbd": data["benchmarks"]}) == []  # only step-* groups

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        report.load([bad])
    with pytest.raises(FileNotFoundError, match="absent.json"):
        report.load([tmp_path / "absent.json"])
