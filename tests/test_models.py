"""mskd_fast.models: timm wrapper (NCHW/NHWC maps, q/r heads), eval twin, pretrained-from-cache, initial checkpoints."""

import os
import warnings

import pytest
import timm
import torch

from mskd_fast import reference
from mskd_fast.models import (
    MSKDModel,
    PretrainedWeightsMissing,
    check_model,
    create_model,
    eval_twin,
    find_cached_pretrained,
    load_initial_checkpoint,
)

TINY_RESNET = dict(channels=(8, 16, 32, 64), stem_width=8)
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)


def _resnet(num_classes=5, **kw):
    model, note = create_model("resnet10t", num_classes, **TINY_RESNET, **kw)
    return model


def test_resnet_features_q_r_shapes_and_r_is_head_of_roi_pool():
    model = _resnet().eval()
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [10.0, 5.0, 60.0, 50.0], [0.0, 0.0, 64.0, 64.0]],
                          [[3.0, 4.0, 20.0, 40.0], [30.0, 30.0, 64.0, 64.0], [8.0, 8.0, 40.0, 24.0]]])
    with torch.no_grad():
        f = model.features(x)
        q, r = model(x, boxes)
        q_only = model(x)
    assert f.shape == (2, 64, 2, 2)
    assert q.shape == (2, 5) and r.shape == (2, 3, 5) and q.dtype == r.dtype == torch.float32
    torch.testing.assert_close(q, q_only)
    torch.testing.assert_close(q, model.fc(f.mean((2, 3))))
    # r: the same linear head on roi_pool(f, boxes, spatial_scale = h/H = 2/64), image-major rows
    pooled = reference.roi_pool(f, boxes, 2 / 64, output_size=1, mode="max").flatten(1)
    torch.testing.assert_close(r, model.fc(pooled).view(2, 3, 5), rtol=1e-5, atol=1e-5)


def test_channels_last_nhwc_backbone_swin():
    model, _ = create_model("swin_tiny_patch4_window7_224", 4, img_size=64, **TINY_SWIN)
    assert model.nhwc
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.backbone.forward_features(x)  # (B, h, w, D)
        f = model.features(x)
        q, r = model(x, torch.tensor([[[0.0, 0.0, 32.0, 32.0]], [[16.0, 16.0, 64.0, 64.0]]]))
    assert raw.shape == (2, 2, 2, 128)  # 16 * 2**3 channels after three patch merges
    assert f.shape == (2, 128, 2, 2)
    torch.testing.assert_close(f, raw.permute(0, 3, 1, 2))
    assert q.shape == (2, 4) and r.shape == (2, 1, 4)


def test_token_sequence_model_is_refused_clearly():
    model, _ = create_model("vit_tiny_patch16_224", 3, img_size=32, depth=1)
    with pytest.raises(ValueError, match="spatial feature map"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet10t", dict(img_size=64, **TINY_RESNET), (64, 2, 2)),
        ("swin_tiny_patch4_window7_224", dict(img_size=64, **TINY_SWIN), (128, 2, 2)),  # NHWC map
        ("resnet34", dict(img_size=224), (512, 7, 7)),  # full size: cheap, nothing is allocated
    ],
)
def test_check_model_accepts_spatial_backbones(name, kwargs, expected):
    assert check_model(name, **kwargs) == expected


