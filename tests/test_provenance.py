"""``mskd_fast._provenance``: the source hash depends on the files' names and bytes only; the trainer and the
evaluator record it (checked end to end by the accuracy-study smoke tests)."""

import re

from mskd_fast._provenance import code_provenance, source_files, source_hash


def test_source_hash_follows_names_and_bytes(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    files = {"mskd_fast/a.py": str(a), "mskd_fast/b.py": str(b)}
    h = source_hash(files)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert source_hash(dict(reversed(list(files.items())))) == h  # order of the dict does not matter
    assert source_hash({"mskd_fast/a.py": str(a), "mskd_fast/c.py": str(b)}) != h  # a renamed file
    b.write_text("y = 3\n")
    assert source_hash(files) != h  # one changed byte


def test_this_checkout_hashes_package_kernels_and_extension_sources():
    names = source_files()
    assert "mskd_fast/_provenance.py" in names and "mskd_fast/train.py" in names
    assert any(n.startswith("kernels/") for n in names)  # mskd_fast.kernels, mapped from kernels/
    assert any(n.startswith("csrc/") and n.endswith(".cpp") for n in names)
    assert not any("__pycache__" in n for n in names)
    p = code_provenance()
    assert p["source_hash"] == source_hash(names)
    assert set(p["roots"]) >= {"mskd_fast", "kernels", "csrc"}
    if p["commit"] is not None:  # a git checkout (CI: a clean clone)
        assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]) and isinstance(p["dirty"], bool)
        assert (p["diff_hash"] is None) == (not p["dirty"])
