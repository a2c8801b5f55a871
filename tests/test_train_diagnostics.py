"""Training diagnostics (mskd_fast.diagnostics) and the methods and recipes the accuracy study added to the
trainer: the gradient statistics are right, cost no change to the update, reach summary.csv and the epoch
line; ``--method ud`` and ``--recipe official`` train end to end and record what they resolved to."""

import math

import pytest
import torch
import yaml
from train_cli_helpers import summary_rows, tiny_run_argv

from mskd_fast.checkpoint import load_checkpoint
from mskd_fast.diagnostics import diagnostic_keys, gradient_diagnostics, opposing_terms
from mskd_fast.train import main


def test_gradient_diagnostics_match_hand_computed_gradients():
    w = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    x = torch.randn(5, 4)
    logits = x @ w.T + b
    parts = {"bce": (logits ** 2).mean(), "rsd": -0.5 * logits.sum(), "ssd": torch.zeros(())}
    out = gradient_diagnostics(parts, [w, b], logits)
    g_bce = torch.cat([g.reshape(-1) for g in torch.autograd.grad(parts["bce"], [w, b], retain_graph=True)])
    g_rsd = torch.cat([g.reshape(-1) for g in torch.autograd.grad(parts["rsd"], [w, b], retain_graph=True)])
    torch.testing.assert_close(out["gnorm_bce"], g_bce.norm())
    torch.testing.assert_close(out["gnorm_rsd"], g_rsd.norm())
    torch.testing.assert_close(out["gcos_rsd"], torch.nn.functional.cosine_similarity(g_rsd, g_bce, dim=0))
    assert math.isnan(out["gnorm_ssd"]) and math.isnan(out["gcos_ssd"])  # a constant term: not measured
    torch.testing.assert_close(out["train_logit_row_std"], logits.detach().std(dim=1, unbiased=False).mean())
    assert w.grad is None and b.grad is None  # the step's own gradients are untouched
    assert set(out) == set(diagnostic_keys(("loss", "bce", "rsd", "ssd")))


def test_opposing_terms_needs_two_epochs_of_opposition_at_comparable_norm():
    bad = {"gnorm_bce": 1.0, "gnorm_rsd": 0.6, "gcos_rsd": -0.5, "gnorm_lsd": 0.1, "gcos_lsd": -0.9}
    good = {**bad, "gcos_rsd": 0.2}
    assert opposing_terms([bad]) == []
    assert opposing_terms([good, bad]) == []
    found = opposing_terms([bad, bad])
    assert len(found) == 1 and found[0].startswith("rsd (cos -0.50, 0.60x")  # lsd opposes but is small
    assert opposing_terms([bad, {**bad, "gcos_rsd": math.nan}]) == []


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


