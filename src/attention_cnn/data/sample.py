"""The built-in sample: procedurally drawn outdoor scenes in the six classes of the Intel set the seed used.

Nothing is downloaded. Every image is drawn from its own RNG, seeded by (seed, class, index), so the set is
the same on every machine for the same params, and any one image can be regenerated alone.

Each scene is a shared background (sky gradient, ground, sun, clouds, noise: the same distractors for every
class) with the class evidence drawn at a random position and scale on top. The ground-truth mask marks the
evidence pixels, so attention maps can be scored against where the class really is. The confusable pairs of
the real data are kept: glacier and mountain share white snow and ice on grey rock, buildings and street
share facades and tarmac.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from attention_cnn.atomic import atomic_dir
from attention_cnn.data.discover import MASKS_DIR  # hidden, so prepare never takes it for a class

CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")


@dataclass
class Scene:
    image: Image.Image  # RGB, size x size
    mask: Image.Image   # L, 255 where the class evidence is


class _Canvas:
    """Draws every evidence shape on the image and the mask at once, so the two cannot disagree."""

    def __init__(self, image: Image.Image, mask: Image.Image):
        self.img = ImageDraw.Draw(image)
        self.msk = ImageDraw.Draw(mask)

    def polygon(self, points, fill, evidence: bool = True):
        self.img.polygon(points, fill=fill)
        if evidence:
            self.msk.polygon(points, fill=255)

    def rectangle(self, box, fill, evidence: bool = True):
        self.img.rectangle(box, fill=fill)
        if evidence:
            self.msk.rectangle(box, fill=255)

    def ellipse(self, box, fill, evidence: bool = True):
        self.img.ellipse(box, fill=fill)
        if evidence:
            self.msk.ellipse(box, fill=255)

    def line(self, points, fill, width: int):
        # Details inside a shape (windows, waves, cracks) are already covered by the shape's mask.
        self.img.line(points, fill=fill, width=width)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Sky, ground, sun and clouds: the distractors every class shares."""
    top = np.array(_jitter(rng, (90, 140, 210), 40), dtype=np.float32)
    bottom = np.array(_jitter(rng, (190, 210, 230), 30), dtype=np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    sky = (top * (1 - t) + bottom * t) * np.ones((1, size, 1), dtype=np.float32)
    image = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    horizon = int(size * rng.uniform(0.55, 0.85))
    ground = [(110, 95, 70), (95, 110, 70), (130, 125, 115), (150, 135, 100)][rng.integers(4)]
    draw.rectangle((0, horizon, size, size), fill=_jitter(rng, ground))
    if rng.random() < 0.5:
        r = size * rng.uniform(0.05, 0.1)
        cx, cy = rng.uniform(0, size), rng.uniform(0, horizon * 0.6)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(rng, (250, 225, 120), 10))
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, size), rng.uniform(0, horizon * 0.7)
        shade = _jitter(rng, (235, 235, 240), 15)
        for _ in range(rng.integers(2, 5)):
            w, h = size * rng.uniform(0.08, 0.18), size * rng.uniform(0.04, 0.08)
            dx, dy = rng.uniform(-w, w), rng.uniform(-h / 2, h / 2)
            draw.ellipse((cx + dx - w, cy + dy - h, cx + dx + w, cy + dy + h), fill=shade)
    return image


def _box(rng: np.random.Generator, size: int, aspect: tuple[float, float]) -> tuple[float, float, float, float]:
    """A random evidence box (x0, y0, width, height) that fits in the image: random position and scale."""
    w = size * rng.uniform(0.4, 0.75)
    h = min(size * 0.95, w * rng.uniform(*aspect))
    x0 = rng.uniform(0, size - w)
    y0 = rng.uniform(0, size - h)
    return x0, y0, w, h


def _facades(c: _Canvas, rng, x0, base, w, max_h, count, evidence=True):
    """Adjacent building blocks standing on `base`, each with a grid of windows."""
    edges = np.sort(rng.uniform(x0, x0 + w, count - 1))
    edges = np.concatenate([[x0], edges, [x0 + w]])
    for left, right in zip(edges[:-1], edges[1:]):
        if right - left < 4:
            continue
        top = base - max_h * rng.uniform(0.45, 1.0)
        wall = _jitter(rng, [(170, 160, 150), (150, 85, 70), (200, 190, 160), (120, 125, 135)][rng.integers(4)])
        c.rectangle((left, top, right, base), fill=wall, evidence=evidence)
        glass = _jitter(rng, (45, 55, 75), 15)
        step = max(4.0, (right - left) / rng.integers(2, 5))
        for wy in np.arange(top + 3, base - 5, step * 1.2):
            for wx in np.arange(left + 2, right - 3, step):
                c.img.rectangle((wx, wy, wx + step * 0.5, wy + step * 0.6), fill=glass)


