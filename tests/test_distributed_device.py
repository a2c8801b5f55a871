"""The single-process trainer makes its ``--device`` the current CUDA device (issue 11 item 6), checked on CPU
with the CUDA queries replaced by stand-ins."""

import torch

from mskd_fast import distributed


def _fake_cuda(monkeypatch, count=2):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_single_process_sets_the_requested_cuda_device(monkeypatch):
    calls = _fake_cuda(monkeypatch)
    ctx = distributed.init_distributed("cuda:1")
    assert ctx.device == torch.device("cuda", 1) and not ctx.distributed
    assert calls == [torch.device("cuda", 1)]


def test_single_process_cpu_leaves_cuda_alone(monkeypatch):
    calls = _fake_cuda(monkeypatch)
    assert distributed.init_distributed("cpu").device == torch.device("cpu")
    assert calls == []
