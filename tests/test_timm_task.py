"""mskd_fast.integrations.timm.MSKDTask against the installed timm's own classes: timm's optimizer and scheduler
factories, timm.utils.CheckpointSaver, timm.task.resume_task_checkpoint / load_task_ema_checkpoint, ModelEmaV3
through setup_ema / update_ema, the multi-label evaluator, and DDP (one gloo process) through prepare_distributed.
The resume continues exactly: the same losses, parameters and EMA as an uninterrupted run."""

import os

import pytest
import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.task import TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import CheckpointSaver

from mskd_fast.integrations.timm import MSKDTask

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)
C = 5
STEPS_PER_EPOCH = 3


def _batches(epochs=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(epochs * STEPS_PER_EPOCH):
        x = torch.randn(4, 3, 64, 64, generator=g)
        y = (torch.rand(4, C, generator=g) < 0.4).float()
        y[:, 0] = 1.0
        out.append((x, y))
    return out


def _make():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=C, **TINY)
    task = MSKDTask(model, recipe="stable", seed=1, verbose=False)
    optimizer = create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    task.setup_ema(decay=0.9)
    return model, task, optimizer


def _epoch(task, optimizer, batches, epoch):
    """timm's train_one_epoch in miniature: trainable_module.train(), task(input, target), backward, step, EMA."""
    task.get_trainable_module().train()
    losses = []
    for i, (x, y) in enumerate(batches[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]):
        result = task(x, y)
        result["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        task.update_ema(step=epoch * STEPS_PER_EPOCH + i + 1)
        losses.append(result["loss"].detach())
    return losses


def test_task_is_a_timm_training_task_with_mskd_outputs():
    model, task, _ = _make()
    assert isinstance(task, TrainingTask) and task.get_trainable_module() is model
    x, y = _batches()[0]
    out = task(x, y)
    assert set(out) == {"loss", "output", "bce", "lsd", "rsd", "ssd"} and out["output"].shape == (4, C)
    torch.testing.assert_close(out["output"], model(x))  # MSKD's q is the timm model's own forward
    task.train()
    assert not task.mskd.teacher.training  # task.train() does not reach the teachers
    assert all(not name.startswith("mskd") for name, _ in task.named_modules())
    evaluator = task.create_evaluator()
    evaluator.update(out["output"], y)
    assert 0.0 <= evaluator.compute()["map"] <= 100.0
    with pytest.raises(ValueError, match="targets must contain only 0 and 1"):
        task(x, y * 0.9)  # soft targets (label smoothing, mixup) are refused


def test_checkpoint_saver_resume_continues_exactly(tmp_path):
    batches = _batches()
    model_a, task_a, opt_a = _make()
    straight = _epoch(task_a, opt_a, batches, 0) + _epoch(task_a, opt_a, batches, 1)

    model_b, task_b, opt_b = _make()
    _epoch(task_b, opt_b, batches, 0)
    saver = CheckpointSaver(model=model_b, optimizer=opt_b, model_ema=task_b.get_trainable_module(ema=True),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task_b)
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = os.path.join(str(tmp_path), "last.pth.tar")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    assert "mskd" in blob["task_state"] and "task_state_ema" not in blob
    assert any(k.startswith("teacher.") for k in blob["task_state"]["mskd"])
    assert set(blob["state_dict"]) == set(model_b.state_dict())  # plain timm keys

    model_c, task_c, opt_c = _make()
    _epoch(task_c, opt_c, batches, 1)  # a different history: the resume must overwrite all of it
    epoch = resume_task_checkpoint(task_c, path, optimizer=opt_c, log_info=False)
    load_task_ema_checkpoint(task_c, path)
    assert epoch == 1
    resumed = _epoch(task_c, opt_c, batches, 1)
    for a, b in zip(straight[STEPS_PER_EPOCH:], resumed):
        assert torch.equal(a, b)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    # without the task state (S-SD snapshot, box generator) the continuation is not the same run
    model_d, task_d, opt_d = _make()
    model_d.load_state_dict(blob["state_dict"])
    opt_d.load_state_dict(blob["optimizer"])
    assert not torch.equal(_epoch(task_d, opt_d, batches, 1)[0], straight[STEPS_PER_EPOCH])
    ema_a = task_a.get_eval_model(ema=True).module.state_dict()
    ema_c = task_c.get_eval_model(ema=True).module.state_dict()
    assert all(torch.equal(v, ema_c[k]) for k, v in ema_a.items())


def test_timm_scheduler_and_strict_task_state(tmp_path):
    from timm.scheduler import create_scheduler_v2

    model, task, optimizer = _make()
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, warmup_epochs=0)
    _epoch(task, optimizer, _batches(), 0)
    scheduler.step(1)
    assert optimizer.param_groups[0]["lr"] < 0.05
    with pytest.raises(ValueError, match="task_state"):
        task.load_task_state({})
    task.load_task_state({}, strict=False)


def test_prepare_distributed_wraps_only_the_student_and_trains(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model, task, optimizer = _make()
        task.prepare_distributed()
        wrapped = task.get_trainable_module()
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and hasattr(task.no_sync(), "__enter__")
        assert task.get_eval_model() is model  # checkpoints and evaluation use the plain timm model
        losses = _epoch(task, optimizer, _batches(), 0)
        assert all(torch.isfinite(loss) for loss in losses)
        with task.no_sync():
            task(*_batches()[0])["loss"].backward()
    finally:
        dist.destroy_process_group()


def test_compile_compiles_the_mskd_region_and_the_eval_model():
    model, task, optimizer = _make()
    eval_model = task.compile(backend="eager")
    assert task.get_eval_model() is eval_model and eval_model is not model
    _epoch(task, optimizer, _batches(), 0)  # steps 2-3 run the compiled region (step 1: no S-SD teacher yet)
    state = task.get_checkpoint_state()["state_dict"]
    assert set(state) == set(model.state_dict())  # the compiled wrapper does not leak into the keys
