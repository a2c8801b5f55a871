"""mskd-fast: fast, exact Multi-label Self Knowledge Distillation (MSKD, AAAI 2025) for PyTorch.

Public entry points: :class:`MSKD` (MSKD for any training loop, :mod:`mskd_fast.mskd`), :mod:`mskd_fast.ops`
(functional ops and losses), :mod:`mskd_fast.losses`
(``MBDLoss``, ``RelationLoss``, ``MSKDLoss``), :mod:`mskd_fast.reference` (the pure-PyTorch
oracle), :mod:`mskd_fast.metrics`, :mod:`mskd_fast.data`, ``python -m mskd_fast.train``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import losses, ops, reference  # noqa: E402
from ._info import info  # noqa: E402
from .mskd import MSKD  # noqa: E402

__all__ = ["MSKD", "ops", "losses", "reference", "info", "__version__"]
