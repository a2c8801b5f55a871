"""MSKD as a timm training task: timm's optimizer and scheduler factories, its checkpoint saver and multi-label
evaluator, around ``mskd_fast.integrations.timm.MSKDTask`` (the loop is timm's train.py in miniature).

    python examples/timm_task.py [--epochs 2] [--train-size 200] [--cache DIR] [--output DIR]
"""

import argparse
import os

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver

from mskd_fast.data import SyntheticConfig, build_loader, load_index
from mskd_fast.integrations.timm import MSKDTask

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--train-size", type=int, default=200)
p.add_argument("--img-size", type=int, default=64)
p.add_argument("--cache", default=None, help="synthetic dataset cache folder (default ~/.cache/mskd_fast)")
p.add_argument("--output", default="output/timm_task", help="checkpoint folder")
args = p.parse_args()

config = SyntheticConfig(train_size=args.train_size, img_size=args.img_size, cache_dir=args.cache)
train_index = load_index("synthetic", None, "train", synthetic=config)
test_index = load_index("synthetic", None, "test", synthetic=config)
common = dict(batch_size=16, img_size=args.img_size, loader="torch", num_workers=0)
loader_train = build_loader(train_index, train=True, **common)
loader_eval = build_loader(test_index, train=False, **common)

torch.manual_seed(0)
model = timm.create_model("resnet18", num_classes=train_index.num_classes)
task = MSKDTask(model, recipe="stable", verbose=False)
optimizer = create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=0)
task.setup_ema(decay=0.99)
os.makedirs(args.output, exist_ok=True)
saver = CheckpointSaver(model=model, optimizer=optimizer, model_ema=task.get_trainable_module(ema=True),
                        checkpoint_dir=args.output, recovery_dir=args.output, max_history=1, task=task)

for epoch in range(args.epochs):
    loader_train.set_epoch(epoch)
    task.get_trainable_module().train()  # as timm's train.py: the task's teachers stay in eval behaviour
    for step, (images, targets, _) in enumerate(loader_train):
        result = task(images, targets)
        result["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        task.update_ema(step=epoch * len(loader_train) + step + 1)
    scheduler.step(epoch + 1)
    eval_model, evaluator = task.get_eval_model(), task.create_evaluator()
    eval_model.eval()
    with torch.no_grad():
        for images, targets, ids in loader_eval:
            keep = ids >= 0  # evaluation padding
            evaluator.update(eval_model(images)[keep], targets[keep])
    metrics = evaluator.compute()
    saver.save_checkpoint(epoch, metric=metrics["map"])
    print(f"epoch {epoch + 1}: loss {result['loss'].item():.4f} ssd {result['ssd'].item():.4f} "
          f"eval loss {metrics['loss']:.4f} mAP {metrics['map']:.2f}")
