"""Method objects under DDP (2 CPU processes, gloo): shared state stays identical on every process, per-process
state stays per process, and the methods' own parameters get averaged gradients like the DDP-wrapped student."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

METHODS_UNDER_TEST = ("pskd", "dlb", "uskd", "mulsupcon", "ddgsd", "mskd")


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from mskd_fast.methods import build_method
        from mskd_fast.models import create_model
        from mskd_fast.step import StepConfig, TrainStep, build_optimizer
        from mskd_fast.train_args import build_parser
        from mskd_fast.train_build import build_method_object

        out = {}
        for name in METHODS_UNDER_TEST:
            torch.manual_seed(0)  # the same initial weights on every process
            model, _ = create_model("resnet10t", 5, channels=(8, 16, 32, 64), stem_width=8)
            model.train()
            ddp = DDP(model)
            args = build_parser().parse_args(["--mulsupcon-queue", "12"])
            generator = torch.Generator().manual_seed(10 + rank)
            if name == "mskd":  # MSKD's S-SD snapshot: identical on every process (parameters are)
                method = build_method_object(build_parser().parse_args([]), ddp, num_samples=32, generator=generator)
            else:
                method = build_method(name, ddp, args, num_samples=32, epochs=2, generator=generator)
            method.sync_gradients()
            torch.manual_seed(100 + rank)  # per-process streams (dropout), as the trainer does
            opt = build_optimizer(model, 0.05, backbone_lr_mult=1.0, extra_params=method.extra_parameters())
            step = TrainStep(method, opt, None, StepConfig(amp_dtype=None), fullgraph=False)
            g = torch.Generator().manual_seed(1000 + rank)  # each process its own batches and sample ids
            for s in range(3):
                x = torch.randn(4, 3, 64, 64, generator=g)
                y = (torch.rand(4, 5, generator=g) < 0.4).float()
                ids = torch.arange(4) + 4 * (2 * s + rank)
                result = step(x, y, sample_ids=ids, epoch=0)
                assert result["skipped"] == 0
            # BatchNorm statistics are per process between the trainer's epoch-end broadcasts: left out here
            per_process = ("running_mean", "running_var", "num_batches_tracked")
            out[name] = {
                "model": {k: v.detach().clone() for k, v in model.named_parameters()},
                "method": {k: v.clone() for k, v in method.state_dict().items()
                           if not k.endswith(per_process) and k != "generator"},  # MSKD's box generator: per process
                "rank_state": method.rank_state_dict(),
            }
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_methods_keep_shared_state_identical_across_processes():
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
        r0, r1 = results[0], results[1]
    for name in METHODS_UNDER_TEST:
        for key, value in r0[name]["model"].items():
            torch.testing.assert_close(value, r1[name]["model"][key], msg=f"{name}: model {key} differs")
        for key, value in r0[name]["method"].items():
            torch.testing.assert_close(value, r1[name]["method"][key], msg=f"{name}: method state {key} differs")
    # PS-KD: every process's bank holds both processes' rows (3 steps x 4 ids x 2 processes)
    assert int(r0["pskd"]["method"]["seen"].sum()) == 24
    # MulSupCon: 3 steps x 8 gathered keys through a 12-slot queue: full, pointer at 24 % 12
    assert bool(r0["mulsupcon"]["method"]["queue_full"]) and int(r0["mulsupcon"]["method"]["queue_pointer"]) == 0
    assert any(k.startswith("teacher.") for k in r0["mskd"]["method"])  # the snapshot was compared
    # DLB: the stored half batch is each process's own
    assert not torch.equal(r0["dlb"]["rank_state"]["images"], r1["dlb"]["rank_state"]["images"])
