"""Help texts and command-line errors of ``python -m mskd_fast.train`` and ``python -m mskd_fast.evaluate``."""

import re

import pytest

from mskd_fast import evaluate, train
from mskd_fast.data import SyntheticConfig
from mskd_fast.train_args import DEMO_CPU, DEMO_FASHION, DEMO_GPU

CLIS = {"train": train.main, "evaluate": evaluate.main}


def _help(name, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        CLIS[name](["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _flag_blocks(text: str) -> dict:
    """``{"--flag": "its help text"}`` from argparse's option listing (whitespace collapsed)."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-\S+)", line)
        if match:
            current = match.group(1).split(",")[0]
            if current == "-j":
                current = "--workers"
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(block.split()) for flag, block in blocks.items()}


@pytest.mark.parametrize("name", sorted(CLIS))
def test_each_flag_states_its_default_at_most_once(name, capsys):
    blocks = _flag_blocks(_help(name, capsys))
    assert len(blocks) > 15
    for block in blocks.values():
        assert "(default: None)" not in block, block
        assert "(default: {})" not in block, block
        assert len(re.findall(r"\bdefault\b", block, re.IGNORECASE)) <= 1, block


def test_informative_defaults_are_still_shown(capsys):
    blocks = _flag_blocks(_help("train", capsys))
    assert "(default: 0.9)" in blocks["--momentum"]
    assert "step (default)" in blocks["--recipe"]
    assert "(default: True)" in blocks["--channels-last"]
    assert "default" not in blocks["--pretrained"]  # an off-by-default switch says nothing
    assert "(default 224;" in blocks["--img-size"]


def test_synthetic_size_help_matches_the_demo_profiles(capsys):
    blocks = _flag_blocks(_help("train", capsys))
    size = blocks["--synthetic-size"]
    assert f"default {SyntheticConfig.train_size}" in size
    assert f"{DEMO_CPU['synthetic_size']} on CPU" in size and f"{DEMO_GPU['synthetic_size']} on GPU" in size
    test_size = blocks["--synthetic-test-size"]
    assert f"{DEMO_CPU['synthetic_test_size']} on CPU" in test_size
    assert f"{DEMO_GPU['synthetic_test_size']} on GPU" in test_size
    assert f"fashion-multi demo: {DEMO_FASHION['synthetic_test_size']}" in test_size
    assert f"fashion-multi demo: {DEMO_FASHION['synthetic_size']}" in size


def test_evaluate_data_flags_default_to_the_run(capsys):
    blocks = _flag_blocks(_help("evaluate", capsys))
    assert "(default: the training run's; when --dataset is given: 1000)" in blocks["--synthetic-size"]
    assert "default: the training run's" in blocks["--dataset"]


@pytest.mark.parametrize("name", sorted(CLIS))
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--img-size", "big"], "argument --img-size: invalid int value: 'big'"),
    ],
)
def test_bad_flag_prints_the_error_and_a_pointer_to_help(name, argv, message, capsys, tmp_path):
    if name == "evaluate":
        argv = ["--checkpoint", str(tmp_path / "last.pt"), *argv]
    with pytest.raises(SystemExit) as exit_info:
        CLIS[name](argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    prog = f"python -m mskd_fast.{name}"
    assert captured.err.splitlines() == [f"{prog}: error: {message}", f"run '{prog} --help' for the list of flags"]
    assert "usage:" not in captured.err and captured.out == ""
