"""``make install`` / ``make install-dev`` rebuild the package only when a build input changed.

The Makefile is run for real on a throw-away copy of the build inputs, with ``PIP`` replaced by
``echo`` (nothing is installed) and a fake venv whose ``python`` runs this test's interpreter.
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import install_stamp  # noqa: E402

BUILD_INPUTS = ("Makefile", "setup.py", "pyproject.toml", "constraints.txt", "csrc", "scripts")


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for item in BUILD_INPUTS:
        src = os.path.join(ROOT, item)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, root / item)
    (root / "mskd_fast").mkdir()
    return root


def test_key_follows_build_inputs_only(checkout):
    key = install_stamp.compute_key("dali", str(checkout), env={})
    assert install_stamp.compute_key("dali", str(checkout), env={}) == key
    (checkout / "mskd_fast" / "train.py").write_text("# python sources are editable: no rebuild\n")
    (checkout / "README.md").write_text("docs\n")
    assert install_stamp.compute_key("dali", str(checkout), env={}) == key
    assert install_stamp.compute_key("dali", str(checkout), env={"CUDA_HOME": "/usr/local/cuda"}) != key
    assert install_stamp.compute_key("dali-dev", str(checkout), env={}) != key
    for change in ("csrc/ops.cpp", "setup.py", "pyproject.toml", "csrc/new_kernel.cpp"):
        with open(checkout / change, "a") as fh:
            fh.write("\n// changed\n")
        new_key = install_stamp.compute_key("dali", str(checkout), env={})
        assert new_key != key, change
        key = new_key
    with pytest.raises(ValueError, match="unknown stamp"):
        install_stamp.compute_key("wheel", str(checkout))


def test_package_stamp_needs_a_loadable_extension(checkout, tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    assert not install_stamp.is_current(str(venv), ["venv"], str(checkout))
    install_stamp.write(str(venv), "venv", str(checkout))
    assert install_stamp.is_current(str(venv), ["venv"], str(checkout))
    install_stamp.write(str(venv), "dali", str(checkout))
    assert not install_stamp.is_current(str(venv), ["dali"], str(checkout))  # no mskd_fast/_C*.so in the copy


def _fake_venv(tmp_path):
    venv = tmp_path / "fake-venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return venv


def _make(checkout, venv, target):
    result = subprocess.run(
        ["make", "--no-print-directory", target, f"VENV={venv}", "PIP=echo PIP-CALLED", "PYTHON_BIN=false"],
        cwd=checkout, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_skips_pip_until_a_build_input_changes(checkout, tmp_path):
    built = glob.glob(os.path.join(ROOT, "mskd_fast", "_C*.so"))
    if not built:
        pytest.skip("mskd_fast._C is not built in this checkout")
    shutil.copy(built[0], checkout / "mskd_fast")  # stands in for what `pip install -e` would have built
    venv = _fake_venv(tmp_path)

    first = _make(checkout, venv, "install")  # fresh venv: no stamps, everything installs
    assert first.count("PIP-CALLED") == 3 and "-e .[dali]" in first

    again = _make(checkout, venv, "install")
    assert "PIP-CALLED" not in again and "mskd-fast: up to date" in again

    assert _make(checkout, venv, "install-dev").count("-e .[dali,dev]") == 1  # dev extras were never installed
    assert "PIP-CALLED" not in _make(checkout, venv, "install")  # dali,dev covers dali

    with open(checkout / "csrc" / "ops.cpp", "a") as fh:
        fh.write("\n// a source change\n")
    changed = _make(checkout, venv, "install-dev")
    assert changed.count("PIP-CALLED") == 1 and "venv: up to date" in changed

    for so in glob.glob(str(checkout / "mskd_fast" / "_C*.so")):  # what .ci/run does before `make test`
        os.remove(so)
    assert "-e .[dali,dev]" in _make(checkout, venv, "install-dev")
