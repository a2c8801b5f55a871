"""MSKD in a plain PyTorch training loop: a timm model, our synthetic multi-label dataset, SGD.

    python examples/plain_loop.py [--epochs 2] [--train-size 200] [--cache DIR]
"""

import argparse

import timm
import torch

from mskd_fast import MSKD
from mskd_fast.data import SyntheticConfig, build_loader, load_index

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--train-size", type=int, default=200)
p.add_argument("--img-size", type=int, default=64)
p.add_argument("--cache", default=None, help="synthetic dataset cache folder (default ~/.cache/mskd_fast)")
args = p.parse_args()

config = SyntheticConfig(train_size=args.train_size, img_size=args.img_size, cache_dir=args.cache)
index = load_index("synthetic", None, "train", synthetic=config)
loader = build_loader(index, train=True, batch_size=16, img_size=args.img_size, loader="torch", num_workers=0)
torch.manual_seed(0)
model = timm.create_model("resnet18", num_classes=index.num_classes)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

mskd = MSKD(model, recipe="stable")
for epoch in range(args.epochs):
    loader.set_epoch(epoch)
    for images, targets, _ in loader:
        out = mskd(images, targets)
        out["loss"].backward()
        optimizer.step(); optimizer.zero_grad()  # noqa: E702 (the README's three lines)
    terms = " ".join(f"{k} {out[k].item():.4f}" for k in ("loss", "bce", "lsd", "rsd", "ssd"))
    print(f"epoch {epoch + 1}: {terms}")
