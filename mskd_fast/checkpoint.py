"""Checkpoint files: atomic writes, validated reads, and the RNG states a resume has to restore.

A checkpoint is a plain dict saved with ``torch.save`` and read back with ``weights_only=True``, so it
may only hold tensors, numbers, strings, ``None`` and dicts/lists/tuples of them (no pickled objects).
``atomic_save`` writes to a temporary file in the same folder, fsyncs it and ``os.replace``s it over the
target, so a crash (or Ctrl-C) never leaves a half-written ``last.pt``; a full disk (or any other file
system error) raises :class:`mskd_fast._fs.WriteError` ("no space left on device while writing PATH
(N MB needed, M MB free)") and leaves the previous file as it was.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile

import numpy as np
import torch

from mskd_fast._atomic import atomic_path, default_file_mode
from mskd_fast._fs import WriteError, oserror_in_chain, write_failure

__all__ = ["FORMAT", "WriteError", "atomic_save", "capture_rng", "default_file_mode", "load_checkpoint",
           "payload_bytes", "restore_rng"]

FORMAT = "mskd-fast-checkpoint-v1"


def atomic_save(obj, path: str | os.PathLike) -> str:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + ``os.replace``); returns the path.

    Raises :class:`mskd_fast._fs.WriteError` naming ``path`` and the bytes needed when the file system fails
    (``path`` keeps its previous content). The file is written through a Python file object, so that the
    ``OSError`` of a short write reaches us (torch's own writer reports it as ``unexpected pos``).
    """
    path = os.fspath(path)
    try:
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as fh:
            torch.save(obj, fh)
    except Exception as exc:
        if isinstance(exc, WriteError) or oserror_in_chain(exc) is not None:
            raise WriteError(write_failure(exc, path, payload_bytes(obj))) from exc
        raise
    return path


def payload_bytes(obj) -> int:
    """Bytes of tensor data in ``obj`` (nested dicts/lists/tuples; shared storages counted once) + 64 KiB."""
    seen, total, stack = set(), 64 * 1024, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (storage.data_ptr(), item.device.type)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def load_checkpoint(path: str | os.PathLike, *, require=("model",)) -> dict:
    """Read a checkpoint written by the trainer (on CPU) and check it holds the keys in ``require``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the path) for an unreadable,
    truncated or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path) and not _legacy_torch_file(path):
        raise ValueError(f"{path} is not a checkpoint: not a file written by torch.save (wrong file, truncated "
                         "or corrupt)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text suggests weights_only=False, which is not the fix here
        raise ValueError(f"{path} is not an mskd-fast checkpoint: it holds Python objects other than tensors and "
                         f"plain data, which are not loaded for safety ({_unpickler_reason(exc)})") from exc
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path} (a torch.save file, but truncated or corrupt: "
                         f"{type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(blob, dict):
        raise ValueError(f"checkpoint {path} holds a {type(blob).__name__}, expected a dict")
    if blob.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} is not an mskd-fast training checkpoint (format={blob.get('format')!r}, "
            f"expected {FORMAT!r}); to start from foreign weights use --initial-checkpoint"
        )
    missing = [k for k in require if k not in blob]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    return blob


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's weights-only error that names what was refused (without its advice)."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. |\.?$|\n)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__


def _legacy_torch_file(path: str) -> bool:
    """Whether ``path`` starts like torch's pre-1.6 (non-zip) serialisation: a pickle protocol 2+ header."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def capture_rng(box_generator: torch.Generator | None = None) -> dict:
    """This process's RNG states: python, numpy, torch CPU, every CUDA device, and the box generator."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002 (the global state is what we save)
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "box_generator": None if box_generator is None else box_generator.get_state(),
    }
    return state


def restore_rng(state: dict, box_generator: torch.Generator | None = None) -> list[str]:
    """Inverse of :func:`capture_rng` (CUDA states only for the devices present).

    Returns notes about states that could not be restored (a box-generator state saved on another
    device type, e.g. resuming a CPU run on a GPU); those streams keep their fresh seeds.
    """
    notes = []
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    if box_generator is not None and state.get("box_generator") is not None:
        try:
            box_generator.set_state(state["box_generator"])
        except RuntimeError as exc:
            notes.append(f"crop-box RNG state not restored (saved on another device type: {exc}); "
                         "boxes continue from --seed")
    return notes
