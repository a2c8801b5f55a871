"""Manifest reader: your own images listed in CSV or JSON-lines files.

``data_dir`` is a folder holding one manifest per split, ``<split>.csv``, ``<split>.jsonl`` or
``<split>.json`` (JSON lines), e.g. ``train.csv`` and ``test.csv``.

* CSV rows are ``path,labels`` (an optional header row ``path,labels`` is skipped), where
  ``labels`` is class names separated by ``|``: ``img/001.jpg,cat|dog``.
* JSON lines are objects ``{"path": "img/001.jpg", "labels": ["cat", "dog"]}`` (``labels`` may also
  be a ``|``-separated string).
* Relative paths are relative to the manifest's folder.

Class order: the class-list file given as ``manifest_classes`` (one name per line), else
``classes.txt`` in ``data_dir``, else the sorted union of the names in every manifest in
``data_dir`` (so train and test always agree). With a class list, a name not in it is an error.
Rows with an empty label set are dropped and counted under ``skipped["no_labels"]``; a path listed
twice in one split is an error.
"""

from __future__ import annotations

import csv
import io
import json
import os

from .index import DatasetError, DatasetIndex, finalize_index, labels_from_sets, raise_listing, read_text

EXTENSIONS = (".csv", ".jsonl", ".json")


def _manifest_path(data_dir: str, split: str) -> str:
    found = [
        os.path.join(data_dir, split + ext) for ext in EXTENSIONS if os.path.isfile(os.path.join(data_dir, split + ext))
    ]
    if not found:
        present = sorted(f for f in os.listdir(data_dir) if f.endswith(EXTENSIONS))
        raise DatasetError(
            f"no manifest for split {split!r} in {data_dir!r}: expected one of "
            f"{[split + e for e in EXTENSIONS]} (manifests present: {present})"
        )
    if len(found) > 1:
        raise DatasetError(f"several manifests for split {split!r}: {found}; keep one")
    return found[0]


def _split_names(value, where: str) -> list[str]:
    if isinstance(value, str):
        names = value.split("|")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = value
    else:
        raise DatasetError(f"{where}: labels must be a '|'-separated string or a list of strings, got {value!r}")
    return [n.strip() for n in names if n.strip()]


def read_rows(path: str) -> list[tuple[str, list[str], str]]:
    """Rows of a manifest file as ``(image path as written, class names, "file:line")``."""
    rows = []
    with io.StringIO(read_text(path), newline="") as f:
        if path.endswith(".csv"):
            for line_no, row in enumerate(csv.reader(f), 1):
                where = f"{path}:{line_no}"
                if not row or all(not cell.strip() for cell in row):
                    continue
                if line_no == 1 and [c.strip().lower() for c in row] == ["path", "labels"]:
                    continue
                if len(row) != 2:
                    raise DatasetError(f"{where}: expected 2 columns 'path,labels', got {len(row)}: {row!r}")
                rows.append((row[0].strip(), _split_names(row[1], where), where))
        else:
            for line_no, line in enumerate(f, 1):
                where = f"{path}:{line_no}"
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{where}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict) or "path" not in obj or "labels" not in obj:
                    raise DatasetError(f"{where}: expected an object with 'path' and 'labels', got {line.strip()!r}")
                rows.append((str(obj["path"]), _split_names(obj["labels"], where), where))
    return rows


def read_class_list(path: str) -> list[str]:
    """Class names from a file with one name per line (blank lines ignored; duplicates are an error)."""
    if not os.path.isfile(path):
        raise DatasetError(f"manifest class-list file not found: {path}")
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"manifest class-list file {path} is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"manifest class-list file {path} lists classes more than once: {dupes}")
    return names


def manifest_classes_for(data_dir: str, manifest_classes: str | None) -> list[str]:
    """The class order for a manifest folder (see the module docstring)."""
    if manifest_classes is not None:
        return read_class_list(manifest_classes)
    default = os.path.join(data_dir, "classes.txt")
    if os.path.isfile(default):
        return read_class_list(default)
    names = set()
    for f in sorted(os.listdir(data_dir)):
        if f.endswith(EXTENSIONS):
            for _, row_names, _ in read_rows(os.path.join(data_dir, f)):
                names.update(row_names)
    if not names:
        raise DatasetError(f"no class names found in the manifests of {data_dir!r}")
    return sorted(names)


def read_manifest(
    data_dir: str, split: str, *, manifest_classes: str | None = None, on_bad_image: str = "error"
) -> DatasetIndex:
    """Read ``<split>.csv|.jsonl|.json`` from the folder ``data_dir`` into a :class:`DatasetIndex` (no boxes)."""
    if data_dir is None:
        raise ValueError("data_dir is required for a manifest dataset (the folder holding <split>.csv or .jsonl)")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data_dir {data_dir!r} must be a folder holding <split>.csv or <split>.jsonl manifests")
    path = _manifest_path(data_dir, split)
    class_names = manifest_classes_for(data_dir, manifest_classes)
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    base = os.path.dirname(os.path.abspath(path))
    paths, label_sets, problems, seen = [], [], [], {}
    for image, names, where in read_rows(path):
        unknown = [n for n in names if n not in class_to_idx]
        if unknown:
            problems.append(f"{where}: unknown class {unknown[0]!r}")
            continue
        full = os.path.normpath(os.path.join(base, image))
        if full in seen:
            problems.append(f"{where}: {image!r} is already listed at {seen[full]}")
            continue
        seen[full] = where
        paths.append(full)
        label_sets.append({class_to_idx[n] for n in names})
    if problems:
        raise_listing(
            f"manifest {path}: bad rows",
            problems,
            f"known classes: {class_names[:20]}{' ...' if len(class_names) > 20 else ''}",
        )
    if not paths:
        raise DatasetError(f"manifest {path} lists no images")
    index = DatasetIndex(
        name="manifest",
        split=split,
        root=os.path.abspath(data_dir),
        paths=paths,
        labels=labels_from_sets(label_sets, len(class_names)),
        class_names=class_names,
    )
    return finalize_index(index, on_bad_image=on_bad_image)
