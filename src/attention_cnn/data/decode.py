"""Decoding one image file: bytes -> blake2b digest -> Pillow (JPEG draft, EXIF orientation, mode -> RGB)
-> resize by a policy -> uint8 (3, S, S); and the one process-pool map that prepare and predict decode with.

A file that cannot be decoded gives a `Decoded` with its reason in `error`, never an exception: one bad file
in 14k must not stop a run. Limits (documented in the README):
- MAX_FILE_BYTES: a file is read only up to this size; a bigger one is skipped with its size as the reason.
- MAX_IMAGE_PIXELS: Pillow's decompression-bomb guard stays on, with this bound instead of Pillow's 89 MP, so
  real photos up to 200 megapixels are accepted (JPEG draft decoding reads them at 1/2..1/8 scale, so memory
  stays low) and anything larger is refused with the reason in the report.
"""

from __future__ import annotations

import functools
import hashlib
import io
import multiprocessing
import os
import stat
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError
from tqdm import tqdm

MAX_FILE_BYTES = 256 * 2**20           # 256 MiB: a 200 MP JPEG is well under; bigger is not a photo
MAX_IMAGE_PIXELS = 200_000_000         # 200 megapixels
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow refuses above 2x and warns above 1x; we refuse both

ALPHA_BACKGROUND = (255, 255, 255)     # transparent pixels become white, as a viewer shows them
PAD_FILL = (0, 0, 0)                   # the bars around a padded image
# Downscaling: Pillow's BILINEAR is antialiased (its support widens with the scale factor, so shrinking
# averages every source pixel), the same filter as torchvision's Resize(antialias=True). reducing_gap=3 first
# box-reduces by whole factors while the image stays >= 3x the target: cheap on big photos, and per Pillow's
# docs indistinguishable from the full filter. JPEGs arrive shrunk by draft (to within 2x of the target unless
# over 16x it), where BILINEAR costs less than LANCZOS with no visible difference at these sizes.
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0
# Masks use BILINEAR then a threshold: same geometry as the image, smoother edges than NEAREST, and the
# result stays binary (0 or 255).
MASK_RESAMPLE = Image.Resampling.BILINEAR
MASK_THRESHOLD = 128
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


@dataclass(frozen=True)
class Placement:
    """Where the source image lands in the S x S output, for one resize policy."""
    box: tuple[float, float, float, float]  # region of the source used, as fractions of its width and height
    size: tuple[int, int]                   # (w, h) that region is resized to
    offset: tuple[int, int]                 # its top-left corner in the output (non-zero only for pad)


