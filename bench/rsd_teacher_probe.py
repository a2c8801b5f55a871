"""Probe: how good is R-SD's reconstructed teacher, and does its pull agree with BCE's?

For each checkpoint (a finished training run's ``last.pt``), over one split of its dataset, with the model in eval
behaviour (the teacher's), this computes per batch what MSKD's R-SD would see (SPEC 4): the crop logits
``o (B,S,C)`` of ``S`` crops resized to full size, the reconstructed teacher ``z`` (pseudo labels, graph
propagation, softmax over crops; ``--layers``, ``--crop-temperature``) with and without scale matching, and
reports, as mAP on the split, the student ``q``, the crops' mean and max logits, and the two teachers; then for
the teacher with the student's scale (``stable``'s):

* ``pos lowered``: the fraction of (image, present class) pairs where the teacher's probability is lower than
  the student's (R-SD then pushes a present class down), and ``neg raised`` the same for absent classes pushed up;
* ``cos(R-SD, BCE)``: the cosine between the gradients, with respect to ``q``, of the R-SD loss (``--mbd-form``)
  and of BCE, over the split (the logit-space version of the trainer's classifier diagnostics).

Crops are drawn with a fixed generator, so every checkpoint sees the same boxes. CPU, no gradient through the
network. Not a test; the results go into docs/ACCURACY.md.

``--crop-mode boxes`` is the oracle of issue 24, a study instrument and never a recipe: the ``S`` crops of an
image are placed on its annotated objects (``mskd_fast.boxes.object_boxes``: each object box grown about its
centre to the crop area, or the box itself when larger; objects reused when an image has fewer than ``S``;
random crops for an image without objects). It needs a dataset with boxes (``fashion-multi``, VOC, COCO) and
says so otherwise. Its stop rule, written before the probe ran: if the oracle teacher (``mAP z matched``) is not
within 1 val mAP of the student (``mAP q``) or above it on all three study checkpoints, R-SD's premise fails in
this regime whatever the crop placement.

    .venv/bin/python bench/rsd_teacher_probe.py --checkpoint RUN/last.pt [RUN2/last.pt ...] --split val
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from mskd_fast import ops
from mskd_fast.boxes import object_boxes, sample_boxes
from mskd_fast.checkpoint import load_checkpoint
from mskd_fast.data import build_loader, index_from_args
from mskd_fast.evaluate import _DATA_KEYS, model_from_checkpoint
from mskd_fast.metrics import MultiLabelMetrics


def _load(path: str, split: str, batch: int):
    ckpt = load_checkpoint(path, require=("model", "args", "meta"))
    meta, run_args = ckpt["meta"], ckpt["args"]
    args = argparse.Namespace(**{k: run_args.get(k) for k in _DATA_KEYS})
    args.eval_split = split
    index = index_from_args(args, "eval")
    model = model_from_checkpoint(ckpt).eval()
    loader = build_loader(index, train=False, batch_size=batch, img_size=run_args["img_size"], loader="torch",
                          num_workers=0, shard_id=0, num_shards=1, channels_last=False, device=torch.device("cpu"))
    return model, loader, meta["num_classes"], run_args, index


def _objects(index, ids: torch.Tensor, height: int, width: int) -> list:
    """The object boxes of images ``ids`` of ``index``, scaled from original pixels to the ``height x width``
    input the eval loader resized them to; ``ValueError`` when the dataset has no boxes."""
    if index.boxes is None or index.image_sizes is None:
        raise ValueError(f"--crop-mode boxes needs a dataset with object boxes; {index.summary()} has none")
    out = []
    for i in ids.tolist():
        w0, h0 = (float(v) for v in index.image_sizes[i])
        scale = torch.tensor([width / w0, height / h0, width / w0, height / h0])
        out.append(torch.as_tensor(index.boxes[i], dtype=torch.float32).reshape(-1, 4) * scale)
    return out


def _map(scores: torch.Tensor, targets: torch.Tensor) -> float:
    m = MultiLabelMetrics(targets.shape[1])
    m.update(scores.float(), targets, torch.arange(len(targets)))
    return float(m.compute()["mAP"])


@torch.no_grad()
def probe(path: str, opts) -> dict:
    model, loader, classes, run_args, index = _load(path, opts.split, opts.batch)
    gen = torch.Generator().manual_seed(opts.seed)
    rows = {k: [] for k in ("q", "mean", "max", "z", "zm", "y")}
    for images, targets, ids in loader:
        keep = ids >= 0
        images, targets = images[keep], targets[keep].float()
        b, _, h, w = images.shape
        if opts.crop_mode == "boxes":
            boxes = object_boxes(_objects(index, ids[keep], h, w), opts.crops, h, w, generator=gen,
                                 area=tuple(opts.crop_area))
        else:
            boxes = sample_boxes(b, opts.crops, h, w, mode=opts.crop_mode, generator=gen,
                                 area=tuple(opts.crop_area))
        q = model(images)
        o = model(ops.crop_resize(images, boxes, (h, w))).view(b, opts.crops, classes)
        z = ops.reconstruct_logits(o, q, targets, layers=opts.layers, crop_temperature=opts.crop_temperature)
        for key, value in (("q", q), ("mean", o.mean(1)), ("max", o.amax(1)), ("z", z),
                           ("zm", ops.match_logit_scale(z, q)), ("y", targets)):
            rows[key].append(value)
    t = {k: torch.cat(v) for k, v in rows.items()}
    y = t["y"]
    out = {name: _map(t[name], y) for name in ("q", "mean", "max", "z", "zm")}
    teacher = t["zm"] if opts.scale == "match" else t["z"]
    pq, pt = torch.sigmoid(t["q"]), torch.sigmoid(teacher)
    out["pos_lowered"] = float((pt < pq)[y > 0].float().mean())
    out["neg_raised"] = float((pt > pq)[y == 0].float().mean())
    q = t["q"].clone().requires_grad_(True)
    with torch.enable_grad():
        g_rsd, = torch.autograd.grad(ops.mbd_loss(q, teacher, y, form=opts.mbd_form, backend="reference"), q)
        g_bce, = torch.autograd.grad(F.binary_cross_entropy_with_logits(q, y), q)
    out["cos"] = float(F.cosine_similarity(g_rsd.flatten(), g_bce.flatten(), dim=0))
    out["row_std_q"] = float(t["q"].std(1, unbiased=False).mean())
    out["method"] = run_args.get("method", "?") + (f"/{run_args.get('recipe')}" if run_args.get("method") == "mskd"
                                                   else "")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--batch", type=int, default=32, help="images per batch (the pseudo-label k is per batch)")
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--crop-mode", default="random", choices=("random", "corners", "boxes"),
                   help="boxes: crops on the annotated objects (the oracle; needs a dataset with boxes)")
    p.add_argument("--crop-area", type=float, nargs=2, default=(0.2, 0.3), metavar=("LO", "HI"),
                   help="random crops: area fraction range (SPEC: 0.2 0.3)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--crop-temperature", type=float, default=1.0)
    p.add_argument("--scale", default="match", choices=("match", "none"), help="teacher for the last columns")
    p.add_argument("--mbd-form", default="divergence", choices=("divergence", "paper"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    print(f"split {opts.split}; S={opts.crops} {opts.crop_mode} crops (area {tuple(opts.crop_area)}), "
          f"{opts.layers} layers, crop-T "
          f"{opts.crop_temperature}; last columns: teacher scale {opts.scale}, MBD {opts.mbd_form}")
    print("| checkpoint | trained with | mAP q | mAP crop mean | mAP crop max | mAP z | mAP z matched | "
          "pos lowered | neg raised | cos(R-SD, BCE) | q row std |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in opts.checkpoint:
        try:
            r = probe(path, opts)
        except ValueError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        print(f"| {path} | {r['method']} | {r['q']:.2f} | {r['mean']:.2f} | {r['max']:.2f} | {r['z']:.2f} | "
              f"{r['zm']:.2f} | {100 * r['pos_lowered']:.1f} % | {100 * r['neg_raised']:.1f} % | {r['cos']:+.2f} | "
              f"{r['row_std_q']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
