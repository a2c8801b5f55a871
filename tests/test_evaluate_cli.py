"""``python -m mskd_fast.evaluate``: defaults come from the training run (loader included), and both loaders agree."""

import json

import pytest
import torch
import yaml

from mskd_fast.checkpoint import FORMAT
from mskd_fast.data import SyntheticConfig, dali_import_error, load_index
from mskd_fast.evaluate import main as evaluate_main
from mskd_fast.models import create_model
from mskd_fast.reports import METRIC_KEYS

needs_dali = pytest.mark.skipif(dali_import_error() is not None, reason=f"DALI: {dali_import_error()}")
TINY = {"channels": (8, 16, 32, 64), "stem_width": 8}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _write_run(folder, cache, loader, resolved=None):
    """A trainer-format checkpoint (random-init tiny ResNet) whose run trained with ``loader``."""
    config = SyntheticConfig(train_size=16, test_size=24, img_size=64, seed=0, cache_dir=cache)
    index = load_index("synthetic", None, "test", synthetic=config)
    torch.manual_seed(0)
    model, _ = create_model("resnet10t", index.num_classes, img_size=48, **TINY)
    args = {"dataset": "synthetic", "data_dir": None, "train_split": None, "eval_split": None,
            "voc_difficult": "positive", "on_bad_image": "error", "manifest_classes": None, "synthetic_size": 16,
            "synthetic_test_size": 24, "synthetic_img_size": 64, "synthetic_seed": 0, "synthetic_cache": cache,
            "loader": loader, "workers": 0 if loader == "torch" else 1, "batch_size": 8, "img_size": 48,
            "amp": False, "amp_dtype": "bfloat16", "channels_last": False, "threshold": 0.5}
    meta = {"model_name": "resnet10t", "num_classes": index.num_classes, "class_names": list(index.class_names),
            "img_size": 48, "roi_mode": "max", "model_kwargs": TINY, "dataset": "synthetic", "method": "mskd"}
    folder.mkdir()
    path = folder / "last.pt"
    torch.save({"format": FORMAT, "model": model.state_dict(), "args": args, "meta": meta, "epoch": 1}, path)
    if resolved is not None:
        (folder / "args.yaml").write_text(yaml.safe_dump({"args": args, "resolved": {"loader": resolved}}))
    return path


def _evaluate(path, *extra):
    assert evaluate_main(["--checkpoint", str(path), "--device", "cpu", *extra]) == 0
    with open(path.parent / "eval-synthetic-test" / "metrics.json") as fh:
        return json.load(fh)


def test_torch_run_is_evaluated_with_the_torch_loader_by_default(tmp_path, cache, capsys):
    metrics = _evaluate(_write_run(tmp_path / "run", cache, "torch"))
    assert metrics["loader"] == "torch" and metrics["img_size"] == 48
    assert "loader torch | img 48px" in capsys.readouterr().out


def test_auto_run_uses_the_loader_the_trainer_resolved(tmp_path, cache):
    assert _evaluate(_write_run(tmp_path / "run", cache, "auto", resolved="torch"))["loader"] == "torch"


@needs_dali
def test_dali_run_defaults_to_dali_and_both_loaders_give_the_same_metrics(tmp_path, cache):
    path = _write_run(tmp_path / "run", cache, "dali")
    with_dali = _evaluate(path)
    assert with_dali["loader"] == "dali-cpu"
    with_torch = _evaluate(path, "--loader", "torch", "-j", "0")  # an explicit flag still wins
    assert with_torch["loader"] == "torch"
    for key in METRIC_KEYS:
        assert with_torch[key] == pytest.approx(with_dali[key], abs=1e-3), key


def test_write_eval_reports_adds_the_collapse_signals_of_the_same_rows(tmp_path, cache):
    from mskd_fast.collapse import eval_signals
    from mskd_fast.evaluate import write_eval_reports
    from mskd_fast.metrics import MultiLabelMetrics

    index = load_index("synthetic", None, "test",
                       synthetic=SyntheticConfig(train_size=16, test_size=24, img_size=64, seed=0, cache_dir=cache))
    logits = torch.randn(len(index), index.num_classes) * 3
    metrics = MultiLabelMetrics(index.num_classes)
    metrics.update(logits, torch.from_numpy(index.labels).float(), torch.arange(len(index)))
    plain, _ = write_eval_reports(metrics, index, 64, str(tmp_path / "a"), label="t")
    assert "max_abs_logit" not in plain
    result, _ = write_eval_reports(metrics, index, 64, str(tmp_path / "b"), label="t", collapse_signals=True)
    assert result["mAP"] == plain["mAP"]
    assert {k: result[k] for k in eval_signals(logits)} == pytest.approx(eval_signals(logits))
