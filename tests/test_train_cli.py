"""Trainer command line: --help documents every flag, defaults resolve as SPEC says, bad flags/data fail early."""

import argparse

import pytest
import torch

from mskd_fast.losses import resolve_recipe
from mskd_fast.train import main
from mskd_fast.train_args import DEMO_CPU, build_parser, explicit_flags, resolve_defaults, validate

ISSUE_FLAGS = [
    "--dataset", "--data-dir", "--model", "--num-classes", "--img-size", "--batch-size", "--epochs", "--lr",
    "--lr-backbone-mult", "--momentum", "--weight-decay", "--clip-grad", "--sched", "--warmup-epochs", "--loader",
    "--workers", "--output", "--resume", "--seed", "--log-interval", "--eval-interval", "--device", "--crops",
    "--crop-mode", "--temperature", "--omega", "--gamma-pos", "--gamma-neg", "--gp-layers", "--iota", "--kappa",
    "--lambda", "--no-lsd", "--no-rsd", "--no-ssd", "--no-mbd", "--amp", "--amp-dtype", "--compile",
    "--no-compile", "--channels-last", "--no-channels-last", "--pretrained", "--initial-checkpoint", "--method",
]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ISSUE_FLAGS + ["-b", "-j"]:
        assert flag in text, flag


def _resolved(argv, on_cuda=False):
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = resolve_defaults(args, explicit_flags(parser, argv), on_cuda=on_cuda)
    validate(args)
    return args, notes


def test_spec_defaults_for_real_datasets():
    args, notes = _resolved(["--dataset", "voc"])
    assert (args.model, args.img_size, args.batch_size, args.lr, args.epochs) == ("resnet34", 224, 64, 0.01, 80)
    assert (args.momentum, args.weight_decay, args.clip_grad, args.sched) == (0.9, 5e-4, 10.0, "cosine")
    assert (args.crops, args.crop_mode, args.temperature, args.omega) == (4, "random", 4.0, 0.5)
    assert (args.gamma_pos, args.gamma_neg, args.gp_layers) == (0.25, 1.0, 2)
    # the default recipe is the accuracy study's choice: S-SD alone, paper MBD form, lambda 0.1, batch-stat teacher
    assert (args.method, args.recipe, args.lam, args.mbd_form, args.teacher_bn) == (
        "mskd", "step", 0.1, "paper", "batch")
    assert args.no_lsd and args.no_rsd and not args.no_ssd and not args.no_mbd
    stable, _ = _resolved(["--dataset", "voc", "--recipe", "stable"])
    assert (stable.kappa, stable.lam, stable.gp_layers, stable.teacher_bn) == (2.0, 2.0, 2, "eval")
    assert (stable.iota, stable.mbd_form, stable.rsd_teacher_scale) == (
        resolve_recipe("stable")["iota"], "divergence", "match")
    assert not (stable.no_lsd or stable.no_rsd or stable.no_ssd or stable.no_mbd)
    paper, _ = _resolved(["--dataset", "voc", "--recipe", "paper"])
    assert (paper.iota, paper.mbd_form, paper.rsd_teacher_scale) == (1.5, "paper", "none")  # SPEC 6 as written
    assert args.lr_backbone_mult == 1.0 and args.compile is False and args.channels_last
    coco, _ = _resolved(["--dataset", "coco"])
    assert (coco.batch_size, coco.lr) == (128, 0.1)
    pre, _ = _resolved(["--dataset", "voc", "--pretrained"], on_cuda=True)
    assert pre.lr_backbone_mult == 0.1 and pre.compile is True
    assert any("paper recipe" in n for n in notes)


def test_demo_defaults_only_fill_unset_flags():
    args, notes = _resolved([])
    assert args.dataset == "synthetic"
    for key, value in DEMO_CPU.items():
        assert getattr(args, key) == value
    args, _ = _resolved(["--epochs", "3", "--model", "resnet18"])
    assert args.epochs == 3 and args.model == "resnet18" and args.img_size == DEMO_CPU["img_size"]
    one, notes = _resolved(["--epochs", "1"])
    assert one.warmup_epochs == 0 and any("warmup" in n for n in notes)