def placement(width: int, height: int, img_size: int, policy: str) -> Placement:
    """stretch: the whole image squashed to a square (as the seed); center_crop: the central square, scaled;
    pad: the whole image scaled so its long side fits, centred on PAD_FILL bars."""
    square = (img_size, img_size)
    if policy == "stretch":
        return Placement((0.0, 0.0, 1.0, 1.0), square, (0, 0))
    if policy == "center_crop":
        side = min(width, height)
        fx, fy = side / width, side / height
        return Placement(((1 - fx) / 2, (1 - fy) / 2, (1 + fx) / 2, (1 + fy) / 2), square, (0, 0))
    if policy == "pad":
        scale = img_size / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return Placement((0.0, 0.0, 1.0, 1.0), size, ((img_size - size[0]) // 2, (img_size - size[1]) // 2))
    raise ValueError(f"unknown resize policy {policy!r}")


def fit(image: Image.Image, place: Placement, img_size: int, resample: int, fill) -> Image.Image:
    """Apply a Placement to an image of any size (the box is in fractions, so a draft-reduced JPEG works)."""
    w, h = image.size
    x0, y0, x1, y1 = place.box
    resized = image.resize(place.size, resample, box=(x0 * w, y0 * h, x1 * w, y1 * h), reducing_gap=REDUCING_GAP)
    if place.size == (img_size, img_size):
        return resized
    canvas = Image.new(image.mode, (img_size, img_size), fill)
    canvas.paste(resized, place.offset)
    return canvas


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8-bit by scaling the value range (Pillow's convert("L") would clip at 255).

    Integer data that fits 0..65535 is taken as 16-bit (how Pillow hands over 16-bit PNG and TIFF); float
    data within 0..1 as unit range; anything else is stretched from its own min to max.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))  # (H, W)
    lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if image.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif image.mode != "F" and lo >= 0 and hi <= 65535:
        lo, hi = 0.0, 65535.0
    scaled = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on ALPHA_BACKGROUND, high bit depth scaled to 8 bits.
    Raises ValueError for a mode Pillow cannot convert."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode == "LAB":  # convert("RGB") would copy the L, a, b channels as if they were R, G, B
        return ImageCms.applyTransform(image, _lab_to_srgb())
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


class _Unreadable(Exception):
    """A file that must not be read whole: not a regular file, or over MAX_FILE_BYTES."""


def read_bounded(path: Path | str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES. Opened non-blocking and checked with fstat before
    reading, so a FIFO or device named like an image never hangs or floods the reader."""
    limit = MAX_FILE_BYTES
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb", closefd=True) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable("not a regular file (a FIFO, socket or device): not read")
        # st_size + 1, not limit + 1: Python allocates what it is asked to read, and 256 MiB per file costs
        # more than decoding a small JPEG. A file that grew while read gets read on, up to the limit.
        data = f.read(info.st_size + 1) if info.st_size <= limit else b""
        if len(data) > info.st_size:
            data += f.read(limit + 1 - len(data))
    if info.st_size > limit or len(data) > limit:  # the second: a file that grew while read
        raise _Unreadable(f"{max(info.st_size, len(data)) / 2**20:.0f} MiB, larger than MAX_FILE_BYTES "
                          f"({limit // 2**20} MiB): not read")
    return data


@dataclass
class _Opened:
    image: Image.Image          # upright, pixels loaded; smaller than full_size when JPEG draft kicked in
    full_size: tuple[int, int]  # (w, h) upright at full resolution: geometry and masks refer to this


def _open_oriented(data: bytes, img_size: int) -> _Opened:
    """Decode `data` and turn it upright (EXIF orientation)."""
    with warnings.catch_warnings():
        # Pillow raises DecompressionBombError above 2 x MAX_IMAGE_PIXELS but only warns above 1 x; refuse both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        # JPEG only (a no-op elsewhere): libjpeg decodes at 1/2, 1/4 or 1/8 scale straight from the DCT
        # coefficients, never below img_size on either side, so every policy still downscales afterwards.
        image.draft(None, (img_size, img_size))
        ImageOps.exif_transpose(image, in_place=True)  # loads the pixels (the first frame of GIF/WebP/TIFF)
    return _Opened(image, (height, width) if orientation in (5, 6, 7, 8) else (width, height))  # 5-8 turn 90°


@dataclass
class Decoded:
    """One source file after decoding; `error` says why it was skipped."""
    digest: str | None = None          # blake2b of the file's bytes, for the duplicate check
    pixels: np.ndarray | None = None   # (3, S, S) uint8
    mask: np.ndarray | None = None     # (S, S) uint8, 0 or 255
    error: str | None = None
    mask_error: str | None = None


def _decode_mask(path: Path, full_size: tuple[int, int], place: Placement, img_size: int) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            mask = Image.open(path)
            mask.load()
    except Exception as exc:  # Pillow raises many types on bad files; any of them means "no usable mask"
        return Decoded(mask_error=f"cannot decode the mask ({type(exc).__name__}: {exc})")
    if mask.size != full_size:
        return Decoded(mask_error=f"mask is {mask.size[0]}x{mask.size[1]}, the image {full_size[0]}x{full_size[1]}")
    if mask.mode in HIGH_BIT_DEPTH_MODES:
        mask = _high_bit_depth_to_l(mask)
    resized = np.asarray(fit(mask.convert("L"), place, img_size, MASK_RESAMPLE, 0))
    return Decoded(mask=np.where(resized >= MASK_THRESHOLD, 255, 0).astype(np.uint8))


def decode_image(path: Path | str, img_size: int, policy: str, mask_path: Path | str | None = None) -> Decoded:
    """Read, hash, decode, orient, convert and resize one image file (and its mask, if given)."""
    try:
        data = read_bounded(path)
    except OSError as exc:
        return Decoded(error=f"cannot read the file ({exc.strerror or exc})")
    except _Unreadable as exc:
        return Decoded(error=str(exc))
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if not data:
        return Decoded(digest=digest, error="empty file (0 bytes)")
    try:
        opened = _open_oriented(data, img_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Decoded(digest=digest, error=f"refused by Pillow's decompression-bomb guard: {exc}")
    except UnidentifiedImageError:
        return Decoded(digest=digest, error="not an image Pillow can identify (wrong extension or corrupt header)")
    except Exception as exc:  # Pillow's format plugins raise OSError, SyntaxError, ValueError, struct.error,
        # EOFError, ... on malformed input; only Pillow runs in the try, so any of them means "cannot decode"
        return Decoded(digest=digest, error=f"cannot decode ({type(exc).__name__}: {exc})")
    try:
        rgb = pil_to_rgb(opened.image)
    except ValueError as exc:
        return Decoded(digest=digest, error=f"unsupported image mode {opened.image.mode!r} ({exc})")
    place = placement(opened.full_size[0], opened.full_size[1], img_size, policy)
    pixels = np.asarray(fit(rgb, place, img_size, RESAMPLE, PAD_FILL)).transpose(2, 0, 1).copy()  # (3, S, S)
    result = Decoded(digest=digest, pixels=pixels)
    if mask_path is not None:
        mask = _decode_mask(Path(mask_path), opened.full_size, place, img_size)
        result.mask, result.mask_error = mask.mask, mask.mask_error
    return result


def resolve_workers(workers: int) -> int:
    """data.workers: 0 means one process per core this process may run on."""
    if workers > 0:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)



T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str, progress: bool) -> Iterator[R]:
    """fn over items, in order, in `workers` processes (1: in this one), with a progress bar.

    fork on Linux: workers start in milliseconds and inherit the imported modules (spawn would re-import torch
    in each). `fn` must run Pillow and numpy only, never torch. The executor forks every worker on the first
    submit, i.e. inside map() and before tqdm starts its monitor thread, so no thread is forked. Chunks of up
    to 32 items amortise the inter-process round trip.
    """
    bar = functools.partial(tqdm, total=len(items), desc=desc, unit="img", disable=not progress, smoothing=0.1)
    if workers <= 1:
        with bar() as progress_bar:
            for result in map(fn, items):
                progress_bar.update()
                yield result
        return
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = pool.map(fn, items, chunksize=chunksize)
        with bar() as progress_bar:
            for result in results:
                progress_bar.update()
                yield result
