"""Built-in synthetic multi-scale multi-label dataset, written in VOC layout and read by the VOC reader.

Each image (``img_size`` x ``img_size``, JPEG quality 90) has a cluttered background (a low-saturation
gradient, 6-14 grey/brown distractor lines, outlines and blobs, Gaussian noise) and 1-5 objects
(uniform). Objects are drawn from 20 classes, each a unique (colour, texture, shape) triple:
4 saturated colours x 5 shapes, with one of 4 textures, so no single attribute names the class.
An object's area is log-uniform between ``(0.045 * img_size)**2`` (6 px side at 128 px: tiny) and
half the image, its aspect ratio log-uniform in [2/3, 3/2], its position uniform inside the image.
Objects may overlap; they are drawn largest first so that small ones stay visible. Boxes are
tight: the shape touches all four sides of its box.

Everything is a deterministic function of the config: image ``i`` of a split uses the generator
``numpy.random.default_rng([seed, split_code, i])``. The dataset is written once into
``<cache>/synthetic-v<version>-train<n>-test<m>-px<size>-seed<seed>/`` (cache: ``cache_dir``, else
``$MSKD_FAST_CACHE``, else ``~/.cache/mskd_fast``), generated in a temporary folder and renamed
into place, with ``mskd_synthetic.json`` recording the config; later runs reuse it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .generated import JPEG_QUALITY, ensure_generated, write_voc_split
from .generated import cache_root as _cache_root

GENERATOR_VERSION = 1
META_FILE = "mskd_synthetic.json"
SPLITS = ("train", "test")
MIN_SIDE_FRAC = 0.045
MAX_AREA_FRAC = 0.5
MAX_OBJECTS = 5

COLOURS = {"red": (205, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (225, 200, 35)}
TEXTURES = ("solid", "stripes", "checker", "dots")
SHAPES = ("circle", "square", "triangle", "star", "cross")


def _class_table() -> list[tuple[str, str, str]]:
    table = []
    for s, shape in enumerate(SHAPES):
        for k, colour in enumerate(COLOURS):
            table.append((colour, TEXTURES[(s + k) % len(TEXTURES)], shape))
    return table


CLASS_TABLE = _class_table()
SYNTHETIC_CLASSES = tuple(f"{c}_{t}_{s}" for c, t, s in CLASS_TABLE)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, resolution, seed and cache folder of the synthetic dataset.

    ``train_size`` images in split ``train``; ``test_size`` in ``test`` (``None``: 30% of
    ``train_size``, at least 1); square images of ``img_size`` pixels; ``cache_dir`` ``None`` means
    ``$MSKD_FAST_CACHE`` or ``~/.cache/mskd_fast``.
    """

    train_size: int = 1000
    test_size: int | None = None
    img_size: int = 128
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self):
        for name in ("train_size", "img_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"synthetic {name} must be an int, got {type(value).__name__}")
        if self.train_size < 1:
            raise ValueError(f"synthetic train_size must be >= 1, got {self.train_size}")
        if self.test_size is not None and (not isinstance(self.test_size, int) or self.test_size < 1):
            raise ValueError(f"synthetic test_size must be an int >= 1 or None, got {self.test_size!r}")
        if self.img_size < 32:
            raise ValueError(f"synthetic img_size must be >= 32 pixels, got {self.img_size}")
        if self.seed < 0:
            raise ValueError(f"synthetic seed must be >= 0, got {self.seed}")

    @property
    def num_test(self) -> int:
        return self.test_size if self.test_size is not None else max(1, round(0.3 * self.train_size))

    def split_size(self, split: str) -> int:
        return self.train_size if split == "train" else self.num_test

    def meta(self) -> dict:
        """What the images depend on (recorded in the dataset folder and checked on reuse)."""
        return {
            "generator_version": GENERATOR_VERSION,
            "train_size": self.train_size,
            "test_size": self.num_test,
            "img_size": self.img_size,
            "seed": self.seed,
            "classes": list(SYNTHETIC_CLASSES),
            "min_side_frac": MIN_SIDE_FRAC,
            "max_area_frac": MAX_AREA_FRAC,
            "max_objects": MAX_OBJECTS,
            "jpeg_quality": JPEG_QUALITY,
        }


def cache_root(config: SyntheticConfig) -> str:
    """The cache folder: ``config.cache_dir``, else ``$MSKD_FAST_CACHE``, else ``~/.cache/mskd_fast``."""
    return _cache_root(config.cache_dir)


def synthetic_dir(config: SyntheticConfig) -> str:
    """The dataset folder for ``config`` (it may not exist yet)."""
    name = (
        f"synthetic-v{GENERATOR_VERSION}-train{config.train_size}-test{config.num_test}"
        f"-px{config.img_size}-seed{config.seed}"
    )
    return os.path.join(cache_root(config), name)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _star_points() -> list[tuple[float, float]]:
    pts = []
    for j in range(10):
        radius = 1.0 if j % 2 == 0 else 0.45
        angle = -math.pi / 2 + j * math.pi / 5
        pts.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]


_THIRD = 1.0 / 3.0
_UNIT_POLYGONS = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "star": _star_points(),
    "cross": [
        (_THIRD, 0), (2 * _THIRD, 0), (2 * _THIRD, _THIRD), (1, _THIRD), (1, 2 * _THIRD), (2 * _THIRD, 2 * _THIRD),
        (2 * _THIRD, 1), (_THIRD, 1), (_THIRD, 2 * _THIRD), (0, 2 * _THIRD), (0, _THIRD), (_THIRD, _THIRD),
    ],
}  # fmt: skip


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    else:
        draw.polygon([(u * (w - 1), v * (h - 1)) for u, v in _UNIT_POLYGONS[shape]], fill=255)
    return np.asarray(mask) > 0


