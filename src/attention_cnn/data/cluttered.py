"""A second, independently written shapes generator: harder than synthetic.py's `shapes`, for robustness checks.

    cluttered  circle / square / triangle over a busy background: half of them hollow outlines (2 to 5 px thick),
               half filled, radius 10 % to 38 % of the side, any position, rotation and colour; the background
               is a two-colour gradient, a soft blotchy noise field or low-contrast stripes; one or two thin
               distractor lines cross the image; pixel noise of a random strength (sigma 4 to 16).

It shares no drawing code with synthetic.py on purpose: a recipe tuned on one generator's quirks (its sizes,
its always-filled shapes, its flat backgrounds) must still learn this one. Drawn at twice the size and
downsampled, so edges are anti-aliased like a photo's rather than PIL's hard polygon edges.
Every image has its own RNG seeded by (seed, class, index) through sample.rng_for: the same pixels everywhere.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from attention_cnn.data.sample import rng_for

CLASSES = ("circle", "square", "triangle")
_SIDES = {"circle": 0, "square": 4, "triangle": 3}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: a gradient, blotches or faint stripes, in random colours."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    style = rng.integers(3)
    if style == 0:      # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = (xs * math.cos(angle) + ys * math.sin(angle))
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif style == 1:    # blotches: coarse noise, upsampled smoothly
        cells = int(rng.integers(3, 8))
        coarse = Image.fromarray((rng.uniform(0, 1, (cells, cells)) * 255).astype(np.uint8), "L")
        t = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    else:               # faint stripes: the pair of colours drawn close together
        b = np.clip(a + rng.normal(0, 35, 3), 0, 255)
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.05, 0.2)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    return a * (1 - t[..., None]) + b * t[..., None]


def _ink(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A shape colour visibly away from the background's mean colour (any hue: colour says nothing)."""
    mean = background.reshape(-1, 3).mean(0)
    while True:
        c = rng.integers(0, 256, 3)
        if np.abs(c - mean).sum() >= 120:
            return tuple(int(v) for v in c)


def draw_cluttered(seed: int, name: str, index: int, size: int = 96) -> Image.Image:
    """Image `index` of class `name`: the same pixels for the same arguments."""
    if name not in _SIDES:
        raise ValueError(f"unknown class {name!r}; expected one of {CLASSES}")
    rng = rng_for(seed, f"cluttered/{name}", index)
    big = 2 * size                                          # drawn at 2x, then downsampled: anti-aliased
    image = Image.fromarray(np.clip(_background(rng, big), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 3))):                # distractor lines, thinner than most outlines
        x0, y0, x1, y1 = rng.uniform(0, big, 4)
        draw.line((x0, y0, x1, y1), fill=_ink(rng, np.asarray(image, np.float32)), width=int(rng.integers(1, 4)))
    ink = _ink(rng, np.asarray(image, np.float32))
    r = rng.uniform(0.10, 0.38) * big                       # circumradius
    cx, cy = rng.uniform(r, big - r, 2)
    hollow = rng.random() < 0.5
    width = int(rng.integers(4, 11)) if hollow else 0       # 2 to 5 px once downsampled
    sides = _SIDES[name]
    if sides == 0:
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, outline=ink, width=width) if hollow else draw.ellipse(box, fill=ink)
    else:
        start = rng.uniform(0, 2 * math.pi)
        angles = [start + 2 * math.pi * k / sides for k in range(sides)]
        corners = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
        if hollow:  # a closed polyline: PIL's polygon outline width joins corners badly
            draw.line(corners + corners[:1], fill=ink, width=width, joint="curve")
        else:
            draw.polygon(corners, fill=ink)
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(4, 16), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
