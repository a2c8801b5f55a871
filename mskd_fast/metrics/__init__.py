"""Multi-label evaluation metrics (SPEC section 7).

* :class:`MultiLabelMetrics` -- streaming, DDP-aware mAP, OP/OR/OF1, CP/CR/CF1, P@1, R@1.
* :func:`average_precision` / :func:`average_precision_per_class` -- scikit-learn AP semantics.
* :func:`per_scale_recall`, :func:`format_scale_recall`, :func:`plot_scale_recall` -- paper Figure 5.
"""

from .accumulator import MultiLabelMetrics
from .classification import threshold_metrics, top1_metrics
from .ranking import average_precision, average_precision_per_class
from .scale_recall import format_scale_recall, per_scale_recall, plot_scale_recall

__all__ = [
    "MultiLabelMetrics",
    "average_precision",
    "average_precision_per_class",
    "format_scale_recall",
    "per_scale_recall",
    "plot_scale_recall",
    "threshold_metrics",
    "top1_metrics",
]
