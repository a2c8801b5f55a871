"""Integrations of :class:`mskd_fast.MSKD` with other training frameworks (each imported on its own, e.g.
``from mskd_fast.integrations.timm import MSKDTask``)."""