def _buildings(c, rng, size):
    x0, y0, w, h = _box(rng, size, (0.8, 1.3))
    _facades(c, rng, x0, y0 + h, w, h, int(rng.integers(2, 5)))
    if rng.random() < 0.3:  # a strip of tarmac in front, as in many street scenes
        c.rectangle((x0, y0 + h, x0 + w, min(size, y0 + h + size * 0.05)), fill=_jitter(rng, (75, 75, 80)),
                    evidence=False)


def _street(c, rng, size):
    x0, y0, w, h = _box(rng, size, (0.6, 1.0))
    vanish = x0 + w * rng.uniform(0.35, 0.65)
    top_w = w * rng.uniform(0.08, 0.2)
    kerb = _jitter(rng, (175, 170, 165), 12)
    c.polygon([(x0 - w * 0.06, y0 + h), (x0 + w * 1.06, y0 + h), (vanish + top_w * 0.7, y0),
               (vanish - top_w * 0.7, y0)], fill=kerb)  # pavements on both sides
    road = [(x0, y0 + h), (x0 + w, y0 + h), (vanish + top_w / 2, y0), (vanish - top_w / 2, y0)]
    c.polygon(road, fill=_jitter(rng, (70, 70, 75)))
    line = _jitter(rng, (235, 225, 120) if rng.random() < 0.5 else (240, 240, 240), 10)
    centre_bottom = x0 + w / 2
    for f0 in np.arange(0.05, 0.95, 0.2):  # dashed centre line converging to the vanishing point
        f1 = f0 + 0.1
        p0 = (centre_bottom + (vanish - centre_bottom) * f0, y0 + h - h * f0)
        p1 = (centre_bottom + (vanish - centre_bottom) * f1, y0 + h - h * f1)
        c.line([p0, p1], fill=line, width=max(1, int(size * 0.012 * (1 - f0))))
    if rng.random() < 0.5:  # facades along the road: the buildings/street confusion of the real data
        side = w * 0.25
        _facades(c, rng, x0 - side * 0.2, y0 + h * 0.55, side, h * 0.4, 2, evidence=False)


def _forest(c, rng, size):
    x0, y0, w, h = _box(rng, size, (0.5, 0.9))
    for _ in range(rng.integers(6, 13)):
        tx = rng.uniform(x0, x0 + w)
        th = h * rng.uniform(0.5, 1.0)
        tw = th * rng.uniform(0.35, 0.55)
        base = y0 + h * rng.uniform(0.85, 1.0)
        trunk_w = max(1.5, tw * 0.12)
        c.rectangle((tx - trunk_w, base - th * 0.25, tx + trunk_w, base), fill=_jitter(rng, (90, 60, 35)))
        green = _jitter(rng, [(35, 95, 45), (55, 120, 50), (25, 75, 40)][rng.integers(3)])
        if rng.random() < 0.6:
            c.polygon([(tx - tw / 2, base - th * 0.2), (tx + tw / 2, base - th * 0.2), (tx, base - th)], fill=green)
        else:
            c.ellipse((tx - tw / 2, base - th, tx + tw / 2, base - th * 0.2), fill=green)


def _rock_peaks(c, rng, x0, y0, w, h, snow_cap: float):
    """Grey triangular peaks; `snow_cap` is the fraction of each peak's height that is snow."""
    for _ in range(rng.integers(1, 4)):
        px = rng.uniform(x0 + w * 0.15, x0 + w * 0.85)
        ph = h * rng.uniform(0.6, 1.0)
        half = w * rng.uniform(0.3, 0.55)
        base = y0 + h
        rock = _jitter(rng, [(115, 110, 110), (120, 100, 85), (100, 100, 120)][rng.integers(3)])
        left, right = max(x0, px - half), min(x0 + w, px + half)
        c.polygon([(left, base), (right, base), (px, base - ph)], fill=rock)
        if snow_cap > 0:
            sl = (px - left) * snow_cap
            sr = (right - px) * snow_cap
            c.polygon([(px - sl, base - ph * (1 - snow_cap)), (px + sr, base - ph * (1 - snow_cap)), (px, base - ph)],
                      fill=_jitter(rng, (245, 245, 250), 8))


