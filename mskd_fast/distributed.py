"""Process-group setup for ``torchrun`` launches (NCCL on GPUs, gloo on CPU) and small collective helpers.

Single-process runs never touch ``torch.distributed``: every helper degrades to the local value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_MIN", "DistContext", "all_gather_objects", "all_reduce_max", "barrier",
           "collective_timeout_message", "init_distributed", "shutdown"]


@dataclass
class DistContext:
    """``rank``/``world_size``/``local_rank`` of this process, its ``device`` and the process-group backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``--device`` -> torch.device: ``auto`` = ``cuda:<local_rank>`` if CUDA is present, else ``cpu``.

    Raises ``ValueError`` for a CUDA device that is not available or an unknown spelling.
    """
    if flag == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(flag)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {flag!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {flag}: CUDA is not available on this machine (use --device cpu)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {flag!r}")
    return device


DEFAULT_TIMEOUT_MIN = 10.0


def init_distributed(device_flag: str = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistContext:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``), else a single-process context.

    Under torchrun each process uses ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo. Either way a CUDA
    device (``--device cuda:1`` included) becomes the process's current device. ``timeout_min``: how long a
    collective waits for the other ranks before it fails (``--dist-timeout``; torch's defaults are 10 min
    for NCCL and 30 min for gloo), so a rank that stops responding ends the job instead of holding it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        device = resolve_device(device_flag, 0)
        if device.type == "cuda":  # eager launches and new CUDA tensors default to the current device
            torch.cuda.set_device(device)
        return DistContext(device=device)
    if device_flag not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"under torchrun --device must be auto, cpu or cuda (one GPU per process), got {device_flag!r}"
        )
    device = resolve_device(device_flag, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def collective_timeout_message(exc: BaseException, ctx: DistContext, timeout_min: float) -> str | None:
    """A one-line explanation when ``exc`` is a collective that timed out waiting for another rank, else None.

    Names the peer when the backend's text does (gloo reports the peer's address or rank on some paths).
    """
    text = str(exc)
    if not ctx.distributed or not any(k in text for k in ("Timed out", "timed out", "Timeout", "timeout")):
        return None
    import re

    peer = re.search(r"(rank \d+|[Rr]ank:? ?\d+|\[[0-9a-fA-F.:]+\]:\d+)", text)
    told = f" (the backend names {peer.group(1)})" if peer else " (the backend does not say which)"
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return (f"rank {ctx.rank}: a collective operation waited --dist-timeout {timeout_min:g} min for the other "
            f"ranks and gave up: a rank stopped responding{told} (a stopped or frozen process, a hung GPU, a "
            f"network failure). Backend message: {first}")


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for single-process runs)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_max(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise max of ``values`` over all ranks (the local list when single-process)."""
    if not ctx.distributed:
        return list(values)
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_objects(ctx: DistContext, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when single-process)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
