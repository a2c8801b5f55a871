"""Filesystem checks shared by the trainer, the evaluator and the dataset cache.

* :func:`check_writable_dir`: before any work starts, can ``path`` be (created as) a folder this process
  writes into? Nothing is left behind. ``os.access`` is not used: it says yes to root on a read-only mount.
* :func:`write_failure`: the one-line explanation of an ``OSError`` met while writing a file (no space left,
  quota, read-only file system, ...), naming the file and, for a full disk, how much was needed and free.
* :class:`WriteError`: raised by the writers of run files (checkpoints) with that explanation.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

__all__ = ["WriteError", "check_writable_dir", "oserror_in_chain", "write_failure"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
    """Writing a run file failed (full disk, read-only file system, ...); the message names the file."""


def oserror_in_chain(exc: BaseException) -> OSError | None:
    """The first ``OSError`` with an ``errno`` in ``exc`` and its ``__cause__``/``__context__`` chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _free_bytes(path: str) -> int | None:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def write_failure(exc: BaseException, path: str, needed: int | None = None) -> str:
    """A message for a failed write of ``path`` (``needed``: bytes the whole file needs, when known).

    A full disk or quota says ``no space left on device while writing PATH (N MB needed, M MB free)``;
    errors without an ``errno`` (torch's C++ writer reports a short write as ``unexpected pos``) are read
    as a full disk when the free space is below ``needed``.
    """
    os_error = oserror_in_chain(exc)
    free = _free_bytes(path)
    sizes = ", ".join(s for s in (None if needed is None else f"{_mb(needed)} needed",
                                  None if free is None else f"{_mb(free)} free") if s)
    sizes = f" ({sizes})" if sizes else ""
    code = None if os_error is None else os_error.errno
    if code in _NO_SPACE or (code is None and needed is not None and free is not None and free < needed):
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        return f"{what} while writing {path}{sizes}"
    if code == errno.EFBIG:
        return f"file too large while writing {path}: over the file-size limit of this process (ulimit -f){sizes}"
    if os_error is not None:
        return f"cannot write {path}: {os_error.strerror or os_error}"
    return f"cannot write {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def check_writable_dir(path: str, what: str) -> None:
    """Raise ``ValueError`` (naming ``what`` and the path) unless ``path`` is, or can be created as, a folder
    this process can write into.

    Creates nothing: the nearest existing ancestor must be a folder, and a temporary file is created and
    removed in it (a real write test, so read-only mounts and permissions are seen also by root).
    """
    path = os.path.abspath(path)
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        kind = "a file" if os.path.isfile(probe) else "not a folder"
        where = "" if probe == path else f" (its parent {probe} is {kind})"
        raise ValueError(f"{what} {path}: cannot be a folder{where or f': it is {kind}'}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".mskd-write-test.")
    except OSError as exc:
        where = "" if probe == path else f" (in {probe})"
        raise ValueError(f"{what} {path}: cannot write there{where}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(tmp)
