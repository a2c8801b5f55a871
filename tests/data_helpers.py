"""Builders of tiny on-disk datasets for the data tests (imported by tests/test_data_*.py)."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
from PIL import Image


def id_colour(i: int) -> tuple[int, int, int]:
    """A solid RGB colour that encodes sample id ``i`` (0 <= i < 64), channels 60 apart."""
    return (30 + 60 * (i % 4), 30 + 60 * ((i // 4) % 4), 30 + 60 * (i // 16))


def colour_id(rgb) -> int:
    """Invert :func:`id_colour` for a (possibly slightly perturbed) colour."""
    r, g, b = (int(np.clip(round((float(v) - 30) / 60), 0, 3)) for v in rgb)
    return r + 4 * g + 16 * b


def write_image(path: str, colour=(128, 64, 32), size=(40, 30), fmt: str | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def write_noise_jpeg(path: str, size=(48, 40), seed: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=90)
    return path


def corrupt(path: str, how: str = "garbage") -> str:
    """Overwrite ``path`` with random bytes (``garbage``), or cut it to half its size (``truncate``)."""
    if how == "garbage":
        with open(path, "wb") as f:
            f.write(bytes(range(7, 207)))
    else:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    return path


def voc_xml(objects, size=(40, 30)) -> str:
    """VOC annotation text; ``objects`` is a list of (name, (xmin, ymin, xmax, ymax), difficult)."""
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    head = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    return f"<annotation>{head}{body}</annotation>"


def make_voc(root: str, annotations: dict, splits: dict, size=(40, 30)) -> str:
    """A VOC2007 folder under ``root/VOCdevkit/VOC2007``; returns ``root``.

    ``annotations``: image id -> list of (name, box, difficult); ``splits``: split -> list of ids.
    """
    voc = os.path.join(root, "VOCdevkit", "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub), exist_ok=True)
    for k, (image_id, objects) in enumerate(annotations.items()):
        write_noise_jpeg(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"), size=size, seed=k)
        with open(os.path.join(voc, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(voc_xml(objects, size))
    for split, ids in splits.items():
        with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return root


def make_coco(root: str, split_dir: str, images: list[dict], annotations: list[dict], categories: list[dict]) -> str:
    """``root/<split_dir>/`` with one JPEG per image entry and ``annotations/instances_<split_dir>.json``."""
    for k, im in enumerate(images):
        write_noise_jpeg(os.path.join(root, split_dir, im["file_name"]), size=(im["width"], im["height"]), seed=k)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split_dir}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root


def make_solid_manifest(root: str, num: int, num_classes: int = 5, fmt: str = "png") -> tuple[str, np.ndarray]:
    """A manifest folder whose image ``i`` is solid :func:`id_colour` ``(i)`` and whose labels are the
    binary digits of ``i + 1``; returns ``(root, labels (num, num_classes) uint8)``.

    Image sizes vary (40+i x 30+i/2) so that resizing is exercised; ``train.csv`` and ``test.csv``
    list the same images.
    """
    classes = [f"c{j}" for j in range(num_classes)]
    labels = np.array([[(i + 1) >> j & 1 for j in range(num_classes)] for i in range(num)], dtype=np.uint8)
    rows = []
    for i in range(num):
        name = f"img/{i:03d}.{fmt}"
        write_image(os.path.join(root, name), id_colour(i), size=(40 + i, 30 + i // 2))
        rows.append(f"{name},{'|'.join(c for c, y in zip(classes, labels[i]) if y)}\n")
    for split in ("train", "test"):
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("path,labels\n" + "".join(rows))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    return root, labels


def write_idx(path: str, array: np.ndarray) -> str:
    """Write ``array`` (uint8, ``(n, rows, cols)`` images or ``(n,)`` labels) as an IDX file (gzip if ``.gz``)."""
    import gzip
    import struct

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (struct.pack(">IIII", 2051, *array.shape) if array.ndim == 3 else struct.pack(">II", 2049, len(array)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def make_fake_fashion_mnist(root: str, side: int = 6, n_train: int = 60000, n_test: int = 10000) -> str:
    """A Fashion-MNIST look-alike in ``root`` (gzip IDX files, the package's names): ``side`` x ``side`` items,
    each a bright square whose size encodes nothing, labels ``i % 10``; small enough to write in a second."""
    rng = np.random.default_rng(0)
    for kind, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 60, size=(n, side, side), dtype=np.uint8)
        images[:, 1:-1, 1:-1] = 200
        write_idx(os.path.join(root, f"{kind}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(root, f"{kind}-labels-idx1-ubyte.gz"), (np.arange(n) % 10).astype(np.uint8))
    return root


def png_bytes(samples: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG of ``samples`` (H, W) or (H, W, channels), written by hand (PIL cannot write 16-bit colour)."""
    h, w = samples.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + samples[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def break_huffman_table(path: str) -> str:
    """Make a JPEG undecodable while its header stays valid: overwrite the first Huffman table's 16 code
    counts (decoders report "Bogus Huffman table definition"; the start check still passes)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.index(b"\xff\xc4")
    data[at + 5 : at + 21] = b"\xff" * 16
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path
