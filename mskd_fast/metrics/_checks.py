"""Small argument checks shared by the metrics modules (errors name the offending argument)."""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(value, name: str) -> torch.Tensor:
    """Return ``value`` as a torch tensor (numpy arrays are wrapped without copying)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def as_array(value, name: str) -> np.ndarray:
    """Return ``value`` as a numpy array (CPU torch tensors are converted; lists are accepted)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged or otherwise non-array input
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from exc


def check_binary(values: np.ndarray, name: str) -> None:
    """Raise ValueError unless every element of ``values`` is 0 or 1."""
    if values.dtype == np.bool_:
        return
    bad = (values != 0) & (values != 1)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must contain only 0 and 1; found {values[idx]!r} at index {idx}")


def check_finite(values: np.ndarray, name: str) -> None:
    """Raise ValueError if ``values`` holds NaN or +-inf."""
    bad = ~np.isfinite(values)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite; found {values[idx]!r} at index {idx}")


def check_threshold(threshold, name: str = "threshold") -> float:
    """Validate a probability threshold in [0, 1] and return it as a float."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(threshold).__name__}")
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {threshold}")
    return threshold
