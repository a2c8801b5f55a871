"""Dataset command-line flags (mskd_fast.data.cli)."""

import argparse

import pytest
from data_helpers import make_voc

from mskd_fast.data import SyntheticConfig, add_data_args, index_from_args, split_from_args, synthetic_config_from_args


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    return parser.parse_args(list(argv))


def test_defaults():
    args = _parse()
    assert args.dataset == "synthetic" and args.data_dir is None and args.on_bad_image == "error"
    assert args.voc_difficult == "positive" and args.manifest_classes is None
    assert synthetic_config_from_args(args) == SyntheticConfig()
    assert split_from_args(args, "train") == "train" and split_from_args(args, "eval") == "test"


def test_synthetic_flags_reach_the_generator(tmp_path):
    args = _parse("--synthetic-size", "6", "--synthetic-test-size", "2", "--synthetic-img-size", "48",
                  "--synthetic-seed", "5", "--synthetic-cache", str(tmp_path))  # fmt: skip
    train, test = index_from_args(args, "train"), index_from_args(args, "eval")
    assert (len(train), len(test)) == (6, 2) and train.root.startswith(str(tmp_path))
    assert train.image_sizes.tolist() == [[48, 48]] * 6 and "seed5" in train.root


def test_voc_flags_and_split_overrides(tmp_path):
    make_voc(str(tmp_path), {"a": [("dog", (1, 1, 5, 5), 1)], "b": [("cat", (1, 1, 5, 5), 0)]},
             {"trainval": ["a", "b"], "train": ["b"], "test": ["a"]})  # fmt: skip
    args = _parse("--dataset", "voc", "--data-dir", str(tmp_path), "--voc-difficult", "ignore")
    assert split_from_args(args, "train") == "trainval"
    idx = index_from_args(args, "train")
    assert len(idx) == 1 and idx.skipped["no_labels"] == 1  # "a" has only a difficult object
    args = _parse("--dataset", "voc", "--data-dir", str(tmp_path), "--train-split", "train")
    assert index_from_args(args, "train").split == "train"
    with pytest.raises(ValueError, match="role"):
        index_from_args(args, "test")
    with pytest.raises(SystemExit):
        _parse("--on-bad-image", "ignore")
