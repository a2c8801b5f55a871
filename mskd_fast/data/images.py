"""Cheap image validation: read the width and height from a JPEG or PNG header, without decoding.

Every reader checks all of its images this way before training starts, so that a missing,
truncated or non-image file is reported up front (with its path) instead of crashing a DALI or
DataLoader worker hours into a run. The check reads the first bytes (up to the JPEG frame header)
and the last few KiB (end-of-image marker) of each file:

* JPEG: starts with SOI ``FF D8``; a start-of-frame marker (SOF0..SOF15 except DHT/JPG/DAC) with
  a positive size appears before the first start-of-scan; an end-of-image marker ``FF D9`` lies in
  the last 4 KiB (so a file cut inside its compressed data is caught; ``FF D9`` cannot occur inside
  entropy-coded data).
* PNG: the 8-byte signature, an ``IHDR`` first chunk with a positive size, an ``IEND`` chunk at
  the end.

The size is the size of the image as displayed: an EXIF orientation of 5-8 (a JPEG's APP1 segment, a
PNG's ``eXIf`` chunk) swaps width and height, as the loaders apply the orientation when decoding
(:mod:`mskd_fast.data.decode`, DALI).

Other formats (TIFF, BMP, GIF, WebP, ...) are reported as unsupported, naming the format: both loaders
decode JPEG and PNG only.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_TAIL_BYTES = 4096
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone (no length field): TEM, RST0..RST7, SOI.
_STANDALONE_MARKERS = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])
_OTHER_FORMATS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"GIF8", "GIF"),
                  (b"RIFF", "RIFF (WebP?)"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"))
_EXIF_ORIENTATION_TAG = 0x0112


class BadImage(Exception):
    """Raised by :func:`image_size` for a file that is missing or is not a valid JPEG/PNG.

    ``reason`` is ``"missing_image"`` (no such file) or ``"bad_image"`` (anything else); ``detail``
    says what was wrong.
    """

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


def image_size(path: str) -> tuple[int, int]:
    """Return ``(width, height)`` of the JPEG or PNG at ``path`` from its header.

    Raises :class:`BadImage` when the file is missing, empty, truncated, of another format, or
    its header is malformed.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"\xff\xd8"):
                return _jpeg_size(path, f)
            if head == _PNG_SIGNATURE:
                return _png_size(path, f)
    except FileNotFoundError:
        raise BadImage(path, "missing_image", "file not found") from None
    except IsADirectoryError:
        raise BadImage(path, "bad_image", "is a directory, expected an image file") from None
    except OSError as exc:
        raise BadImage(path, "bad_image", f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise BadImage(path, "bad_image", "empty file")
    for signature, name in _OTHER_FORMATS:
        if head.startswith(signature):
            raise BadImage(path, "bad_image", f"not a JPEG or PNG file but a {name} file (only JPEG and PNG are "
                                              "supported: convert it, e.g. to an 8-bit PNG)")
    raise BadImage(path, "bad_image", "not a JPEG or PNG file (unknown signature)")


def exif_orientation(tiff: bytes) -> int:
    """The orientation (1-8) recorded in an EXIF block (the TIFF structure after ``Exif\\0\\0``); 1 if none."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * k)
            if tag == _EXIF_ORIENTATION_TAG and kind == 3:  # SHORT, stored in the first 2 value bytes
                (orientation,) = struct.unpack_from(order + "H", value, 0)
                return orientation if 1 <= orientation <= 8 else 1
    except struct.error:
        return 1
    return 1


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation >= 5 else size


def _jpeg_size(path: str, f) -> tuple[int, int]:
    f.seek(2)
    size = None
    orientation = 1
    while size is None:
        byte = f.read(1)
        if not byte:
            raise BadImage(path, "bad_image", "JPEG header ends before a frame header (truncated)")
        if byte != b"\xff":
            raise BadImage(path, "bad_image", f"malformed JPEG header (byte {byte.hex()} where a marker belongs)")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            raise BadImage(path, "bad_image", "JPEG header ends inside a marker (truncated)")
        code = marker[0]
        if code in _STANDALONE_MARKERS:
            continue
        if code == 0xDA:
            raise BadImage(path, "bad_image", "JPEG has no frame header before its scan data")
        if code == 0xD9:
            raise BadImage(path, "bad_image", "JPEG ends before any frame header")
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            raise BadImage(path, "bad_image", "JPEG header ends inside a segment (truncated)")
        (length,) = struct.unpack(">H", length_bytes)
        if length < 2:
            raise BadImage(path, "bad_image", f"malformed JPEG segment length {length}")
        if code in _SOF_MARKERS:
            frame = f.read(5)
            if len(frame) < 5:
                raise BadImage(path, "bad_image", "JPEG frame header truncated")
            _, height, width = struct.unpack(">BHH", frame)
            if width == 0 or height == 0:
                raise BadImage(path, "bad_image", f"JPEG frame header gives size {width}x{height}")
            size = (width, height)
        elif code == 0xE1 and orientation == 1:  # APP1: EXIF (comes before the frame header)
            segment = f.read(length - 2)
            if segment.startswith(b"Exif\x00\x00"):
                orientation = exif_orientation(segment[6:])
        else:
            f.seek(length - 2, os.SEEK_CUR)
    file_size = os.fstat(f.fileno()).st_size
    f.seek(max(0, file_size - _JPEG_TAIL_BYTES))
    if b"\xff\xd9" not in f.read(_JPEG_TAIL_BYTES):
        raise BadImage(path, "bad_image", "JPEG has no end-of-image marker in its last 4 KiB (truncated)")
    return _oriented(size, orientation)


def _png_size(path: str, f) -> tuple[int, int]:
    ihdr = f.read(16)
    if len(ihdr) < 16 or ihdr[4:8] != b"IHDR":
        raise BadImage(path, "bad_image", "PNG does not start with an IHDR chunk")
    width, height = struct.unpack(">II", ihdr[8:16])
    if width == 0 or height == 0:
        raise BadImage(path, "bad_image", f"PNG header gives size {width}x{height}")
    file_size = os.fstat(f.fileno()).st_size
    f.seek(max(0, file_size - 12))
    if b"IEND" not in f.read(12):
        raise BadImage(path, "bad_image", "PNG has no IEND chunk at its end (truncated)")
    return _oriented((width, height), _png_orientation(f))


def _png_orientation(f) -> int:
    """EXIF orientation from an ``eXIf`` chunk before the image data (chunk headers only are read)."""
    f.seek(8 + 25)  # signature + IHDR chunk
    while True:
        head = f.read(8)
        if len(head) < 8:
            return 1
        length, kind = struct.unpack(">I4s", head)
        if kind in (b"IDAT", b"IEND"):
            return 1
        if kind == b"eXIf":
            return exif_orientation(f.read(length))
        f.seek(length + 4, os.SEEK_CUR)


def scan_images(paths: list[str], threads: int = 8) -> tuple[list[tuple[int, int] | None], list[BadImage]]:
    """Header-check every path (in a small thread pool: the work is file I/O).

    Returns ``(sizes, bad)``: ``sizes[i]`` is ``(width, height)`` or ``None`` for a bad image, and
    ``bad`` lists the :class:`BadImage` errors in path order.
    """

    def check(path: str):
        try:
            return image_size(path)
        except BadImage as exc:
            return exc

    if len(paths) < 64:
        results = [check(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(check, paths, chunksize=256))
    sizes = [None if isinstance(r, BadImage) else r for r in results]
    bad = [r for r in results if isinstance(r, BadImage)]
    return sizes, bad
