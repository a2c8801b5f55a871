"""Per-object-scale recall (paper Figure 5): table, markdown rendering and plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from mskd_fast._atomic import atomic_path

from ._checks import as_array, check_finite, check_threshold


def _resolution(img_size) -> tuple[float, float]:
    """(out_h, out_w) from an int or an (h, w) pair."""
    if isinstance(img_size, (int, np.integer)) and not isinstance(img_size, bool):
        size = (int(img_size), int(img_size))
    elif isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        size = (img_size[0], img_size[1])
    else:
        raise ValueError(f"img_size must be an int or an (h, w) pair, got {img_size!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"img_size must be positive ints, got {img_size!r}")
    return float(size[0]), float(size[1])


def per_scale_recall(
    probs,
    boxes: Sequence,
    box_classes: Sequence,
    image_sizes,
    img_size,
    bin_px: float = 10,
    threshold: float = 0.5,
) -> list[dict]:
    """Recall of annotated objects binned by their size at the training resolution.

    Every object (box) of image i is rescaled the way the eval loader resizes the image, from its
    original (width_i, height_i) to ``img_size`` x ``img_size`` (or (h, w)), and binned by
    ``s = sqrt(w' * h')`` into bins ``[k*bin_px, (k+1)*bin_px)``. An object is *found* when the
    probability of its class in its image is >= ``threshold`` (an image with two objects of one
    class finds both or neither).

    Args:
        probs: (N, C) probabilities in [0, 1] (e.g. ``MultiLabelMetrics.rows()["probs"]``), row i
            belonging to image i of ``boxes``.
        boxes: N arrays of shape (n_i, 4), (x1, y1, x2, y2) in original pixels, x2 >= x1, y2 >= y1.
        box_classes: N integer arrays of shape (n_i,), values in [0, C).
        image_sizes: (N, 2) original (width, height), positive.
        img_size: training/eval resolution: int (square) or (h, w).
        bin_px: bin width in pixels (> 0).
        threshold: probability threshold for "found".

    Returns:
        One dict per bin, from bin 0 to the largest non-empty bin (empty bins included, recall NaN):
        ``bin_lo``, ``bin_hi`` (pixels), ``objects`` and ``found`` (ints), ``recall`` (percent).
    """
    probs = as_array(probs, "probs")
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got shape {tuple(probs.shape)}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating point, got dtype {probs.dtype}")
    check_finite(probs, "probs")
    if probs.size and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(f"probs must lie in [0, 1] (probabilities, not logits); range is "
                         f"[{probs.min()}, {probs.max()}]")
    num_images, num_classes = probs.shape
    if len(boxes) != num_images:
        raise ValueError(f"boxes must hold one array per image ({num_images}), got {len(boxes)}")
    if len(box_classes) != num_images:
        raise ValueError(f"box_classes must hold one array per image ({num_images}), got {len(box_classes)}")
    sizes = as_array(image_sizes, "image_sizes")
    if sizes.shape != (num_images, 2):
        raise ValueError(f"image_sizes must have shape ({num_images}, 2) (width, height), got {sizes.shape}")
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        raise ValueError("image_sizes must be finite and positive (width, height)")
    out_h, out_w = _resolution(img_size)
    is_number = isinstance(bin_px, (int, float, np.integer, np.floating)) and not isinstance(bin_px, bool)
    if not (is_number and math.isfinite(bin_px) and bin_px > 0):
        raise ValueError(f"bin_px must be a positive number, got {bin_px!r}")
    threshold = check_threshold(threshold)

    scales, found = [], []
    for i in range(num_images):
        b = as_array(boxes[i], f"boxes[{i}]").astype(np.float64, copy=False)
        c = as_array(box_classes[i], f"box_classes[{i}]")
        if b.size == 0 and c.size == 0:
            continue
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape (n, 4), got {b.shape}")
        if c.shape != (b.shape[0],):
            raise ValueError(f"box_classes[{i}] must have shape ({b.shape[0]},), got {c.shape}")
        if not np.issubdtype(c.dtype, np.integer):
            raise TypeError(f"box_classes[{i}] must be integers, got dtype {c.dtype}")
        if (c < 0).any() or (c >= num_classes).any():
            raise ValueError(f"box_classes[{i}] must lie in [0, {num_classes}), got {c.tolist()}")
        check_finite(b, f"boxes[{i}]")
        widths, heights = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        if (widths < 0).any() or (heights < 0).any():
            raise ValueError(f"boxes[{i}] must be (x1, y1, x2, y2) with x2 >= x1, y2 >= y1; got {b.tolist()}")
        width, height = float(sizes[i, 0]), float(sizes[i, 1])
        scales.append(np.sqrt(widths * (out_w / width) * heights * (out_h / height)))
        found.append(probs[i, c] >= threshold)
    if not scales:
        return []
    scales = np.concatenate(scales)
    found = np.concatenate(found)
    bins = np.floor(scales / bin_px).astype(np.int64)
    objects = np.bincount(bins)
    hits = np.bincount(bins, weights=found.astype(np.float64), minlength=objects.shape[0]).astype(np.int64)
    table = []
    for k, (n, f) in enumerate(zip(objects.tolist(), hits.tolist())):
        table.append({
            "bin_lo": k * bin_px,
            "bin_hi": (k + 1) * bin_px,
            "objects": int(n),
            "found": int(f),
            "recall": 100.0 * f / n if n else float("nan"),
        })
    return table


def format_scale_recall(table: Sequence[Mapping]) -> str:
    """Markdown table of a :func:`per_scale_recall` result (empty bins shown with recall "-")."""
    lines = ["| sqrt(area) px | objects | found | recall % |", "|---|---:|---:|---:|"]
    for row in table:
        recall = "-" if row["objects"] == 0 else f"{row['recall']:.2f}"
        bounds = f"[{row['bin_lo']:g}, {row['bin_hi']:g})"
        lines.append(f"| {bounds} | {row['objects']} | {row['found']} | {recall} |")
    total = sum(row["objects"] for row in table)
    hit = sum(row["found"] for row in table)
    overall = f"{100.0 * hit / total:.2f}" if total else "-"
    lines.append(f"| all | {total} | {hit} | {overall} |")
    return "\n".join(lines) + "\n"


def plot_scale_recall(tables: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> None:
    """Plot recall-vs-scale curves of several models (e.g. {"vanilla": t1, "MSKD": t2}) into ``path``.

    Top panel: recall (%) per bin, one curve per label (empty bins skipped). Bottom panel: objects per
    bin of each table. The image format follows the file extension; the file is written atomically.
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not tables:
        raise ValueError("tables must hold at least one {label: table} entry")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory of plot path {path!r} does not exist")
    fig = Figure(figsize=(7, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax_recall, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = None
    for i, (label, table) in enumerate(tables.items()):
        if not table:
            continue
        centers = np.array([(r["bin_lo"] + r["bin_hi"]) / 2 for r in table], dtype=np.float64)
        recall = np.array([r["recall"] for r in table], dtype=np.float64)
        counts = np.array([r["objects"] for r in table], dtype=np.float64)
        ok = counts > 0
        ax_recall.plot(centers[ok], recall[ok], marker="o", markersize=3, label=str(label))
        width = (table[0]["bin_hi"] - table[0]["bin_lo"]) / (len(tables) + 1)
        offset = (i - (len(tables) - 1) / 2) * width
        ax_count.bar(centers + offset, counts, width=width, label=str(label))
    ax_recall.set_ylabel("recall (%)")
    ax_recall.set_ylim(0, 100)
    ax_recall.grid(True, alpha=0.3)
    ax_recall.legend()
    ax_recall.set_title("Recall by object scale")
    ax_count.set_xlabel("sqrt(object area) at training resolution (px)")
    ax_count.set_ylabel("objects")
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
