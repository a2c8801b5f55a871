"""Run reports: per-epoch summary CSV, per-class AP CSV, per-scale recall table/plot, training curves.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a reader
never sees a half-written report. Plots use matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from mskd_fast._atomic import atomic_path

__all__ = [
    "METRIC_KEYS",
    "format_metrics",
    "format_table",
    "plot_training_curves",
    "write_per_class_ap",
    "write_scale_recall",
    "write_summary_csv",
    "write_text",
]

METRIC_KEYS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1", "P@1", "R@1")


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return path


def _csv_text(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt_cell(row.get(k, "")) for k in columns})
    return buf.getvalue()


def _fmt_cell(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def write_summary_csv(path: str, history: Sequence[Mapping]) -> str:
    """One row per epoch (the trainer's history dicts: epoch, loss terms, lr, img/s, metrics, ...)."""
    return write_text(path, _csv_text(history))


def write_per_class_ap(path: str, class_names: Sequence[str], ap: np.ndarray, positives: np.ndarray) -> str:
    """CSV ``class_index, class_name, positives, AP`` (AP in percent; empty for excluded classes)."""
    rows = []
    for index, name in enumerate(class_names):
        value = float(ap[index])
        rows.append({
            "class_index": index,
            "class_name": name,
            "positives": int(positives[index]),
            "AP": "" if math.isnan(value) else f"{value:.4f}",
        })
    return write_text(path, _csv_text(rows, ["class_index", "class_name", "positives", "AP"]))


def write_scale_recall(prefix: str, table: Sequence[Mapping], label: str) -> list[str]:
    """``prefix.csv``, ``prefix.md`` (table) and ``prefix.png`` (plot) of a per-scale recall table."""
    from mskd_fast.metrics import format_scale_recall, plot_scale_recall

    rows = [dict(row) for row in table]
    paths = [
        write_text(prefix + ".csv", _csv_text(rows, ["bin_lo", "bin_hi", "objects", "found", "recall"])),
        write_text(prefix + ".md", format_scale_recall(table)),
    ]
    plot_scale_recall({label: table}, prefix + ".png")
    paths.append(prefix + ".png")
    return paths


def plot_training_curves(history: Sequence[Mapping], path: str, title: str = "",
                         terms: Sequence[str] = ("loss", "bce", "lsd", "rsd", "ssd")) -> str:
    """Loss terms (the columns ``terms``), mAP and learning rate per epoch, three panels, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax_loss, ax_map, ax_lr = fig.subplots(1, 3)
    epochs = [row["epoch"] for row in history]
    for key in terms:
        values = [row.get(key) for row in history]
        if any(isinstance(v, float) and v != 0.0 for v in values):
            ax_loss.plot(epochs, values, marker="o", markersize=3, label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss terms (epoch mean)")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend()
    evaluated = [(row["epoch"], row["mAP"]) for row in history if isinstance(row.get("mAP"), float)]
    if evaluated:
        ax_map.plot([e for e, _ in evaluated], [m for _, m in evaluated], marker="o", markersize=3)
    ax_map.set_xlabel("epoch")
    ax_map.set_title("eval mAP (%)")
    ax_map.grid(True, alpha=0.3)
    ax_lr.plot(epochs, [row.get("lr") for row in history], marker="o", markersize=3)
    ax_lr.set_xlabel("epoch")
    ax_lr.set_title("learning rate (head, end of epoch)")
    ax_lr.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def format_table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """Plain-text table with right-aligned columns (for the terminal).

    Floats of one column share one number of decimals: 4 when every finite value is below 10 in magnitude,
    else 2 (below 10000), else 0; NaN shows as ``-``.
    """
    decimals = [_column_decimals([row[i] for row in rows]) for i in range(len(headers))]
    cells = [[str(h) for h in headers]] + [[_fmt_display(v, d) for v, d in zip(row, decimals)] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _column_decimals(values) -> int:
    finite = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    largest = max(finite, default=0.0)
    return 4 if largest < 10 else 2 if largest < 10000 else 0


def _fmt_display(value, decimals: int = 4) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{decimals}f}"
    return str(value)


def format_metrics(metrics: Mapping) -> str:
    """``mAP 71.23  OP 80.10 ...`` one line of the scalar SPEC metrics."""
    return "  ".join(f"{k} {metrics[k]:.2f}" for k in METRIC_KEYS if k in metrics)