def _texture_mask(texture: str, w: int, h: int) -> np.ndarray | None:
    if texture == "solid":
        return None
    period = max(2, round(min(w, h) / 6))
    yy, xx = np.mgrid[0:h, 0:w]
    if texture == "stripes":
        return ((xx + yy) // period) % 2 == 0
    if texture == "checker":
        return ((xx // period) + (yy // period)) % 2 == 0
    q = 2 * period
    return ((xx % q - q / 2 + 0.5) ** 2 + (yy % q - q / 2 + 0.5) ** 2) < (period * 0.6) ** 2


def _dull_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = rng.uniform(50, 210)
    tint = rng.uniform(-22, 22, size=3)
    return tuple(int(v) for v in np.clip(grey + tint, 0, 255))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    c0, c1 = np.array(_dull_colour(rng), float), np.array(_dull_colour(rng), float)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
    image = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 15))):
        kind = int(rng.integers(0, 4))
        x0, y0 = rng.uniform(-0.1, 1.0, size=2) * size
        ext = rng.uniform(0.05, 0.5, size=2) * size
        box = [float(x0), float(y0), float(x0 + ext[0]), float(y0 + ext[1])]
        colour = _dull_colour(rng)
        width = int(rng.integers(1, 4))
        if kind == 0:
            draw.line(box, fill=colour, width=width)
        elif kind == 1:
            draw.ellipse(box, outline=colour, width=width)
        elif kind == 2:
            draw.rectangle(box, outline=colour, width=width)
        else:
            pts = [tuple(float(v) for v in p) for p in (rng.uniform(0, 1, size=(5, 2)) * ext + [x0, y0])]
            draw.polygon(pts, fill=colour)
    return image


def render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image. Returns ``(image (size, size, 3) uint8, boxes (n, 4) int64, classes (n,) int64)``.

    Boxes are ``(x1, y1, x2, y2)`` in pixels, x2/y2 exclusive: the object covers columns ``x1..x2-1``.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    classes = rng.integers(0, len(CLASS_TABLE), size=n)
    min_area = (MIN_SIDE_FRAC * size) ** 2
    max_area = MAX_AREA_FRAC * size * size
    areas = np.exp(rng.uniform(math.log(min_area), math.log(max_area), size=n))
    ratios = np.exp(rng.uniform(math.log(2 / 3), math.log(3 / 2), size=n))
    widths = np.clip(np.rint(np.sqrt(areas * ratios)), 3, size).astype(np.int64)
    heights = np.clip(np.rint(np.sqrt(areas / ratios)), 3, size).astype(np.int64)
    xs = np.array([rng.integers(0, size - w + 1) for w in widths], dtype=np.int64)
    ys = np.array([rng.integers(0, size - h + 1) for h in heights], dtype=np.int64)
    jitter = rng.uniform(-20, 20, size=(n, 3))
    canvas = np.array(_background(rng, size))
    for j in np.argsort(-(widths * heights), kind="stable"):
        colour_name, texture, shape = CLASS_TABLE[classes[j]]
        w, h, x, y = int(widths[j]), int(heights[j]), int(xs[j]), int(ys[j])
        colour = np.clip(np.array(COLOURS[colour_name], float) + jitter[j], 0, 255)
        patch = np.empty((h, w, 3), dtype=np.float64)
        patch[:] = colour
        dark = _texture_mask(texture, w, h)
        if dark is not None:
            patch[dark] = colour * 0.45
        mask = _shape_mask(shape, w, h)
        region = canvas[y : y + h, x : x + w]
        region[mask] = patch[mask].astype(np.uint8)
    noisy = canvas.astype(np.float32) + rng.normal(0.0, 6.0, size=canvas.shape).astype(np.float32)
    boxes = np.stack([xs, ys, xs + widths, ys + heights], axis=1)
    return np.clip(noisy, 0, 255).astype(np.uint8), boxes, classes.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Writing the VOC layout
# ---------------------------------------------------------------------------------------------


def _split_code(split: str) -> int:
    return SPLITS.index(split)


def image_rng(seed: int, split: str, i: int) -> np.random.Generator:
    """The generator that draws image ``i`` of ``split``."""
    return np.random.default_rng([seed, _split_code(split), i])


def _split_images(config: SyntheticConfig, split: str):
    for i in range(config.split_size(split)):
        image, boxes, classes = render_image(image_rng(config.seed, split, i), config.img_size)
        yield f"{split}_{i:06d}", image, boxes, classes


def generate_synthetic(config: SyntheticConfig, out_dir: str) -> None:
    """Write the whole dataset for ``config`` (without its meta file) into the existing folder ``out_dir``."""
    for split in SPLITS:
        write_voc_split(out_dir, split, _split_images(config, split), SYNTHETIC_CLASSES, "synthetic")


def ensure_synthetic(config: SyntheticConfig) -> str:
    """Return the dataset folder for ``config``, generating it first if it is not in the cache.

    Generation writes into a temporary sibling folder and renames it into place, so a folder that
    exists is complete; concurrent generators (e.g. DDP ranks) are safe, the first rename wins.
    """
    return ensure_generated(synthetic_dir(config), config.meta(), lambda tmp: generate_synthetic(config, tmp),
                            META_FILE, what="synthetic dataset")
