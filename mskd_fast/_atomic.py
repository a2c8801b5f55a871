"""Atomic file writes: every report, plot and checkpoint goes through :func:`atomic_path`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from mskd_fast._fs import WriteError, oserror_in_chain, write_failure

__all__ = ["atomic_path", "default_file_mode"]


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open()`` would give a new file (mkstemp uses 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds, move it over ``path``.

    The caller writes the whole file to the yielded path. On success the file gets the mode a plain
    ``open()`` would give and is renamed onto ``path`` with ``os.replace`` (readers never see a
    half-written file); on any exception it is removed and ``path`` is untouched. ``durable=True``
    also fsyncs the file before the rename and the folder after it (for checkpoints).

    A failure of the file system (an ``OSError`` with an ``errno`` anywhere in the exception's chain: a
    full disk, a read-only mount, ...) is raised as :class:`mskd_fast._fs.WriteError` naming ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=os.path.splitext(path)[1] or ".tmp")
    except OSError as exc:
        raise WriteError(write_failure(exc, path)) from exc
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, WriteError) and oserror_in_chain(exc) is not None:
            raise WriteError(write_failure(exc, path)) from exc
        raise
    if durable:
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:  # some filesystems cannot fsync a folder; the rename itself is still atomic
            pass