def test_explicit_flags_sees_only_given_options():
    parser = build_parser()
    assert explicit_flags(parser, ["--lr", "0.1", "--no-compile", "-b", "4"]) == {"lr", "compile", "batch_size"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--crops", "0"], "--crops must be >= 1"),
        (["--crop-mode", "corners", "--crops", "3"], "--crops must be 4 with --crop-mode corners"),
        (["--crop-area", "0.5", "0.4"], "--crop-area must be LO HI with 0 < LO <= HI <= 1, got [0.5, 0.4]"),
        (["--crop-area", "0", "0.3"], "--crop-area must be LO HI"),
        (["--crop-area", "0.2", "nan"], "--crop-area must be LO HI"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--omega", "1.5"], "--omega must be in"),
        (["--lr", "-1"], "--lr must be"),
        (["--lr", "nan"], "--lr must be"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--warmup-epochs", "10", "--epochs", "5"], "--warmup-epochs"),
        (["--momentum", "1.0"], "--momentum"),
        (["--img-size", "8"], "--img-size"),
        (["--threshold", "1.0"], "--threshold"),
        (["--lambda", "-2"], "--lambda"),
        (["--allow-random-init"], "--allow-random-init only makes sense with --pretrained"),
        (["--initial-checkpoint", "/nonexistent/w.pth"], "no such file"),
        (["--resume", "/nonexistent/last.pt"], "checkpoint not found"),
        (["--device", "tpu"], "--device"),
        (["--model-kwargs", "novalue"], "KEY=VALUE"),
        (["--sched", "linear"], "invalid choice"),
        (["--stop-on-collapse", "-1"], "--stop-on-collapse must be >= 0 (0 = never)"),
    ],
)
def test_bad_flags_fail_before_training(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may be written before the flags are valid"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA GPU")
def test_cuda_device_without_gpu_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--output", str(tmp_path)])
    assert "CUDA is not available" in capsys.readouterr().err


def _tiny(tmp_path, *extra):
    return ["--synthetic-size", "32", "--synthetic-test-size", "8", "--synthetic-img-size", "64",
            "--synthetic-cache", str(tmp_path / "cache"), "--img-size", "64", "-b", "8", "--epochs", "1",
            "--model", "resnet10t", "--model-kwargs", "channels=(8,16,32,64)", "stem_width=8", "--loader", "torch",
            "-j", "0", "--no-progress", "--output", str(tmp_path / "out"), *extra]


def test_missing_dataset_is_a_clear_error_before_training(capsys, tmp_path):
    code = main(_tiny(tmp_path, "--dataset", "voc", "--data-dir", str(tmp_path / "no_voc_here")))
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no_voc_here" in err
    assert not (tmp_path / "out").exists()


def test_num_classes_mismatch_and_batch_too_large(capsys, tmp_path):
    assert main(_tiny(tmp_path, "--num-classes", "7")) == 2
    assert "--num-classes 7 but dataset synthetic has 20 classes" in capsys.readouterr().err
    assert main(_tiny(tmp_path, "-b", "64")) == 2
    assert "batch_size 64 is larger than" in capsys.readouterr().err


def test_pretrained_weights_missing_offline(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(_tiny(tmp_path, "--pretrained")) == 2
    err = capsys.readouterr().err
    assert "offline (HF_HUB_OFFLINE=1)" in err and "--initial-checkpoint PATH" in err


def test_parse_kwargs_values_are_literals():
    parser = build_parser()
    args = parser.parse_args(["--model-kwargs", "drop_rate=0.1", "channels=(8,16)", "act_layer=relu"])
    assert args.model_kwargs == {"drop_rate": 0.1, "channels": (8, 16), "act_layer": "relu"}
    assert isinstance(parser, argparse.ArgumentParser)


def test_fashion_demo_defaults_fill_unset_flags_and_model_kwargs_follow_the_model():
    from mskd_fast.train_args import DEMO_FASHION

    args, notes = _resolved(["--dataset", "fashion-multi"])
    for key, value in DEMO_FASHION.items():
        assert getattr(args, key) == value, key
    assert any(n.startswith("fashion-multi demo defaults: ") and "channels=(16,32,64,128)" in n for n in notes)
    assert args.lr_backbone_mult == 1.0  # from random init
    mine, _ = _resolved(["--dataset", "fashion-multi", "--model", "resnet18", "--epochs", "2"])
    assert mine.model == "resnet18" and mine.model_kwargs == {} and mine.epochs == 2  # demo kwargs: demo model only
    assert mine.img_size == DEMO_FASHION["img_size"] and mine.lr == DEMO_FASHION["lr"]