def _mountain(c, rng, size):
    x0, y0, w, h = _box(rng, size, (0.5, 0.9))
    _rock_peaks(c, rng, x0, y0, w, h, snow_cap=rng.uniform(0.0, 0.35))


def _glacier(c, rng, size):
    x0, y0, w, h = _box(rng, size, (0.4, 0.8))
    if rng.random() < 0.4:  # rock behind the ice: the glacier/mountain confusion of the real data
        _rock_peaks(c, rng, x0, y0, w, h * 0.6, snow_cap=0.3)
    top = y0 + h * 0.35
    xs = np.linspace(x0, x0 + w, int(rng.integers(6, 11)))
    ridge = [(x, top + h * rng.uniform(-0.15, 0.15)) for x in xs]
    ice = _jitter(rng, (215, 235, 245), 12)
    c.polygon([(x0, y0 + h)] + ridge + [(x0 + w, y0 + h)], fill=ice)
    crack = _jitter(rng, (120, 170, 205), 15)
    for _ in range(rng.integers(3, 7)):
        cx = rng.uniform(x0 + w * 0.1, x0 + w * 0.9)
        cy = rng.uniform(top + h * 0.2, y0 + h * 0.95)
        c.line([(cx, cy), (cx + rng.uniform(-w, w) * 0.1, cy + h * rng.uniform(0.1, 0.25))], fill=crack,
               width=max(1, int(size * 0.01)))


def _sea(c, rng, size):
    x0, y0, w, h = _box(rng, size, (0.35, 0.7))
    water = _jitter(rng, [(40, 90, 160), (30, 120, 150), (50, 80, 130)][rng.integers(3)], 15)
    c.rectangle((x0, y0, x0 + w, y0 + h), fill=water)
    foam = _jitter(rng, (200, 225, 240), 12)
    for wy in np.arange(y0 + h * 0.1, y0 + h, h * rng.uniform(0.12, 0.22)):
        phase = rng.uniform(0, 2 * np.pi)
        xs = np.linspace(x0, x0 + w, 12)
        pts = [(x, wy + 1.5 * np.sin(phase + x * 0.4)) for x in xs]
        c.line(pts, fill=foam, width=max(1, int(size * 0.01)))


_DRAW = {"buildings": _buildings, "forest": _forest, "glacier": _glacier,
         "mountain": _mountain, "sea": _sea, "street": _street}


def rng_for(seed: int, class_name: str, index: int) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process, which would break reproducibility.
    return np.random.default_rng([seed, zlib.crc32(class_name.encode()), index])


def draw_scene(seed: int, class_name: str, index: int, size: int = 150) -> Scene:
    """Draw image `index` of `class_name`: the same pixels for the same arguments, on any machine."""
    if class_name not in _DRAW:
        raise ValueError(f"unknown sample class {class_name!r}; expected one of {CLASSES}")
    rng = rng_for(seed, class_name, index)
    image = _background(rng, size)
    mask = Image.new("L", (size, size), 0)
    _DRAW[class_name](_Canvas(image, mask), rng, size)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, rng.uniform(3, 10), (size, size, 3))
    return Scene(image=Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), mask=mask)


def write_sample(out_dir: Path | str, seed: int, images_per_class: int, image_size: int = 150,
                 jpeg_quality: int = 90) -> Path:
    """Write `<out_dir>/<class>/<class>_NNNN.jpg` and `<out_dir>/.masks/<class>/<class>_NNNN.png`.

    The folder is built beside `out_dir` and renamed into place, so a killed run leaves no partial sample.
    """
    with atomic_dir(out_dir) as staging:
        jobs = [(name, i) for name in CLASSES for i in range(images_per_class)]
        for name in CLASSES:
            (staging / name).mkdir()
            (staging / MASKS_DIR / name).mkdir(parents=True)
        for name, i in tqdm(jobs, desc="sample", unit="img", mininterval=1.0):
            scene = draw_scene(seed, name, i, image_size)
            stem = f"{name}_{i:04d}"
            scene.image.save(staging / name / f"{stem}.jpg", quality=jpeg_quality)
            scene.mask.save(staging / MASKS_DIR / name / f"{stem}.png", optimize=False)
    return Path(out_dir)
