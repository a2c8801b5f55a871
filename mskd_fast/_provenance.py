"""Which code ran: the commit and a content hash of the package source, recorded by every run.

A trained row of a study is only meaningful next to the code that trained it. :func:`code_provenance` returns

* ``source_hash``: SHA-256 over the sorted ``(relative path, SHA-256 of the bytes)`` of every source file that
  makes up the package as it is imported here: the ``*.py`` files of ``mskd_fast`` (the folder this module was
  imported from) and of ``mskd_fast.kernels`` (wherever the import system finds it: ``kernels/`` in a
  checkout), plus the C++/CUDA sources (``csrc/``) and ``setup.py`` when the package runs from a checkout.
  It depends on the bytes only, not on git, so an installed copy, a checkout and a ``git archive`` of the same
  sources give the same hash (the ``csrc/`` part excepted, where it is not shipped: ``roots`` says what was
  hashed);
* ``commit`` (``None`` outside a git checkout), ``dirty`` (whether the hashed paths differ from ``commit``:
  modified, staged or untracked files) and ``diff_hash`` (SHA-256 of ``git diff HEAD`` over them plus the
  untracked files' bytes; ``None`` when clean).

The trainer writes it into ``args.yaml`` (``resolved.code``) and the evaluator into ``metrics.json``;
``bench/accuracy_study.py`` reuses a finished run only when its ``source_hash`` is the current one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess

__all__ = ["code_provenance", "source_hash", "source_files"]

_CSRC_SUFFIXES = (".cpp", ".cu", ".h", ".cuh", ".hpp")
_GIT_PATHS = ("mskd_fast", "kernels", "csrc", "setup.py", "pyproject.toml")


def _files_under(root: str, suffixes: tuple[str, ...]) -> list[str]:
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        out += [os.path.join(folder, n) for n in sorted(names) if n.endswith(suffixes)]
    return out


def _package_dirs() -> tuple[str, str | None]:
    """``(mskd_fast folder, mskd_fast.kernels folder or None)``, as this interpreter imports them."""
    package = os.path.dirname(os.path.abspath(__file__))
    try:
        spec = importlib.util.find_spec("mskd_fast.kernels")
    except (ImportError, ValueError):
        spec = None
    kernels = None
    if spec is not None and spec.submodule_search_locations:
        kernels = os.path.abspath(list(spec.submodule_search_locations)[0])
    return package, kernels


def source_files() -> dict[str, str]:
    """``{name: absolute path}`` of the hashed files; names are ``mskd_fast/...``, ``kernels/...``,
    ``csrc/...`` and ``setup.py`` (the last two only when the package runs from a checkout)."""
    package, kernels = _package_dirs()
    files = {}
    for path in _files_under(package, (".py",)):
        rel = os.path.relpath(path, package).replace(os.sep, "/")
        if rel.startswith("kernels/"):  # an installed copy ships the kernels inside the package
            files[rel] = path
        else:
            files["mskd_fast/" + rel] = path
    if kernels is not None and not kernels.startswith(package + os.sep):
        for path in _files_under(kernels, (".py",)):
            files["kernels/" + os.path.relpath(path, kernels).replace(os.sep, "/")] = path
    checkout = os.path.dirname(package)
    if os.path.isfile(os.path.join(checkout, "setup.py")) and os.path.isdir(os.path.join(checkout, "csrc")):
        for path in _files_under(os.path.join(checkout, "csrc"), _CSRC_SUFFIXES):
            files["csrc/" + os.path.relpath(path, os.path.join(checkout, "csrc")).replace(os.sep, "/")] = path
        files["setup.py"] = os.path.join(checkout, "setup.py")
    return files


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_hash(files: dict[str, str] | None = None) -> str:
    """SHA-256 (hex) of the package source: ``files`` (default :func:`source_files`) by name and content."""
    files = source_files() if files is None else files
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{_sha256_file(files[name])}\n".encode())
    return digest.hexdigest()


def _git(checkout: str, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", "-C", checkout, *args], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_provenance() -> dict:
    """``{"commit", "dirty", "diff_hash", "source_hash", "roots"}`` of the package as imported (module doc)."""
    files = source_files()
    package, kernels = _package_dirs()
    checkout = os.path.dirname(package)
    roots = sorted({name.split("/", 1)[0] for name in files})
    out = {"commit": None, "dirty": None, "diff_hash": None, "source_hash": source_hash(files), "roots": roots}
    top = _git(checkout, "rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top.decode().strip()) != os.path.realpath(checkout):
        return out  # not a checkout of this project (an installed copy, or a folder inside another repository)
    commit = _git(checkout, "rev-parse", "HEAD")
    out["commit"] = None if commit is None else commit.decode().strip()
    paths = [p for p in _GIT_PATHS if os.path.exists(os.path.join(checkout, p))]
    diff = _git(checkout, "diff", "HEAD", "--binary", "--", *paths)
    untracked = _git(checkout, "ls-files", "--others", "--exclude-standard", "-z", "--", *paths)
    if diff is None or untracked is None:
        return out
    names = sorted(n for n in untracked.decode().split("\0") if n)
    out["dirty"] = bool(diff) or bool(names)
    if out["dirty"]:
        digest = hashlib.sha256(diff)
        for name in names:
            digest.update(f"\0{name}\0{_sha256_file(os.path.join(checkout, name))}".encode())
        out["diff_hash"] = digest.hexdigest()
    return out
