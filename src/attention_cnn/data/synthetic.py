"""Small image folders of the kind a user brings, drawn from a seed (never downloaded), for tests and benchmarks.

The built-in sample (sample.py) is easy because its classes differ in colour and texture. A user's classes often
differ in shape, in colours that say nothing about the class; these folders test that case:

    shapes    circle / square / triangle: a filled shape of random size, position and rotation, random
              foreground and background colours, light pixel noise. Only the outline tells the classes apart.
    textures  stripes / checks / dots: a two-colour pattern of random colours, period, angle and phase filling
              the image, light pixel noise. Only the pattern's structure tells them apart.
    noise     the shapes' classes with the pixels of pure noise: nothing to learn (for the "did not learn" check).
    cluttered the shapes' classes drawn by a second, independent generator (cluttered.py): hollow or filled,
              over busy backgrounds with distractor lines and stronger noise. Harder than shapes.

Every image has its own RNG seeded by (seed, kind, class, index), so a folder is the same on every machine.
The shapes folder also gets ground-truth masks of the shape (255 inside), in `.masks/<class>/<stem>.png` as the
built-in sample stores them, so relevance mass and the pointing game run on it; textures fill the whole image
and noise has no evidence, so they get none.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attention_cnn.atomic import atomic_dir
from attention_cnn.data.cluttered import CLASSES as CLUTTERED_CLASSES, draw_cluttered
from attention_cnn.data.discover import MASKS_DIR
from attention_cnn.data.sample import rng_for

KINDS = {
    "shapes": ("circle", "square", "triangle"),
    "textures": ("checks", "dots", "stripes"),
    "noise": ("a", "b", "c"),
    "cluttered": CLUTTERED_CLASSES,
}


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background, any hue, at least a visible distance apart."""
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(fg - bg).sum() >= 150:
            return fg, bg


def _shape(rng: np.random.Generator, name: str, size: int) -> tuple[np.ndarray, Image.Image]:
    """The shape's pixels and its mask (mode L, 255 inside), drawn with the same geometry."""
    fg, bg = _two_colours(rng)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    mask = Image.new("L", (size, size), 0)
    r = rng.uniform(0.15, 0.35) * size                  # circumradius
    cx, cy = rng.uniform(r, size - r, 2)                # the whole shape stays inside
    sides = {"circle": 0, "square": 4, "triangle": 3}[name]
    draws = [(ImageDraw.Draw(image), tuple(int(v) for v in fg)), (ImageDraw.Draw(mask), 255)]
    if sides == 0:
        for draw, fill in draws:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        start = rng.uniform(0, 2 * math.pi)
        angles = [start + 2 * math.pi * k / sides for k in range(sides)]
        corners = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        for draw, fill in draws:
            draw.polygon(corners, fill=fill)
    return np.asarray(image, dtype=np.float32), mask


def _texture(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    fg, bg = _two_colours(rng)
    period = rng.uniform(0.12, 0.25) * size
    angle = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xs * math.cos(angle) + ys * math.sin(angle)) / period + rng.uniform(0, 1)
    v = (-xs * math.sin(angle) + ys * math.cos(angle)) / period + rng.uniform(0, 1)
    if name == "stripes":
        on = (u % 1) < 0.5
    elif name == "checks":
        on = ((np.floor(u) + np.floor(v)) % 2) == 0
    else:  # dots: a disc in each cell of the grid
        on = ((u % 1) - 0.5) ** 2 + ((v % 1) - 0.5) ** 2 < 0.3 ** 2
    return np.where(on[..., None], fg, bg).astype(np.float32)


def draw_image(seed: int, kind: str, name: str, index: int, size: int = 96) -> Image.Image:
    """Image `index` of class `name` of `kind`: the same pixels for the same arguments."""
    return draw_with_mask(seed, kind, name, index, size)[0]


def draw_with_mask(seed: int, kind: str, name: str, index: int,
                   size: int = 96) -> tuple[Image.Image, Image.Image | None]:
    """Image `index` of class `name` of `kind` and its ground-truth mask (shapes only, else None)."""
    if kind == "cluttered":  # its own RNG, drawing and noise
        return draw_cluttered(seed, name, index, size), None
    rng = rng_for(seed, f"{kind}/{name}", index)
    mask = None
    if kind == "shapes":
        pixels, mask = _shape(rng, name, size)
    elif kind == "textures":
        pixels = _texture(rng, name, size)
    elif kind == "noise":
        pixels = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    pixels += rng.normal(0.0, 8.0, pixels.shape)        # light pixel noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"), mask


def write_folder(out_dir: Path | str, kind: str, per_class: int, seed: int = 0, size: int = 96) -> Path:
    """Write `<out_dir>/<class>/<class>_NNNN.png`, per_class images of each class of `kind`, atomically, and for
    shapes `<out_dir>/.masks/<class>/<class>_NNNN.png`."""
    with atomic_dir(out_dir) as staging:
        for name in KINDS[kind]:
            (staging / name).mkdir()
            for i in range(per_class):
                image, mask = draw_with_mask(seed, kind, name, i, size)
                image.save(staging / name / f"{name}_{i:04d}.png")
                if mask is not None:
                    (staging / MASKS_DIR / name).mkdir(parents=True, exist_ok=True)
                    mask.save(staging / MASKS_DIR / name / f"{name}_{i:04d}.png")
    return Path(out_dir)
