"""Decode one image file into the 8-bit RGB tensor every transform expects (torch loader).

:func:`decode_rgb8` returns ``(3, H, W)`` uint8 with the EXIF orientation applied (as DALI's decoders,
torchvision with ``apply_exif_orientation=True`` and PIL's ``exif_transpose`` do), whatever the file's
bit depth and colour type:

* JPEG: ``torchvision.io.decode_image`` (libjpeg-turbo), grey expanded to RGB.
* PNG with 1-8 bits per sample, and 16-bit grey: PIL. Sub-byte grey is scaled to 0..255 (a 1-bit
  white is 255), palettes are expanded, alpha is dropped (not composited), 16-bit grey ``v`` becomes
  ``round(v * 255 / 65535)``.
* PNG with 16-bit colour (RGB, RGBA, grey + alpha): PIL keeps only the high byte of these, so they are
  decoded at full depth by torchvision and scaled the same way, ``round(v * 255 / 65535)``: DALI's
  conversion, so both loaders see the same pixels. libpng inside torchvision crashes the process on a
  corrupt PNG (a segmentation fault, not an exception), so such a file is first fully decoded by PIL and
  its chunk CRCs checked; only a file that passes both reaches torchvision.

Without the conversion a 16-bit PNG stays in 0..65535 through the evaluation resize, and the model sees
pixels 257 times too bright. Any decode failure raises :class:`mskd_fast.data.images.BadImage` naming the
file (``reason="bad_image"``).
"""

from __future__ import annotations

import re
import struct
import warnings
import zlib

import numpy as np
import torch

from .images import BadImage

__all__ = ["decode_rgb8", "uint16_to_uint8"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PIL_GREY16 = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def uint16_to_uint8(values: np.ndarray | torch.Tensor):
    """``round(v * 255 / 65535)`` for 16-bit samples (numpy or torch; returns uint8 of the same kind)."""
    if isinstance(values, torch.Tensor):
        v = values.to(torch.int64).clamp_(0, 65535)
        return ((v * 255 + 32767) // 65535).to(torch.uint8)
    v = np.clip(np.asarray(values, dtype=np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def decode_rgb8(path: str) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB of the JPEG or PNG at ``path``, EXIF orientation applied (see module docstring).

    Raises :class:`BadImage` when the file cannot be read or decoded.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        reason = "missing_image" if isinstance(exc, FileNotFoundError) else "bad_image"
        raise BadImage(path, reason, f"cannot be read ({exc.strerror or exc})") from None
    if data.startswith(_PNG_SIGNATURE):
        if len(data) >= 26 and data[24] == 16 and data[25] in (2, 4, 6):
            return _png16_colour(path, data)
        return _pil_rgb8(path, data)
    return _torchvision_rgb8(path, data)


def _torchvision_rgb8(path: str, data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():
            # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec; they still work.
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities",
                                    category=DeprecationWarning)
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                 apply_exif_orientation=True)
    except (RuntimeError, ValueError) as exc:
        raise BadImage(path, "bad_image", f"cannot be decoded ({_first_line(exc)})") from None
    if image.dtype == torch.uint16:
        image = uint16_to_uint8(image)
    elif image.dtype != torch.uint8:
        raise BadImage(path, "bad_image", f"decodes to {image.dtype}, expected 8 or 16 bits per sample")
    return image


def _open_pil(path: str, data: bytes):
    import io

    from PIL import Image, ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for corrupt files
        raise BadImage(path, "bad_image", f"cannot be decoded ({type(exc).__name__}: {_first_line(exc)})") from None


def _pil_rgb8(path: str, data: bytes) -> torch.Tensor:
    image = _open_pil(path, data)
    if image.mode in _PIL_GREY16:
        grey = uint16_to_uint8(np.asarray(image))
        array = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _png16_colour(path: str, data: bytes) -> torch.Tensor:
    _check_png_crcs(path, data)
    _open_pil(path, data)  # full decode by PIL: a corrupt stream raises here, not inside libpng
    return _torchvision_rgb8(path, data)


def _check_png_crcs(path: str, data: bytes) -> None:
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > len(data):
            raise BadImage(path, "bad_image", f"PNG chunk {kind!r} runs past the end of the file (truncated)")
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(data[pos + 4 : end]) & 0xFFFFFFFF != crc:
            raise BadImage(path, "bad_image", f"PNG chunk {kind.decode('latin-1')!r} has a wrong CRC (corrupt)")
        if kind == b"IEND":
            return
        pos = end + 4
    raise BadImage(path, "bad_image", "PNG ends without an IEND chunk (truncated)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[-1] if text else type(exc).__name__
    return re.sub(r"^.*\.cpp:\d+, ", "", line)[:200]  # torchvision prefixes its C++ source location
