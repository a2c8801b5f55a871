"""How the Triton kernels are launched (kernels/_utils.launch) and how a tensor ``k`` reaches the graph kernel.

- Eager launches on CUDA tensors run under ``torch.cuda.device(<the tensors' device>)``: Triton
  launches on the current device otherwise, so ``--device cuda:1`` would run GPU-1 pointers on GPU 0.
  Checked on CPU with stand-ins for CUDA tensors (the guard logic), and on 2 GPUs when there are.
- Under the interpreter the kernel is called directly, never through ``wrap_triton`` (torch 2.11's
  rejects the interpreter's kernel objects; see kernels/_utils.launch).
- A CPU ``k`` handed to the graph kernel with CUDA inputs is moved with ``non_blocking=True`` (no
  host sync), checked on CPU with the ``meta`` device and on a GPU with ``set_sync_debug_mode``.
"""

import contextlib
from unittest import mock

import pytest
import torch
from _kernel_utils import DEVICE, cuda_only, ignore_interpreter_nan_warnings
from mskd_fast.kernels import _utils, graph

from mskd_fast import kernels
from mskd_fast import reference as ref

pytestmark = ignore_interpreter_nan_warnings


def _cuda_stand_in(index: int):
    """Something that passes for a real CUDA tensor on ``cuda:index`` in launch()'s checks."""
    t = mock.MagicMock(spec=torch.Tensor)
    t.is_cuda = True
    t.device = torch.device("cuda", index)
    return t


class _Recorder:
    """Stands in for ``torch.cuda.device`` and for ``wrap_triton(kernel)[grid]``; records the order of events."""

    def __init__(self):
        self.events = []

    @contextlib.contextmanager
    def device(self, device):
        self.events.append(("enter", device))
        yield
        self.events.append(("exit", device))

    def wrap_triton(self, kernel):
        recorder = self

        class _Indexable:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.events.append(("launch", kernel, grid, kwargs))

        return _Indexable()


@pytest.fixture
def compiled_launch(monkeypatch):
    """launch() as on a GPU machine (not interpreted), with the CUDA calls recorded instead of made."""
    rec = _Recorder()
    monkeypatch.setattr(_utils, "_INTERPRETED", False)
    monkeypatch.setattr(_utils, "wrap_triton", rec.wrap_triton)
    monkeypatch.setattr(_utils, "_is_fake", lambda t: False)
    monkeypatch.setattr(torch.cuda, "device", rec.device)
    return rec


def test_eager_launch_runs_under_the_tensors_device(compiled_launch):
    kernel = object()
    _utils.launch(kernel, (3,), _cuda_stand_in(1), _cuda_stand_in(1), 7, BLOCK=16)
    dev = torch.device("cuda", 1)
    assert compiled_launch.events == [("enter", dev), ("launch", kernel, (3,), {"BLOCK": 16}), ("exit", dev)]


def test_launch_without_cuda_tensors_sets_no_device(compiled_launch):
    kernel = object()
    _utils.launch(kernel, (1,), torch.zeros(2), 5)
    assert compiled_launch.events == [("launch", kernel, (1,), {})]


def test_launch_rejects_tensors_on_two_cuda_devices(compiled_launch):
    with pytest.raises(ValueError, match="one CUDA device"):
        _utils.launch(object(), (1,), _cuda_stand_in(0), _cuda_stand_in(1))
    assert compiled_launch.events == []


def test_fake_tensors_need_no_device_guard():
    """While torch.compile traces (fake tensors), Inductor's generated code sets the device itself."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(4, device="cuda")  # a fake CUDA tensor needs no GPU
    assert fake.is_cuda
    assert _utils.launch_device([fake]) is None
    assert _utils.launch_device([torch.zeros(1)]) is None


def test_interpreter_launch_bypasses_wrap_triton(monkeypatch):
    if not _utils._INTERPRETED:
        pytest.skip("runs the kernels in the Triton interpreter (TRITON_INTERPRET=1, set without CUDA)")

    def refuse(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")

    monkeypatch.setattr(_utils, "wrap_triton", refuse)  # what torch 2.11 does with interpreter kernels
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    y = (torch.rand(3, 8) < 0.3).float()
    loss = kernels.mbd_loss(s, t, y)
    assert loss.item() == pytest.approx(ref.mbd_loss(s.double(), t.double(), y).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_k_on_another_device_is_moved_without_blocking(monkeypatch, dtype):
    calls = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    moved = graph._k_tensor(torch.tensor(5, dtype=dtype), torch.device("meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.int64
    assert calls == [dict(device=torch.device("meta"), dtype=torch.int64, non_blocking=True)]
    same = graph._k_tensor(torch.tensor(5, dtype=dtype), torch.device("cpu"))
    assert same.item() == 5 and same.dtype == torch.int64


@cuda_only[0]
@cuda_only[1]
def test_cpu_k_with_cuda_inputs_causes_no_host_sync():
    b, s, c = 4, 3, 10
    o, q = torch.randn(b, s, c, device=DEVICE), torch.randn(b, c, device=DEVICE)
    y = (torch.rand(b, c, device=DEVICE) < 0.3).float()
    expected = kernels.reconstruct_logits(o, q, y, k=17)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z = kernels.reconstruct_logits(o, q, y, k=torch.tensor(17))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (fewer on this machine)")
def test_kernels_run_on_the_second_gpu():
    """Inputs on cuda:1 while cuda:0 is current: the launch must follow the tensors."""
    dev = torch.device("cuda", 1)
    s, t = torch.randn(5, 33, device=dev), torch.randn(5, 33, device=dev)
    y = (torch.rand(5, 33, device=dev) < 0.3).float()
    s.requires_grad_()
    with torch.cuda.device(0):
        loss = kernels.mbd_loss(s, t, y)
        (grad,) = torch.autograd.grad(loss, s)
    ref_s = s.detach().double().requires_grad_()
    ref_loss = ref.mbd_loss(ref_s, t.double(), y)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_s)
    assert loss.device == dev and grad.device == dev
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-6)
