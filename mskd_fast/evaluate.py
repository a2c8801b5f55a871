"""Evaluation: the loop the trainer runs each epoch, and ``python -m mskd_fast.evaluate --checkpoint PATH``.

The model runs in eval behaviour (the trainer passes its eval twin). Under DDP every rank evaluates its
shard; ``MultiLabelMetrics.sync`` then gathers the rows so the metrics cover the exact evaluation set
(padding rows dropped, nothing counted twice). Rank 0 writes the reports:

* ``metrics.json`` (evaluate CLI) - the scalar SPEC 7 metrics, excluded classes, sample count;
* ``per_class_ap.csv`` - AP per class (empty for classes without a positive, which mAP excludes);
* ``scale_recall.{csv,md,png}`` - recall per object scale (datasets with boxes only; paper Figure 5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

from mskd_fast.metrics import MultiLabelMetrics, per_scale_recall
from mskd_fast.reports import METRIC_KEYS, format_metrics, format_table, write_per_class_ap, write_scale_recall

__all__ = ["evaluate", "main", "model_from_checkpoint", "run_loader", "write_eval_reports"]


@torch.no_grad()
def evaluate(model, loader, num_classes: int, *, class_names=None, amp_dtype: torch.dtype | None = None,
             threshold: float = 0.5, distributed: bool = False) -> MultiLabelMetrics:
    """Run ``model`` (eval behaviour, returns ``(B,C)`` logits) over ``loader``; returns the (synced) metrics.

    ``loader`` yields ``(images, targets, sample_ids)`` with ``-1`` ids for padding rows. With
    ``distributed=True`` the rows of all ranks are gathered (a collective: every rank must call this).
    The returned metrics carry ``skipped_ids``: the samples the loader left out because their image could
    not be decoded (``on_bad_image="skip"``; of every rank), which :func:`write_eval_reports` expects missing.
    """
    metrics = MultiLabelMetrics(num_classes, threshold=threshold, class_names=class_names)
    for images, targets, ids in loader:
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images)
        metrics.update(logits.float(), targets, ids)
    skipped = set(getattr(loader, "skipped_ids", ()))
    if distributed:
        metrics.sync()
        import torch.distributed as dist

        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, skipped)
        skipped = set().union(*every)
    metrics.skipped_ids = skipped
    return metrics


def model_from_checkpoint(ckpt: dict):
    """The trained model of a trainer checkpoint (``load_checkpoint(..., require=("model", "meta"))``): built from
    its ``meta`` (timm name, classes, image size, ROI mode, model kwargs) with its weights loaded, on the CPU, in
    train mode (call ``.eval()`` to evaluate)."""
    from mskd_fast.models import create_model

    meta = ckpt["meta"]
    model, _ = create_model(meta["model_name"], meta["num_classes"], img_size=meta["img_size"],
                            roi_mode=meta.get("roi_mode", "max"), **meta.get("model_kwargs", {}))
    model.load_state_dict(ckpt["model"])
    return model


def write_eval_reports(metrics: MultiLabelMetrics, index, img_size: int, out_dir: str, *, label: str,
                       threshold: float = 0.5, collapse_signals: bool = False) -> tuple[dict, list | None]:
    """Compute the metrics and write ``per_class_ap.csv`` and (with boxes) ``scale_recall.*`` into ``out_dir``.

    Returns ``(result, scale_table)``: ``result`` is ``MultiLabelMetrics.compute()`` (plus, with
    ``collapse_signals``, the :func:`mskd_fast.collapse.eval_signals` of the evaluated ``(N, C)`` logits,
    taken from the same rows); ``scale_table`` the per-scale recall rows or ``None`` for datasets without
    boxes. Raises ``RuntimeError`` if the evaluated sample ids are not exactly ``0..N-1`` of ``index`` (a
    sample missing or extra), less the ``metrics.skipped_ids`` (images that could not be decoded, left out
    with ``on_bad_image="skip"``; ``result["skipped_samples"]`` counts them).
    """
    result = metrics.compute()
    rows = metrics.rows()
    if collapse_signals:
        from mskd_fast.collapse import eval_signals

        result.update(eval_signals(torch.from_numpy(rows["logits"])))
    ids = rows["sample_ids"]
    n = len(index)
    skipped = sorted(getattr(metrics, "skipped_ids", ()))
    expected = np.setdiff1d(np.arange(n), np.asarray(skipped, dtype=np.int64))
    if ids.shape[0] != expected.shape[0] or not np.array_equal(ids, expected):
        raise RuntimeError(
            f"evaluation covered {ids.shape[0]} distinct samples of {n} ({len(skipped)} skipped as undecodable; "
            f"ids {ids[:5].tolist()}...): every other sample must be evaluated exactly once"
        )
    result["skipped_samples"] = len(skipped)
    os.makedirs(out_dir, exist_ok=True)
    positives = index.labels[ids].sum(axis=0)
    write_per_class_ap(os.path.join(out_dir, "per_class_ap.csv"), index.class_names, result["AP"], positives)
    table = None
    if index.boxes is not None and index.image_sizes is not None:
        table = per_scale_recall(rows["probs"], [index.boxes[i] for i in ids], [index.box_classes[i] for i in ids],
                                 index.image_sizes[ids], img_size, bin_px=10, threshold=threshold)
        write_scale_recall(os.path.join(out_dir, "scale_recall"), table, label)
    return result, table


def scalar_metrics(result: dict) -> dict:
    """The scalar SPEC metrics of a ``compute()`` result (floats; NaN stays NaN)."""
    return {k: float(result[k]) for k in METRIC_KEYS}


def run_loader(checkpoint_path: str, run_args: dict) -> str:
    """The loader (``"dali"``, ``"torch"`` or ``"auto"``) the run of ``checkpoint_path`` trained with.

    The checkpoint's ``args["loader"]`` when it is ``"dali"`` or ``"torch"``; for ``"auto"`` the backend
    the trainer resolved, from ``args.yaml`` next to the checkpoint (``resolved: loader:``) when present.
    """
    loader = run_args.get("loader", "auto")
    if loader != "auto":
        return loader
    try:
        import yaml

        with open(os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "args.yaml")) as fh:
            resolved = (yaml.safe_load(fh) or {}).get("resolved", {}).get("loader", "")
    except (OSError, ValueError, AttributeError, ImportError):
        return "auto"
    resolved = str(resolved)
    return "torch" if resolved == "torch" else "dali" if resolved.startswith("dali") else "auto"


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from mskd_fast._cli import ArgumentParser, HelpFormatter
    from mskd_fast.data import add_data_args

    p = ArgumentParser(
        prog="python -m mskd_fast.evaluate",
        description="Evaluate a trainer checkpoint: print mAP, OP/OR/OF1, CP/CR/CF1, P@1, R@1 and write "
                    "metrics.json, per_class_ap.csv and (datasets with boxes) scale_recall.{csv,md,png}. "
                    "Data flags default to the checkpoint's training run.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="last.pt / best.pt of a training run")
    data = add_data_args(p)
    for action in data._group_actions:  # without --dataset every data flag is taken from the training run
        if action.dest in _DATA_KEYS:
            given = action.default is not None and action.dest != "dataset"
            other = f"; when --dataset is given: {action.default}" if given else ""
            action.help = f"{action.help} (default: the training run's{other})"
    data.add_argument("--loader", choices=("auto", "dali", "torch"), default=None,
                      help="data loader backend (default: the one the training run used; both give the same "
                           "evaluation pixels up to float rounding)")
    data.add_argument("-j", "--workers", type=int, default=None,
                      help="loader workers / DALI threads (default: the run's)")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="eval batch size (default: the run's)")
    p.add_argument("--img-size", type=int, default=None, help="eval resolution (default: the run's)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast (default: as in the training run)")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default=None,
                   help="autocast dtype (default: the run's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the run's)")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output", default=None,
                   help="report folder (default: <checkpoint folder>/eval-<dataset>-<split>)")
    return p


_DATA_KEYS = ("dataset", "data_dir", "train_split", "eval_split", "voc_difficult", "on_bad_image",
              "manifest_classes", "synthetic_size", "synthetic_test_size", "synthetic_img_size", "synthetic_seed",
              "synthetic_cache")


def main(argv=None) -> int:
    """CLI entry point; returns the exit code."""
    from mskd_fast._fs import WriteError, check_writable_dir
    from mskd_fast.checkpoint import load_checkpoint
    from mskd_fast.data import build_loader, index_from_args, split_from_args
    from mskd_fast.distributed import init_distributed, shutdown
    from mskd_fast.train_args import explicit_flags

    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, sys.argv[1:] if argv is None else argv)
    try:
        ckpt = load_checkpoint(args.checkpoint, require=("model", "args", "meta"))
        run_args = ckpt["args"]
        if "dataset" not in explicit:  # evaluate on the training run's data unless told otherwise
            for key in _DATA_KEYS:
                if key in run_args and key not in explicit:
                    setattr(args, key, run_args[key])
        for key in ("batch_size", "img_size", "amp", "amp_dtype", "channels_last", "threshold"):
            if getattr(args, key) is None:
                setattr(args, key, run_args[key])
        if args.workers is None:
            args.workers = run_args.get("workers", 2)
        if args.loader is None:
            args.loader = run_loader(args.checkpoint, run_args)
        if args.batch_size < 1 or args.img_size < 16 or not 0 < args.threshold < 1:
            raise ValueError("--batch-size must be >= 1, --img-size >= 16 and --threshold in (0, 1)")
        split = split_from_args(args, "eval")
        out_dir = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                              f"eval-{args.dataset}-{split}")
        check_writable_dir(out_dir, "--output" if args.output else "report folder (set another with --output)")
        ctx = init_distributed(args.device)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    try:
        try:
            meta = ckpt["meta"]
            index = index_from_args(args, "eval")
            if index.num_classes != meta["num_classes"] or list(index.class_names) != list(meta["class_names"]):
                raise ValueError(
                    f"dataset {args.dataset} has {index.num_classes} classes {index.class_names[:5]}..., the "
                    f"checkpoint was trained on {meta['num_classes']} classes {meta['class_names'][:5]}...: "
                    "class lists differ"
                )
            model = model_from_checkpoint(ckpt)
            model.to(ctx.device)
            if args.channels_last:
                model.to(memory_format=torch.channels_last)
            model.eval()
            amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
            loader = build_loader(index, train=False, batch_size=args.batch_size, img_size=args.img_size,
                                  loader=args.loader, num_workers=args.workers, shard_id=ctx.rank,
                                  num_shards=ctx.world_size, channels_last=args.channels_last, device=ctx.device,
                                  on_bad_image=args.on_bad_image)
            backend = loader.backend
            metrics = evaluate(model, loader, meta["num_classes"], class_names=index.class_names,
                               amp_dtype=amp_dtype, threshold=args.threshold, distributed=ctx.distributed)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if ctx.is_main:
            from mskd_fast._provenance import code_provenance
            from mskd_fast.reports import write_text

            try:
                result, table = write_eval_reports(metrics, index, args.img_size, out_dir,
                                                   label=meta["model_name"], threshold=args.threshold)
                summary = {k: _json_safe(float(result[k])) for k in METRIC_KEYS}
                summary.update(num_samples=result["num_samples"], skipped_samples=result["skipped_samples"],
                               excluded_classes=list(result["excluded_classes"]),
                               checkpoint=os.path.abspath(args.checkpoint), dataset=args.dataset, split=split,
                               epoch=ckpt.get("epoch"), loader=backend, img_size=args.img_size,
                               code=code_provenance())
                write_text(os.path.join(out_dir, "metrics.json"), json.dumps(summary, indent=2) + "\n")
            except WriteError as exc:  # e.g. the disk filled up during the evaluation
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"{index.summary()}\ncheckpoint {args.checkpoint} (epoch {ckpt.get('epoch')}) | loader {backend} "
                  f"| img {args.img_size}px")
            print(format_table([[k, float(result[k])] for k in METRIC_KEYS], ["metric", "%"]))
            if result["excluded_classes"]:
                print(f"excluded from mAP (no positive): {result['excluded_classes']}")
            if result["skipped_samples"]:
                print(f"warning: {result['skipped_samples']} of {len(index)} images could not be decoded and were "
                      "left out (--on-bad-image skip); the metrics cover the others")
            if table is not None:
                from mskd_fast.metrics import format_scale_recall

                print("recall by object scale (sqrt(area) at the eval resolution):")
                print(format_scale_recall(table), end="")
            print(f"reports: {out_dir}")
            print(format_metrics(result))
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
