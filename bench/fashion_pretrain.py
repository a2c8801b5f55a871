"""A pretrained backbone for the real-object accuracy study, made here (ImageNet weights cannot be downloaded).

A timm backbone (inside the trainer's ``MSKDModel``, so the key names match ``--initial-checkpoint``) is
trained with softmax cross-entropy to name the **single** Fashion-MNIST item on a canvas of the study's
size, drawn by :func:`mskd_fast.data.fashion.render_composite` with one item per image from the
``pretrain`` pool (training items 0-49,999, disjoint from every ``fashion-multi`` split), side log-uniform
from 1/6 to 0.95 of the canvas, random position, plus horizontal flips. Images are ImageNet-normalised
like the trainer's loaders. SGD (momentum 0.9, nesterov, weight decay 5e-4), cosine LR with one warm-up
epoch, batch 128. Accuracy is measured on 2,000 single-item canvases of the official *test* items.

Everything is a function of the config (``torch`` and ``numpy`` seeded; image ``i`` of epoch ``e`` is
drawn by ``default_rng([seed, e, i])``), and the result is cached: ``<cache>/pretrained/<key>.pt`` holds
only the ``backbone.*`` tensors (the classifier is dropped) and ``<key>.json`` the config and accuracy;
both are written atomically, and an existing pair is reused. This harness belongs to the study, not to
the product.

Usage::

    python bench/fashion_pretrain.py --model resnet10t --model-kwargs output_stride=16 --img-size 64 \\
        --epochs 3 --threads 2                      # prints the checkpoint path
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PRETRAIN_SIDE_FRAC = (1 / 6, 0.95)
TEST_IMAGES = 2000
BATCH = 128


def config_key(config: dict) -> str:
    """A file-name-safe key of everything the weights depend on."""
    text = json.dumps(config, sort_keys=True)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{config['model']}-px{config['img_size']}-e{config['epochs']}-{digest}"


def render_batch(items: np.ndarray, labels: np.ndarray, size: int, seeds: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-item canvases ``(B, 3, size, size)`` float32 ImageNet-normalised and their labels ``(B,)``."""
    from mskd_fast.data import IMAGENET_MEAN, IMAGENET_STD
    from mskd_fast.data.fashion import render_composite

    images, classes = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        image, _, cls = render_composite(rng, items, labels, size, min_items=1, max_items=1,
                                         min_side_frac=PRETRAIN_SIDE_FRAC[0], max_side_frac=PRETRAIN_SIDE_FRAC[1])
        if rng.random() < 0.5:
            image = image[:, ::-1]
        images.append(image)
        classes.append(int(cls[0]))
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(classes)


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def test_accuracy(model, size: int, data_dir: str | None, seed: int) -> float:
    """Top-1 accuracy (percent) on ``TEST_IMAGES`` single-item canvases of the official test items."""
    from mskd_fast.data.fashion import load_items

    items, labels = load_items("test", data_dir)
    model.eval()
    correct = 0
    for start in range(0, TEST_IMAGES, 256):
        seeds = [[seed, 999_999, i] for i in range(start, min(TEST_IMAGES, start + 256))]
        x, y = render_batch(items, labels, size, seeds)
        correct += int((model(x).argmax(1) == y).sum())
    model.train()
    return 100.0 * correct / TEST_IMAGES


def pretrain(config: dict, cache_dir: str, data_dir: str | None = None, log=print) -> str:
    """Train (or find in the cache) the backbone of ``config``; returns the checkpoint path."""
    from mskd_fast.data.fashion import FASHION_CLASSES, load_items
    from mskd_fast.data.generated import cache_root
    from mskd_fast.models import create_model

    out_dir = os.path.join(cache_root(cache_dir), "pretrained")
    os.makedirs(out_dir, exist_ok=True)
    key = config_key(config)
    ckpt, info_path = os.path.join(out_dir, key + ".pt"), os.path.join(out_dir, key + ".json")
    if os.path.isfile(ckpt) and os.path.isfile(info_path):
        with open(info_path) as fh:
            accuracy = json.load(fh)["test_accuracy"]
        log(f"pretrained backbone reused: {ckpt} ({accuracy:.1f} % single-item test accuracy)")
        return ckpt
    items, labels = load_items("pretrain", data_dir)
    if config.get("items"):
        items, labels = items[: config["items"]], labels[: config["items"]]
    torch.manual_seed(config["seed"])
    model, _ = create_model(config["model"], len(FASHION_CLASSES), img_size=config["img_size"],
                            **dict(config["model_kwargs"]))
    model.train()
    steps_per_epoch = max(1, len(items) // BATCH)
    total = steps_per_epoch * config["epochs"]
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    warm = steps_per_epoch

    def factor(step):
        if step < warm:
            return 0.01 + 0.99 * step / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    t0 = time.time()
    for epoch in range(config["epochs"]):
        order = np.random.default_rng([config["seed"], epoch]).permutation(len(items))
        running, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * BATCH:(step + 1) * BATCH]
            x, y = render_batch(items, labels, config["img_size"], [[config["seed"], epoch, int(i)] for i in idx])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            if (step + 1) % 100 == 0:
                log(f"pretrain epoch {epoch + 1} step {step + 1}/{steps_per_epoch}: CE {running / seen:.4f} "
                    f"({seen / (time.time() - t0):.0f} img/s)")
        t0 = time.time()
    accuracy = test_accuracy(model, config["img_size"], data_dir, config["seed"])
    backbone = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    _atomic_write(ckpt, lambda tmp: torch.save({"model": backbone}, tmp))
    info = {"config": config, "test_accuracy": accuracy, "checkpoint": ckpt, "torch": torch.__version__,
            "keys": len(backbone), "classifier": "dropped"}
    _atomic_write(info_path, lambda tmp: open(tmp, "w").write(json.dumps(info, indent=1) + "\n"))
    log(f"pretrained backbone written: {ckpt} ({accuracy:.1f} % single-item test accuracy)")
    return ckpt


def build_config(model: str, model_kwargs: list[str], img_size: int, epochs: int, lr: float = 0.1,
                 seed: int = 0, items: int | None = None) -> dict:
    """The pretraining config (JSON-safe; ``model_kwargs`` as ``KEY=VALUE`` strings parsed by literal_eval;
    ``items``: use only the first ``items`` of the pool, for smoke tests)."""
    import ast

    kwargs = []
    for item in model_kwargs:
        k, _, v = item.partition("=")
        kwargs.append([k, ast.literal_eval(v)])
    return {"model": model, "model_kwargs": kwargs, "img_size": img_size, "epochs": epochs, "lr": lr, "seed": seed,
            "side_frac": list(PRETRAIN_SIDE_FRAC), "batch": BATCH, "version": 1,
            **({"items": items} if items else {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--model-kwargs", nargs="*", default=["output_stride=16"])
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--cache", default=None, help="cache folder (default $MSKD_FAST_CACHE or ~/.cache/mskd_fast)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(args.model, args.model_kwargs, args.img_size, args.epochs, args.lr, args.seed)
    print(pretrain(config, args.cache, args.data_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
