"""Atomic writes: all-or-nothing, default file mode, no temporary files left behind."""

import os

import pytest

from mskd_fast._atomic import atomic_path, default_file_mode


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "report.csv"
    with atomic_path(target, durable=True) as tmp:
        assert tmp.endswith(".csv") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as fh:
            fh.write("first")
    assert target.read_text() == "first"
    assert (os.stat(target).st_mode & 0o777) == default_file_mode()
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("boom")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.csv"]
