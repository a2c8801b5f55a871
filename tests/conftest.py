"""Test-wide settings.

Without a CUDA device the Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be
set before any ``@triton.jit`` function is defined, so it is set here, before test modules import
``mskd_fast.kernels``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Fresh but reproducible random inputs per test (the seed is printed on failure by pytest -ra)."""
    torch.manual_seed(0x5EED)
    yield