@pytest.mark.parametrize(
    "name, kwargs, pattern",
    [
        ("vit_tiny_patch16_224", dict(img_size=64), r"--model 'vit_tiny_patch16_224' is not supported: .*spatial "
                                                   r"feature map.*e\.g\. resnet34"),
        ("deit_tiny_patch16_224", {}, "is not supported"),
        ("resnet_does_not_exist", {}, "--model 'resnet_does_not_exist' is not a timm model name"),
        ("resnet10t", dict(no_such_arg=1), r"--model 'resnet10t' cannot be built .*--model-kwargs \{'no_such_arg'"),
    ],
)
def test_check_model_refuses_with_one_clear_message(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_model(name, **kwargs)


def test_unsupported_model_fails_through_the_cli_before_any_run_folder(tmp_path, capsys):
    from mskd_fast import train

    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", "vit_tiny_patch16_224", "--output", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model 'vit_tiny_patch16_224' is not supported" in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_model_and_bad_arguments():
    with pytest.raises(ValueError, match="not a timm model"):
        create_model("resnet_does_not_exist", 3)
    backbone = timm.create_model("resnet10t", num_classes=0, **TINY_RESNET)
    with pytest.raises(ValueError, match="num_classes"):
        MSKDModel(backbone, 0)
    with pytest.raises(ValueError, match="roi_mode"):
        MSKDModel(backbone, 3, roi_mode="median")


def test_eval_twin_shares_tensors_and_never_updates_bn_stats():
    model = _resnet()
    twin = eval_twin(model)
    assert not twin.training
    for (name, p), (name2, p2) in zip(model.named_parameters(), twin.named_parameters()):
        assert name == name2 and p is p2
    for b, b2 in zip(model.buffers(), twin.buffers()):
        assert b is b2
    bn_stats = [b.clone() for b in model.buffers()]
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        y1 = twin(x)
        y2 = twin(x[:2])
    for before, after in zip(bn_stats, model.buffers()):
        assert torch.equal(before, after), "teacher forward changed BN statistics"
    torch.testing.assert_close(y1[:2], y2, rtol=1e-5, atol=1e-6)  # eval behaviour: per-sample, no batch stats
    model.train()
    model(x).sum().backward()  # student forward in train mode updates BN stats ...
    assert any(not torch.equal(a, b) for a, b in zip(bn_stats, twin.buffers()))  # ... which the twin sees
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    with torch.no_grad():
        assert not torch.allclose(twin(x), y1)
    assert not twin.training and model.training


def test_pretrained_missing_offline_is_a_clear_error_or_random_init_when_allowed(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    import timm.models._builder as builder

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(builder, "load_pretrained", lambda *a, **k: pytest.fail("offline: nothing may download"))
    torch.hub.set_dir(str(tmp_path / "torchhub"))
    try:
        assert find_cached_pretrained("resnet10t") is None
        with pytest.raises(PretrainedWeightsMissing,
                           match=r"offline \(HF_HUB_OFFLINE=1\).*--initial-checkpoint PATH.*--allow-random-init"):
            create_model("resnet10t", 3, pretrained=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, note = create_model("resnet10t", 3, pretrained=True, allow_random_init=True)
        assert "random init" in note and any("Continuing from random init" in str(w.message) for w in caught)
    finally:
        torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))


def test_pretrained_online_downloads_through_timms_own_loader(tmp_path, monkeypatch):
    """Not cached, hub online: timm's load_pretrained (which downloads through the Hugging Face hub) is called
    with the model's pretrained config; a failing download is the clear error. (No network here: the loader is
    replaced by one that records the call.)"""
    import huggingface_hub.constants as hf_constants
    import timm.models._builder as builder

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    torch.hub.set_dir(str(tmp_path / "torchhub"))
    calls = []

    def fake_load_pretrained(model, pretrained_cfg=None, num_classes=1000, *args, **kwargs):
        calls.append((type(model).__name__, pretrained_cfg["hf_hub_id"], num_classes))
        with torch.no_grad():
            model.conv1[0].weight.fill_(0.5)  # as if the downloaded weights were loaded

    try:
        monkeypatch.setattr(builder, "load_pretrained", fake_load_pretrained)
        model, note = create_model("resnet10t", 3, pretrained=True)
        assert calls == [("ResNet", "timm/resnet10t.c3_in1k", 0)] and "downloaded by timm" in note
        assert torch.all(model.backbone.conv1[0].weight == 0.5) and model.fc.weight.shape == (3, 512)

        def failing(*args, **kwargs):
            raise OSError("Connection refused")

        monkeypatch.setattr(builder, "load_pretrained", failing)
        with pytest.raises(PretrainedWeightsMissing, match="downloading them failed .OSError: Connection refused."):
            create_model("resnet10t", 3, pretrained=True)
    finally:
        torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))


def test_pretrained_loads_from_a_local_hub_cache_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file

    hub = tmp_path / "hf"
    snapshot = hub / "models--timm--resnet10t.c3_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (hub / "models--timm--resnet10t.c3_in1k" / "refs").mkdir()
    (hub / "models--timm--resnet10t.c3_in1k" / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(3)
    source = timm.create_model("resnet10t", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = find_cached_pretrained("resnet10t")
    assert found is not None and found.path.endswith("model.safetensors")
    model, note = create_model("resnet10t", 7, pretrained=True)
    assert "pretrained" in note
    torch.testing.assert_close(model.backbone.conv1[0].weight, source.conv1[0].weight, rtol=0, atol=0)
    assert model.fc.weight.shape == (7, 512)


def test_initial_checkpoint_timm_state_dict_and_trainer_blob(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=1000, **TINY_RESNET)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    model = _resnet(num_classes=4)
    note = load_initial_checkpoint(model, str(path))
    assert "classifier left at init" in note
    torch.testing.assert_close(model.backbone.conv1[0].weight, source.conv1[0].weight, rtol=0, atol=0)
    # an mskd-fast style blob: everything, classifier included
    other = _resnet(num_classes=4)
    blob = tmp_path / "blob.pt"
    torch.save({"model": other.state_dict()}, blob)
    note = load_initial_checkpoint(model, str(blob))
    assert "with classifier" in note
    torch.testing.assert_close(model.fc.weight, other.fc.weight, rtol=0, atol=0)


def test_initial_checkpoint_errors(tmp_path):
    model = _resnet()
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_initial_checkpoint(model, str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_initial_checkpoint(model, str(bad))
    wrong = tmp_path / "wrong.pt"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), wrong)  # other widths
    with pytest.raises(ValueError, match="no tensor|lacks"):
        load_initial_checkpoint(model, str(wrong))


def test_batch_stat_twin_uses_batch_statistics_and_leaves_running_stats():
    import torch.nn as nn

    from mskd_fast.models import batch_stat_twin, eval_twin

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model[1].running_mean.fill_(3.0)
    twin = batch_stat_twin(model)
    x = torch.randn(5, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = twin(x)
        feats = model[0](x)
        expected = model[4](model[3](torch.nn.functional.batch_norm(
            feats, None, None, model[1].weight, model[1].bias, training=True, eps=model[1].eps)))
    torch.testing.assert_close(out, expected)  # batch statistics, and Dropout stayed off
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model[1].track_running_stats and eval_twin(model)[1].track_running_stats
    assert twin[0].weight is model[0].weight
