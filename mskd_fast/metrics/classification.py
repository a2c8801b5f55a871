"""Thresholded (OP/OR/OF1, CP/CR/CF1) and top-1 (P@1, R@1) multi-label metrics on whole arrays.

Conventions (all values are fractions in [0, 1] here; the accumulator reports percent):

* A class is predicted for an image when ``predicted[i, c]`` is True (the accumulator uses
  ``sigmoid(logit) >= threshold``).
* Zero divisions follow scikit-learn's ``zero_division=0``: a class with no predicted positive has
  precision 0, a class with no positive has recall 0, and an F1 whose precision and recall are both
  0 is 0. CP/CR average over *all* C classes (``average="macro"``); OP/OR pool the counts of all
  classes (``average="micro"``). CF1 = 2*CP*CR/(CP+CR) and OF1 = 2*OP*OR/(OP+OR) (the ML-GCN/ASL
  definition; note CF1 is *not* scikit-learn's macro F1, which averages per-class F1).
* Top-1 class = argmax of the scores, ties broken towards the lowest class index. P@1 is the
  fraction of all images whose top-1 class is positive; R@1 averages hits/|Y_i| (hits = 1 when the
  top-1 class is positive, else 0) over the images with at least one positive.
"""

from __future__ import annotations

import numpy as np


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _f1(precision: float, recall: float) -> float:
    return float(_ratio(2.0 * precision * recall, precision + recall))


def threshold_metrics(predicted: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """OP, OR, OF1, CP, CR, CF1 of boolean predictions.

    Args:
        predicted: (N, C) bool, True where the class is predicted for the image.
        positives: (N, C) bool ground truth.

    Returns:
        dict with keys "OP", "OR", "OF1", "CP", "CR", "CF1" as fractions in [0, 1].
    """
    true_pos = np.logical_and(predicted, positives).sum(axis=0, dtype=np.int64)
    num_pred = predicted.sum(axis=0, dtype=np.int64)
    num_pos = positives.sum(axis=0, dtype=np.int64)
    op = float(_ratio(true_pos.sum(), num_pred.sum()))
    orec = float(_ratio(true_pos.sum(), num_pos.sum()))
    cp = float(_ratio(true_pos, num_pred).mean())
    cr = float(_ratio(true_pos, num_pos).mean())
    return {"OP": op, "OR": orec, "OF1": _f1(op, orec), "CP": cp, "CR": cr, "CF1": _f1(cp, cr)}


def top1_metrics(scores: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """P@1 and R@1.

    Args:
        scores: (N, C) real scores (N >= 1).
        positives: (N, C) bool ground truth.

    Returns:
        dict with "P@1" (over all N images) and "R@1" (over images with >= 1 positive; NaN if none),
        as fractions in [0, 1].
    """
    top = np.argmax(scores, axis=1)
    hit = positives[np.arange(scores.shape[0]), top].astype(np.float64)
    num_pos = positives.sum(axis=1)
    has_pos = num_pos > 0
    r_at_1 = float((hit[has_pos] / num_pos[has_pos]).mean()) if has_pos.any() else float("nan")
    return {"P@1": float(hit.mean()), "R@1": r_at_1}
