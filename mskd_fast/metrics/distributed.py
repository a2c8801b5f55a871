"""All-gather of variable-length row blocks across a torch.distributed process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group=None) -> torch.device:
    """Device the group's backend communicates on: CUDA for a pure NCCL group, else CPU (gloo, mpi)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and "cpu" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_int64(values: list[int], group=None) -> list[list[int]]:
    """Gather a short list of ints from every rank; returns one list per rank, in rank order."""
    device = collective_device(group)
    local = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return [t.cpu().tolist() for t in out]


def all_gather_rows(tensors: list[torch.Tensor], sizes: list[int], group=None) -> list[torch.Tensor]:
    """Concatenate, in rank order, every rank's row blocks along dim 0.

    Args:
        tensors: this rank's tensors; all share the same number of rows ``n_r`` (dim 0). Trailing
            shapes and dtypes must be equal on every rank.
        sizes: ``n_r`` of every rank, in rank order (e.g. from :func:`all_gather_int64`).
        group: process group (None = default group).

    Returns:
        One CPU tensor per input, with ``sum(sizes)`` rows: rank 0's rows, then rank 1's, ...
    """
    device = collective_device(group)
    max_rows = max(sizes)
    gathered = []
    for local in tensors:
        if max_rows == 0:
            gathered.append(local.cpu())
            continue
        padded = torch.zeros((max_rows, *local.shape[1:]), dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local.to(device)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        gathered.append(torch.cat([p[:n].cpu() for p, n in zip(parts, sizes)], dim=0))
    return gathered
