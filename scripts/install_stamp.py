"""Install stamps for the Makefile: skip ``pip install`` (and the 2-minute extension build) when nothing changed.

A stamp ``<venv>/.mskd-fast-<name>.stamp`` holds a key: a SHA-256 over the files the step depends on
(for the package install: everything under ``csrc/``, ``setup.py``, ``pyproject.toml`` and
``constraints.txt``), the installed torch version, the Python version and the build switches
(``CUDA_HOME``, ``MSKD_FAST_BUILD_CUDA``, ``TORCH_CUDA_ARCH_LIST``).

``python scripts/install_stamp.py check NAME [NAME ...]`` exits 0 when one of the named stamps holds
the current key and, for package stamps, the compiled ``mskd_fast._C`` in the checkout loads; else 1.
``python scripts/install_stamp.py write NAME`` records the current key (run it after a successful
install). A fresh venv has no stamps, so it always installs; so does a checkout whose ``.so`` was
deleted (``make clean``, CI).

Run it with the venv's Python: the key includes the torch version that Python sees.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {  # stamp name -> (files and folders the step depends on, whether it builds the extension)
    "venv": (("constraints.txt",), False),
    "dali": (("csrc", "setup.py", "pyproject.toml", "constraints.txt"), True),
    "dali-dev": (("csrc", "setup.py", "pyproject.toml", "constraints.txt"), True),
}
BUILD_ENV = ("CUDA_HOME", "MSKD_FAST_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST")


def _files(root: str, inputs) -> list[str]:
    found = []
    for item in inputs:
        path = os.path.join(root, item)
        if os.path.isdir(path):
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                found.extend(os.path.join(folder, n) for n in sorted(names))
        elif os.path.isfile(path):
            found.append(path)
    return found


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def compute_key(name: str, root: str = ROOT, env=None) -> str:
    """The current key of stamp ``name`` for the checkout at ``root``."""
    if name not in STEPS:
        raise ValueError(f"unknown stamp {name!r}; expected one of {', '.join(STEPS)}")
    env = os.environ if env is None else env
    inputs, _ = STEPS[name]
    digest = hashlib.sha256()
    digest.update(f"{name}\npython {sys.version_info[:3]}\ntorch {_torch_version()}\n".encode())
    for var in BUILD_ENV:
        digest.update(f"{var}={env.get(var, '')}\n".encode())
    for path in _files(root, inputs):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as fh:
            digest.update(hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()


def stamp_path(venv: str, name: str) -> str:
    return os.path.join(venv, f".mskd-fast-{name}.stamp")


def extension_loads(root: str = ROOT) -> bool:
    """True when ``mskd_fast/_C*.so`` of the checkout exists for this Python and loads (against torch)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(root, "mskd_fast", "_C" + suffix)
        if not os.path.isfile(path):
            continue
        try:
            import torch  # noqa: F401 - the extension links against torch's libraries

            spec = importlib.util.spec_from_file_location("mskd_fast._C", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except Exception:  # noqa: BLE001 - any load failure means "rebuild"
            return False
        return True
    return False


def is_current(venv: str, names, root: str = ROOT, env=None) -> bool:
    """One of the stamps ``names`` holds its current key (and the extension loads where the step builds it)."""
    for name in names:
        try:
            with open(stamp_path(venv, name)) as fh:
                recorded = fh.read().strip()
        except OSError:
            continue
        if recorded == compute_key(name, root, env) and (not STEPS[name][1] or extension_loads(root)):
            return True
    return False


def write(venv: str, name: str, root: str = ROOT, env=None) -> str:
    """Record the current key of ``name``; returns the stamp's path."""
    path = stamp_path(venv, name)
    with open(path, "w") as fh:
        fh.write(compute_key(name, root, env) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("check", "write"))
    parser.add_argument("names", nargs="+", choices=tuple(STEPS))
    parser.add_argument("--venv", default=os.path.dirname(os.path.dirname(sys.executable)),
                        help="the venv holding the stamps (default: the one running this script)")
    parser.add_argument("--root", default=ROOT, help="the checkout (default: the one holding this script)")
    args = parser.parse_args(argv)
    if args.action == "check":
        return 0 if is_current(args.venv, args.names, args.root) else 1
    if len(args.names) != 1:
        parser.error("write takes one stamp name")
    write(args.venv, args.names[0], args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
