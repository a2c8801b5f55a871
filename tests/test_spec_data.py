"""The repository's copy of SPEC's float64 vectors (tests/data/spec_vectors.json).

The tests read the copy so that a clone without ``../shared`` runs every spec-vector test; this file checks
that the copy equals the shared original whenever the original is there, and that a missing copy fails the
spec-vector tests instead of skipping them.
"""

import json
from pathlib import Path

import _kernel_utils
import pytest
import test_reference

COPY = Path(__file__).resolve().parent / "data" / "spec_vectors.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "spec_vectors.json"


def test_copy_is_well_formed():
    cases = json.loads(COPY.read_text())["cases"]
    assert len(cases) >= 2
    for case in cases:
        for key in ("targets", "student", "teacher"):
            assert key in case, f"spec vector case lacks {key!r}"


@pytest.mark.skipif(not SHARED.exists(), reason=f"no shared original at {SHARED} (only the copy is in a clone)")
def test_copy_equals_shared_original():
    assert json.loads(COPY.read_text()) == json.loads(SHARED.read_text()), (
        f"{COPY} differs from {SHARED}: copy the shared file again"
    )


@pytest.mark.parametrize("loader", [_kernel_utils.spec_cases, test_reference._spec_cases])
def test_missing_file_fails_not_skips(loader, monkeypatch, tmp_path):
    module = _kernel_utils if loader is _kernel_utils.spec_cases else test_reference
    monkeypatch.setattr(module, "SPEC_VECTORS", tmp_path / "absent.json")
    with pytest.raises(pytest.fail.Exception, match="spec vectors not found"):
        loader()