@pytest.mark.slow
def test_diagnostics_do_not_change_training(cache, tmp_path):
    """Every step diagnosed vs none: the same parameters, bit for bit."""
    assert main(tiny_run_argv(cache, tmp_path, "every", epochs=1, log_interval=1)) == 0
    assert main(tiny_run_argv(cache, tmp_path, "never", epochs=1, log_interval=1000)) == 0
    a = load_checkpoint(tmp_path / "every" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "never" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    every, never = summary_rows(tmp_path / "every")[-1], summary_rows(tmp_path / "never")[-1]
    for key in diagnostic_keys(("loss", "bce", "lsd", "rsd", "ssd")):
        assert math.isfinite(float(every[key])), key
    assert math.isfinite(float(never["gnorm_bce"]))  # step 0 is always diagnosed
    assert 0.0 <= float(every["clip_frac"]) <= 1.0


@pytest.mark.slow
def test_method_ud_trains_and_reports_its_terms(cache, tmp_path, capsys):
    argv = tiny_run_argv(cache, tmp_path, "ud", "--method", "ud", "--ud-weight", "0.25", epochs=1)
    assert main(argv) == 0
    row = summary_rows(tmp_path / "ud")[-1]
    assert float(row["ud"]) > 0 and "lsd" not in row and math.isfinite(float(row["gcos_ud"]))
    out = capsys.readouterr().out
    assert "UD partial softmax: weight 0.25, T=4.0" in out and " ud " in out
    args = yaml.safe_load((tmp_path / "ud" / "args.yaml").read_text())["args"]
    assert (args["method"], args["ud_weight"], args["ud_temperature"]) == ("ud", 0.25, 4.0)


@pytest.mark.slow
def test_recipe_official_resolves_and_records_its_settings(cache, tmp_path, capsys):
    assert main(tiny_run_argv(cache, tmp_path, "official", "--recipe", "official", epochs=1)) == 0
    args = yaml.safe_load((tmp_path / "official" / "args.yaml").read_text())["args"]
    assert {k: args[k] for k in ("crop_mode", "iota", "kappa", "lam", "gp_layers", "lsd_terms",
                                 "rsd_teacher_reduce", "mbd_form", "rsd_teacher_scale")} == {
        "crop_mode": "corners", "iota": 1.0, "kappa": 1.0, "lam": 1.0, "gp_layers": 1, "lsd_terms": "patch",
        "rsd_teacher_reduce": "mean", "mbd_form": "paper", "rsd_teacher_scale": "none"}
    assert "recipe official: " in capsys.readouterr().out
    # single settings still override the recipe
    assert main(tiny_run_argv(cache, tmp_path, "override", "--recipe", "official", "--kappa", "0.5",
                              "--crop-mode", "random", epochs=1)) == 0
    args = yaml.safe_load((tmp_path / "override" / "args.yaml").read_text())["args"]
    assert (args["kappa"], args["crop_mode"], args["lam"]) == (0.5, "random", 1.0)


@pytest.mark.parametrize("flag, value, message", [
    ("--ud-weight", "-1", "--ud-weight must be"),
    ("--ud-temperature", "0", "--ud-temperature must be"),
    ("--rsd-crop-temperature", "0", "--rsd-crop-temperature must be"),
])
def test_new_flags_are_validated(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([flag, value, "--output", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_sd_scale_multiplies_only_the_self_distillation_weights():
    from mskd_fast.losses import MSKDLoss

    q = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    r, o = torch.randn(4, 3, 6, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64)
    q_prev, y = torch.randn(4, 6, dtype=torch.float64), (torch.rand(4, 6) < 0.4).double()
    loss = MSKDLoss(recipe="stable", backend="reference")
    full, terms, parts = loss(q, r, o, q_prev, y, return_parts=True)
    half, terms_half, parts_half = loss(q, r, o, q_prev, y, return_parts=True, sd_scale=torch.tensor(0.5))
    assert torch.equal(parts_half["bce"], parts["bce"])
    for name in ("lsd", "rsd", "ssd"):
        torch.testing.assert_close(parts_half[name], 0.5 * parts[name])
        assert torch.equal(terms_half[name], terms[name])  # the reported terms stay unweighted
    torch.testing.assert_close(half, parts["bce"] + 0.5 * (full - parts["bce"]))
    zero, _ = loss(q, r, o, q_prev, y, sd_scale=0.0)
    torch.testing.assert_close(zero, parts["bce"])


@pytest.mark.slow
def test_sd_warmup_ramps_the_weights_and_is_recorded(cache, tmp_path, capsys):
    argv = tiny_run_argv(cache, tmp_path, "warm", "--sd-warmup-epochs", "1.5", epochs=2)  # 4 steps an epoch
    assert main(argv) == 0
    rows = summary_rows(tmp_path / "warm")
    assert [float(r["sd_scale"]) for r in rows] == pytest.approx([4 / 6, 1.0], abs=1e-6)
    assert "SD warm-up 1.5 epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(tiny_run_argv(cache, tmp_path, "bad", "--sd-warmup-epochs", "3", epochs=2))
    assert "--sd-warmup-epochs must be in [0, --epochs=2]" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_recipe_trains_s_sd_alone_with_a_batch_statistics_teacher(cache, tmp_path, capsys):
    argv = [a for a in tiny_run_argv(cache, tmp_path, "default", epochs=1, log_interval=1)]
    at = argv.index("--recipe")
    del argv[at:at + 2]  # no --recipe: the default
    assert main(argv) == 0
    args = yaml.safe_load((tmp_path / "default" / "args.yaml").read_text())["args"]
    assert (args["recipe"], args["no_lsd"], args["no_rsd"], args["no_ssd"], args["teacher_bn"], args["lam"]) == (
        "step", True, True, False, "batch", 0.1)
    row = summary_rows(tmp_path / "default")[-1]
    assert float(row["lsd"]) == float(row["rsd"]) == 0.0 and float(row["ssd"]) != 0.0
    assert math.isfinite(float(row["gcos_ssd"])) and "gcos_lsd" not in row
    assert "MSKD recipe step" in capsys.readouterr().out
