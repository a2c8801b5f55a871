"""Non-interpolated average precision with scikit-learn's ``average_precision_score`` semantics.

For one class, sort samples by decreasing score. Every *distinct* score value is a threshold
(tied samples enter together), and

    AP = sum_k (R_k - R_{k-1}) * P_k,   R_0 = 0,

over those thresholds, where ``P_k``/``R_k`` are precision/recall of "score >= k-th value".
Since ``R_k - R_{k-1}`` is the number of positives in the k-th tie group over the number of
positives, this equals the mean, over positive samples, of the precision at the end of the tie
group the sample belongs to -- the form computed here, vectorised over classes.
"""

from __future__ import annotations

import numpy as np

from ._checks import as_array, check_binary, check_finite

_CLASS_CHUNK = 64  # classes sorted at once; bounds the temporary (N, chunk) float64 arrays


def _ap_columns(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AP of every column of ``scores`` (N, c) given boolean ``positives`` (N, c); NaN without positives."""
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    sorted_pos = np.take_along_axis(positives, order, axis=0)
    true_pos = np.cumsum(sorted_pos, axis=0, dtype=np.float64)
    precision = true_pos / np.arange(1, n + 1, dtype=np.float64)[:, None]
    # Index of the last member of each sample's tie group (a threshold of sklearn's curve).
    is_end = np.ones(sorted_scores.shape, dtype=bool)
    is_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    group_end = np.where(is_end, np.arange(n, dtype=np.int64)[:, None], n)
    group_end = np.minimum.accumulate(group_end[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(precision, group_end, axis=0)
    num_pos = sorted_pos.sum(axis=0)
    total = np.where(sorted_pos, precision_at_end, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_pos > 0, total / np.maximum(num_pos, 1), np.nan)


def average_precision_per_class(scores, targets) -> np.ndarray:
    """Per-class average precision.

    Args:
        scores: (N, C) real scores (logits or probabilities; only their order and ties matter).
        targets: (N, C) multi-hot labels with values in {0, 1}.

    Returns:
        (C,) float64 array of AP in [0, 1]; NaN for a class with no positive sample
        (scikit-learn would warn and return 0 there; we mark it so callers can exclude it).
    """
    scores = as_array(scores, "scores")
    targets = as_array(targets, "targets")
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, C), got shape {tuple(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets must have the same shape as scores {tuple(scores.shape)}, got {tuple(targets.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("scores must hold at least one sample (N >= 1), got N = 0")
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise TypeError(f"scores must be a real-valued array, got dtype {scores.dtype}")
    check_finite(scores, "scores")
    check_binary(targets, "targets")
    positives = targets.astype(bool)
    out = np.empty(scores.shape[1], dtype=np.float64)
    for start in range(0, scores.shape[1], _CLASS_CHUNK):
        stop = start + _CLASS_CHUNK
        out[start:stop] = _ap_columns(scores[:, start:stop], positives[:, start:stop])
    return out


def average_precision(scores, targets) -> float:
    """Average precision of one class (scikit-learn ``average_precision_score`` semantics).

    Args:
        scores: (N,) real scores; ties form one threshold, as in scikit-learn.
        targets: (N,) labels in {0, 1}.

    Returns:
        AP in [0, 1] as a float; NaN when ``targets`` has no positive (scikit-learn warns and
        returns 0.0 in that case).
    """
    scores = as_array(scores, "scores")
    targets = as_array(targets, "targets")
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (N,), got shape {tuple(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets must have the same shape as scores {tuple(scores.shape)}, got {tuple(targets.shape)}"
        )
    return float(average_precision_per_class(scores[:, None], targets[:, None])[0])
