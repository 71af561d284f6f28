"""The prepare stage: decode a real image folder once into resized train/val/test tensors.

`data.source` may hold one of three layouts, detected from its top-level folders:
    class_folders  <class>/<images>                    val and test are drawn per class by the fractions
    train_test     train/<class>/..., test/<class>/... test as given, val carved out of train per class
                   (an optional val/ folder is used as given instead)
    intel          seg_train/seg_train/<class>, seg_test/seg_test/<class>, seg_pred/seg_pred/*.jpg
                   as the Intel Image Classification download unpacks; seg_pred is unlabelled and unused
Class folders may nest sub-folders. Hidden files and folders (and zip's __MACOSX) are never read; other
files without an image extension are ignored and listed in the report. Every image file is decoded exactly
once, in parallel worker processes: bytes -> blake2b digest -> Pillow (JPEG draft, EXIF orientation, mode
-> RGB) -> resize by `data.resize` -> uint8 (3, S, S). A file that cannot be decoded is skipped and listed
with its reason; the run fails only on errors the user must fix (UserError).

The output folder holds train.pt, val.pt, test.pt (format: prepared.py), report.json and one preview PNG
per split. It is built in a temporary folder next to it and renamed into place, so a failed run never
leaves partial outputs.

Ground-truth masks: the mask of `<source>/<rel>.<ext>` is `<source>/.masks/<rel without ext>.png`. They
get the same geometry as their image and are kept only when every kept image has one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import sys
import warnings
import zlib
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from attention_cnn.atomic import atomic_dir
from attention_cnn.data.prepared import SPLITS, PreparedSplit, save_split
from attention_cnn.errors import UserError
from attention_cnn.params import Params

LAYOUT_CLASS_FOLDERS = "class_folders"
LAYOUT_TRAIN_TEST = "train_test"
LAYOUT_INTEL = "intel"

MASKS_DIR = ".masks"
IGNORED_FOLDERS = ("__MACOSX",)        # zip metadata: only AppleDouble "._" files, never a class
VAL_FOLDERS = ("val", "valid", "validation")
# Pillow registers these extensions but cannot decode the pixels by itself (stub plugins, a header-only
# MPEG reader, EPS needs Ghostscript), so a file with them is "not an image" here, not a broken image.
NOT_DECODED_BY_PILLOW = ("BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS")

ALPHA_BACKGROUND = (255, 255, 255)     # transparent pixels become white, as a viewer shows them
PAD_FILL = (0, 0, 0)                   # the bars around a padded image
# Downscaling: Pillow's BILINEAR is antialiased (its support widens with the scale factor, so shrinking
# averages every source pixel), the same filter as torchvision's Resize(antialias=True). reducing_gap=3 first
# box-reduces by whole factors while the image stays >= 3x the target: cheap on big photos, and per Pillow's
# docs indistinguishable from the full filter. JPEGs arrive shrunk by draft (to within 2x of the target unless
# over 16x it), where BILINEAR costs 40% of LANCZOS' time with no visible difference at these sizes.
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0
# Masks use BILINEAR then a threshold: same geometry as the image, smoother edges than NEAREST, and the
# result stays binary (0 or 255).
MASK_RESAMPLE = Image.Resampling.BILINEAR
MASK_THRESHOLD = 128
PREVIEW_PER_CLASS = 8
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


# --------------------------------------------------------------------------------------------------------
# Discovery: which files are images, of which class, and which split their folder fixes


@dataclass(frozen=True)
class SourceImage:
    rel: str          # path relative to data.source, "/"-separated
    label: int        # index into Discovery.classes
    pool: str | None  # None: split by the fractions; "train": val is carved out; "val" / "test": as given


@dataclass
class Discovery:
    source: Path
    layout: str
    classes: list[str]
    images: list[SourceImage]
    pool_dirs: dict[str, str]  # pool ("train", "val", "test", or "" for class_folders) -> folder rel to source
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: not image files
    hidden: int = 0                                               # hidden files and folders not read
    unlabelled: dict | None = None                                # Intel's seg_pred, counted, unused


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (".jpg", ...) of every format Pillow can decode by itself."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in NOT_DECODED_BY_PILLOW)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_FOLDERS


def _rel(path: Path, source: Path) -> str:
    return path.relative_to(source).as_posix() or "."


def _subfolders(folder: Path, found: Discovery, image_reason: str) -> dict[str, Path]:
    """Visible sub-folders of `folder` by name. Files at this level are not in any class: listed as ignored."""
    folders = {}
    for entry in sorted(folder.iterdir()):
        if entry.name == MASKS_DIR and folder == found.source:
            continue  # read by prepare(), not ignored
        if _is_hidden(entry.name):
            found.hidden += 1
        elif entry.is_dir():
            folders[entry.name] = entry
        else:
            is_image = entry.suffix.lower() in image_extensions()
            found.ignored.append({"path": _rel(entry, found.source),
                                  "reason": image_reason if is_image else "not an image file"})
    return folders


def _image_files(folder: Path, found: Discovery) -> list[str]:
    """Image files under `folder`, recursively, as sorted paths relative to the source."""
    images, visited, extensions = [], set(), image_extensions()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop: each real folder is read once
            dirnames[:] = []
            continue
        visited.add(real)
        found.hidden += sum(_is_hidden(d) for d in dirnames)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = _rel(Path(dirpath), found.source)  # once per folder: strings below, 14k Paths are slow
        for name in filenames:
            rel = f"{rel_dir}/{name}"
            if _is_hidden(name):
                found.hidden += 1
            elif os.path.splitext(name)[1].lower() in extensions:
                images.append(rel)
            else:
                found.ignored.append({"path": rel, "reason": "not an image file"})
    return sorted(images)


def _unwrap(folder: Path) -> Path:
    """The Intel zip unpacks seg_train/ into seg_train/seg_train/; accept both."""
    inner = folder / folder.name
    return inner if inner.is_dir() else folder


def _layout_hint(source: Path) -> str:
    return (f"Expected {source}/<class>/<images> (one folder per class), {source}/train/<class>/ and "
            f"{source}/test/<class>/, or the Intel download's seg_train/seg_train/<class>/ and "
            "seg_test/seg_test/<class>/.")


def _check_class_count(classes: list[str], where: Path, source: Path) -> None:
    if not classes:
        raise UserError(f"data.source: {where} has no class folders. {_layout_hint(source)}")
    if len(classes) < 2:
        raise UserError(f"data.source: {where} has only one class folder, '{classes[0]}'; a classifier needs "
                        f"at least two. Add a folder per class, or, if the classes are inside "
                        f"{where / classes[0]}, point data.source there.")


def discover(source: Path) -> Discovery:
    """Find the layout, the classes and every image file of `source`. Decodes nothing."""
    if not source.exists():
        raise UserError(f"data.source: {source} does not exist. Set data.source in params.yaml to your image "
                        "folder (absolute, or relative to the repository root).")
    if not source.is_dir():
        raise UserError(f"data.source: {source} is not a folder. Point data.source at a folder of class "
                        "folders.")
    found = Discovery(source=source, layout="", classes=[], images=[], pool_dirs={})
    top = _subfolders(source, found, image_reason="not inside a class folder")

    if "seg_train" in top or "seg_test" in top:
        found.layout = LAYOUT_INTEL
        for name in ("seg_train", "seg_test"):
            if name not in top:
                raise UserError(f"data.source: {source} looks like the Intel download but has no {name}/ "
                                "folder. Unpack the whole archive there.")
        pools = {"train": _unwrap(top["seg_train"]), "test": _unwrap(top["seg_test"])}
        if "seg_pred" in top:
            pred = _unwrap(top["seg_pred"])
            found.unlabelled = {"folder": _rel(pred, source), "images": len(_image_files(pred, found)),
                                "note": "unlabelled images, not used for training or evaluation"}
        expected = ("seg_train", "seg_test", "seg_pred")
    elif "train" in top or "test" in top:
        found.layout = LAYOUT_TRAIN_TEST
        for name in ("train", "test"):
            if name not in top:
                other = "test" if name == "train" else "train"
                raise UserError(f"data.source: {source} has {other}/ but no {name}/. Add {source}/{name}/<class>/ "
                                f"with images, or point data.source at {source}/{other} to split it by "
                                "data.val_fraction and data.test_fraction.")
        pools = {"train": top["train"], "test": top["test"]}
        val_names = [name for name in VAL_FOLDERS if name in top]
        if len(val_names) > 1:
            raise UserError(f"data.source: {source} has several validation folders ({', '.join(val_names)}); "
                            "keep one.")
        if val_names:
            pools["val"] = top[val_names[0]]
        expected = ("train", "test", *val_names)
    else:
        found.layout = LAYOUT_CLASS_FOLDERS
        classes = sorted(top)
        _check_class_count(classes, source, source)
        found.classes = classes
        found.pool_dirs = {"": "."}
        for label, name in enumerate(classes):
            found.images += [SourceImage(rel, label, None) for rel in _image_files(top[name], found)]
        _check_has_files(found)
        return found

    for name, folder in top.items():
        if name not in expected:
            found.ignored.append({"path": _rel(folder, source) + "/",
                                  "reason": f"folder outside the {found.layout} layout"})
    folders = {pool: _subfolders(root, found, image_reason="not inside a class folder")
               for pool, root in pools.items()}
    found.pool_dirs = {pool: _rel(root, source) for pool, root in pools.items()}
    found.classes = sorted(folders["train"])
    _check_class_count(found.classes, pools["train"], source)
    for pool in pools:
        for name in sorted(set(folders[pool]) - set(found.classes)):
            raise UserError(f"data.source: class '{name}' appears in {pools[pool]} but not in {pools['train']}. "
                            f"Add {pools['train'] / name}/ with images, or remove {pools[pool] / name}/.")
    for pool in pools:
        for label, name in enumerate(found.classes):
            if name in folders[pool]:
                found.images += [SourceImage(rel, label, pool) for rel in _image_files(folders[pool][name], found)]
    _check_has_files(found)
    return found


def _class_dir(found: Discovery, label: int, pool: str | None) -> Path:
    return found.source / found.pool_dirs[pool or ""] / found.classes[label]


def _check_has_files(found: Discovery) -> None:
    """Fail before decoding when a class folder (of the training pool) holds no image file at all."""
    counts = np.bincount([img.label for img in found.images if img.pool in (None, "train")],
                         minlength=len(found.classes))
    for label, count in enumerate(counts):
        if count == 0:
            pool = None if found.layout == LAYOUT_CLASS_FOLDERS else "train"
            raise UserError(f"data.source: class '{found.classes[label]}' has no readable image: "
                            f"{_class_dir(found, label, pool)} holds no image file. Add images, or remove "
                            "the folder.")


# --------------------------------------------------------------------------------------------------------
# Decoding one file (runs in the worker processes)


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


def to_rgb(image: Image.Image) -> Image.Image:
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
        data = Path(path).read_bytes()
    except OSError as exc:
        return Decoded(error=f"cannot read the file ({exc.strerror or exc})")
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
        rgb = to_rgb(opened.image)
    except ValueError as exc:
        return Decoded(digest=digest, error=f"unsupported image mode {opened.image.mode!r} ({exc})")
    place = placement(opened.full_size[0], opened.full_size[1], img_size, policy)
    pixels = np.asarray(fit(rgb, place, img_size, RESAMPLE, PAD_FILL)).transpose(2, 0, 1).copy()  # (3, S, S)
    result = Decoded(digest=digest, pixels=pixels)
    if mask_path is not None:
        mask = _decode_mask(Path(mask_path), opened.full_size, place, img_size)
        result.mask, result.mask_error = mask.mask, mask.mask_error
    return result


@dataclass(frozen=True)
class _Task:
    path: str
    mask_path: str | None


def _decode_task(task: _Task, img_size: int, policy: str) -> Decoded:
    return decode_image(task.path, img_size, policy, task.mask_path)


# --------------------------------------------------------------------------------------------------------
# Decoding every file, in parallel


@dataclass
class _DecodedSet:
    pixels: np.ndarray          # (N, 3, S, S) uint8; rows of skipped files stay zero
    masks: np.ndarray | None    # (N, S, S) uint8, allocated only when some file has a mask path
    has_mask: np.ndarray        # (N,) bool
    digests: list[str | None]
    errors: list[str | None]
    mask_errors: list[str | None]


def resolve_workers(workers: int) -> int:
    """data.workers: 0 means one process per core this process may run on."""
    if workers > 0:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decode_all(tasks: list[_Task], img_size: int, policy: str, workers: int, progress: bool) -> _DecodedSet:
    n = len(tasks)
    out = _DecodedSet(pixels=np.zeros((n, 3, img_size, img_size), np.uint8),
                     masks=np.zeros((n, img_size, img_size), np.uint8) if any(t.mask_path for t in tasks) else None,
                     has_mask=np.zeros(n, bool), digests=[None] * n, errors=[None] * n, mask_errors=[None] * n)
    decode = functools.partial(_decode_task, img_size=img_size, policy=policy)
    workers = min(resolve_workers(workers), n)

    def collect(results) -> None:
        with tqdm(total=n, desc="prepare: decode", unit="img", disable=not progress, smoothing=0.1) as bar:
            for i, result in enumerate(results):
                out.digests[i], out.errors[i], out.mask_errors[i] = result.digest, result.error, result.mask_error
                if result.pixels is not None:
                    out.pixels[i] = result.pixels
                if result.mask is not None:
                    out.masks[i] = result.mask
                    out.has_mask[i] = True
                bar.update()

    if workers <= 1:
        collect(map(decode, tasks))
        return out
    # fork on Linux: workers start in milliseconds and inherit the imported modules (spawn would re-import
    # torch in each). They run Pillow and numpy only, never torch. The executor forks every worker on the
    # first submit, i.e. inside map() and before tqdm starts its monitor thread, so no thread is forked.
    # Chunks of up to 32 files amortise the inter-process round trip to well under 1% of a decode.
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    chunksize = max(1, min(32, n // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        collect(pool.map(decode, tasks, chunksize=chunksize))
    return out


# --------------------------------------------------------------------------------------------------------
# Splitting


def _round(x: float) -> int:
    return int(x + 0.5)  # half up; Python's round() would send 2.5 to 2 but 3.5 to 4


def _class_rng(seed: int, name: str) -> np.random.Generator:
    """One RNG per class, keyed by its name: adding a class does not reshuffle the others."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def assign_splits(found: Discovery, kept: list[int], val_fraction: float, test_fraction: float,
                  seed: int, digests: list[str | None]) -> dict[int, str]:
    """Split of every kept image (index into found.images). Deterministic for a seed: each class' files are
    sorted by path, then permuted by the class RNG, so the file system's listing order does not matter.
    Byte-identical files of a class (same entry in `digests`) are drawn as one unit and land in one split:
    a copy of a training image in test would inflate the test accuracy. Without duplicates every unit is one
    file, and the split is the same as drawing files.
    Raises UserError when some class would get no image in some split."""
    pools: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i in kept:
        img = found.images[i]
        pools[(img.label, img.pool or "")].append(i)
    split_of: dict[int, str] = {}
    for (label, pool), members in sorted(pools.items()):
        if pool in ("val", "test"):
            split_of.update({i: pool for i in members})
            continue
        members = sorted(members, key=lambda i: found.images[i].rel)
        n = len(members)
        n_test = _round(n * test_fraction) if pool == "" else 0
        n_val = _round(n * val_fraction)
        n_train = n - n_val - n_test
        name = found.classes[label]
        if n_val < 1 or n_train < 1 or (pool == "" and n_test < 1):
            fractions = (f"data.val_fraction {val_fraction} and data.test_fraction {test_fraction} give "
                         f"{n_val} val, {n_test} test" if pool == "" else
                         f"data.val_fraction {val_fraction} gives {n_val} val")
            raise UserError(f"data.source: class '{name}' has {n} readable image(s) in "
                            f"{_class_dir(found, label, pool or None)}; {fractions} and {n_train} train, but every "
                            f"split needs at least one image of every class. Add images to the class or change "
                            f"data.val_fraction / data.test_fraction in params.yaml.")
        units: dict[str | int, list[int]] = {}  # first file's position keeps the units in path order
        for i in members:
            key = digests[i] if digests[i] is not None else i
            units.setdefault(key, []).append(i)
        groups = list(units.values())
        placed = {"test": 0, "val": 0, "train": 0}
        for k in _class_rng(seed, name).permutation(len(groups)):
            split = "test" if placed["test"] < n_test else "val" if placed["val"] < n_val else "train"
            placed[split] += len(groups[k])
            split_of.update({i: split for i in groups[k]})
        short = [split for split, count in placed.items() if count == 0 and (split != "test" or pool == "")]
        if short:
            distinct = f"{len(groups)} distinct image{'s' if len(groups) > 1 else ''}"
            raise UserError(f"data.source: class '{name}' has {n} readable image(s) in "
                            f"{_class_dir(found, label, pool or None)} but only {distinct} (the others are "
                            f"byte-identical copies, which stay together in one split), so its "
                            f"{' and '.join(short)} split{'s' if len(short) > 1 else ''} would be empty. "
                            f"Add different images to the class.")
    counts = _counts(found, split_of)
    for split in SPLITS:
        for name, count in counts[split].items():
            if count == 0:  # only possible for a split given by a folder
                folder = found.source / found.pool_dirs[split] / name
                raise UserError(f"data.source: class '{name}' has no readable image in {folder}, so its {split} "
                                f"split would be empty. Add images there.")
    return split_of


def _counts(found: Discovery, split_of: dict[int, str]) -> dict[str, dict[str, int]]:
    counts = {split: {name: 0 for name in found.classes} for split in SPLITS}
    for i, split in split_of.items():
        counts[split][found.classes[found.images[i].label]] += 1
    return counts


def _check_readable(found: Discovery, decoded: _DecodedSet) -> None:
    """A class whose training-pool files all failed to decode: name it, with the first reasons."""
    pool_files: dict[int, list[int]] = defaultdict(list)
    for i, img in enumerate(found.images):
        if img.pool in (None, "train"):
            pool_files[img.label].append(i)
    for label, files in sorted(pool_files.items()):
        if all(decoded.errors[i] is not None for i in files):
            reasons = "; ".join(f"{found.images[i].rel}: {decoded.errors[i]}" for i in files[:3])
            more = f" (and {len(files) - 3} more)" if len(files) > 3 else ""
            folder = _class_dir(found, label, None if found.layout == LAYOUT_CLASS_FOLDERS else "train")
            raise UserError(f"data.source: class '{found.classes[label]}' has no readable image: all {len(files)} "
                            f"file(s) in {folder} failed to decode. {reasons}{more}. Replace them with valid images.")


# --------------------------------------------------------------------------------------------------------
# Report, preview and the stage entry point


@dataclass
class PrepareReport:
    """What prepare did; written as report.json. Holds no timings, so identical inputs give identical bytes."""
    source: str                              # data.source as given in params
    layout: str
    classes: list[str]
    img_size: int
    resize: str
    seed: int
    counts: dict[str, dict[str, int]]        # split -> class -> images
    totals: dict[str, int]                   # split -> images
    image_files: int                         # image files found (kept + skipped)
    kept: int
    skipped: list[dict[str, str]]            # {"path", "reason"}: image files that could not be decoded
    ignored: list[dict[str, str]]            # {"path", "reason"}: files and folders that are not images
    hidden_ignored: int                      # hidden files and folders, never read
    unlabelled: dict | None                  # Intel's seg_pred
    duplicates_across_splits: list[dict]     # {"blake2b", "files": [{"path", "split", "class"}]}
    duplicate_groups_within_split: int       # byte-identical files in the same split (no leakage)
    masks: dict                              # {"found", "matched", "used", "problems": [{"path", "reason"}]}
    notes: list[str]
    out_dir: str

    def summary(self) -> str:
        splits = ", ".join(f"{split} {self.totals[split]}" for split in SPLITS)
        line = (f"prepare: {self.kept} images, {len(self.classes)} classes ({self.layout}) from {self.source} -> "
                f"{self.out_dir}: {splits} at {self.img_size}px ({self.resize}); skipped {len(self.skipped)}, "
                f"ignored {len(self.ignored) + self.hidden_ignored}")
        if self.unlabelled:
            line += f", unlabelled {self.unlabelled['images']} in {self.unlabelled['folder']} (unused)"
        if self.masks["found"]:
            line += f", masks {self.masks['matched']}/{self.kept}" + ("" if self.masks["used"] else " (not used)")
        if self.duplicates_across_splits:
            n = sum(len(group["files"]) for group in self.duplicates_across_splits)
            line += (f"; WARNING: {n} byte-identical files in different splits "
                     f"({len(self.duplicates_across_splits)} groups)")
        if self.skipped or self.duplicates_across_splits or (self.masks["found"] and not self.masks["used"]):
            line += f" -- details in {self.out_dir}/report.json"
        return line


@dataclass
class _Duplicates:
    across_splits: list[dict]  # {"blake2b", "files": [{"path", "split", "class"}]}: leakage
    groups_within_split: int   # harmless for evaluation, counted for the record


def _duplicates(found: Discovery, decoded: _DecodedSet, split_of: dict[int, str]) -> _Duplicates:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in sorted(split_of, key=lambda i: found.images[i].rel):
        groups[decoded.digests[i]].append(i)
    across, within = [], 0
    for digest, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        if len({split_of[i] for i in members}) == 1:
            within += 1
            continue
        across.append({"blake2b": digest, "files": [
            {"path": found.images[i].rel, "split": split_of[i], "class": found.classes[found.images[i].label]}
            for i in members]})
    return _Duplicates(across, within)


def preview_grid(split: PreparedSplit, per_class: int = PREVIEW_PER_CLASS) -> Image.Image:
    """One row per class: its name and count, then up to `per_class` images spread over the split."""
    tile = min(max(split.img_size, 48), 128)  # small sizes enlarged (NEAREST, to show the real pixels)
    gap = 4
    # DejaVu Sans (shipped with matplotlib) has the accented and non-Latin letters class names may hold.
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), 12)
    labels = split.labels.numpy()
    counts = np.bincount(labels, minlength=len(split.classes))
    names = [f"{name} ({count})" for name, count in zip(split.classes, counts)]
    columns = max(1, min(per_class, int(counts.max(initial=0))))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(name, font=font) for name in names)) + 2 * gap
    size = (label_w + columns * (tile + gap) + gap, len(names) * (tile + gap) + gap)
    grid = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, name in enumerate(names):
        y = gap + k * (tile + gap)
        draw.text((gap, y + tile // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
        members = np.flatnonzero(labels == k)
        picks = members[np.unique(np.linspace(0, len(members) - 1, min(columns, len(members))).round().astype(int))]
        for j, i in enumerate(picks):
            img = Image.fromarray(split.images[i].permute(1, 2, 0).numpy())  # (S, S, 3)
            resample = Image.Resampling.NEAREST if tile >= split.img_size else Image.Resampling.BOX
            grid.paste(img.resize((tile, tile), resample), (label_w + j * (tile + gap), y))
    return grid


def _mask_path(masks_root: Path, rel: str) -> str | None:
    path = masks_root / Path(rel).with_suffix(".png")
    return str(path) if path.is_file() else None


def _report(params: Params, found: Discovery, decoded: _DecodedSet, split_of: dict[int, str], masks_found: bool,
            use_masks: bool, out_dir: Path) -> PrepareReport:
    kept = sorted(split_of)
    counts = _counts(found, split_of)
    duplicates = _duplicates(found, decoded, split_of)
    notes = []
    if found.layout != LAYOUT_CLASS_FOLDERS:
        notes.append(f"test split as given in {found.pool_dirs['test']}/; data.test_fraction is not used")
        if "val" in found.pool_dirs:
            notes.append(f"val split as given in {found.pool_dirs['val']}/; data.val_fraction is not used")
    return PrepareReport(
        source=params.data.source, layout=found.layout, classes=found.classes, img_size=params.img_size,
        resize=params.data.resize, seed=params.seed, counts=counts,
        totals={split: sum(per_class.values()) for split, per_class in counts.items()},
        image_files=len(found.images), kept=len(kept),
        skipped=[{"path": found.images[i].rel, "reason": error} for i, error in enumerate(decoded.errors) if error],
        ignored=sorted(found.ignored, key=lambda entry: entry["path"]), hidden_ignored=found.hidden,
        unlabelled=found.unlabelled, duplicates_across_splits=duplicates.across_splits,
        duplicate_groups_within_split=duplicates.groups_within_split,
        masks={"found": masks_found, "matched": int(decoded.has_mask[kept].sum()), "used": use_masks,
               "problems": [{"path": found.images[i].rel, "reason": decoded.mask_errors[i]}
                            for i in kept if decoded.mask_errors[i] is not None]},
        notes=notes, out_dir=out_dir.as_posix())


def _write_outputs(out_dir: Path, found: Discovery, decoded: _DecodedSet, split_of: dict[int, str],
                   use_masks: bool, report: PrepareReport) -> None:
    """Build everything in a hidden folder next to out_dir (same file system, so the final rename is atomic),
    then swap it in. Any failure removes the build and leaves out_dir as it was."""
    with atomic_dir(out_dir) as build_dir:
        for split in SPLITS:
            members = sorted((i for i, s in split_of.items() if s == split),
                             key=lambda i: (found.images[i].label, found.images[i].rel))
            data = PreparedSplit(
                images=torch.from_numpy(decoded.pixels[members]),                      # (N, 3, S, S) uint8
                labels=torch.tensor([found.images[i].label for i in members], dtype=torch.int64),
                masks=torch.from_numpy(decoded.masks[members]) if use_masks else None,  # (N, S, S) uint8
                files=[found.images[i].rel for i in members], classes=found.classes)
            save_split(build_dir, split, data)
            preview_grid(data).save(build_dir / f"preview_{split}.png", compress_level=1)  # 2x faster than 6
        (build_dir / "report.json").write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


def prepare(params: Params, out_dir: Path | str = "data/prepared", root: Path | str = ".",
            progress: bool = True) -> PrepareReport:
    """Decode params.data.source (relative to `root`) into out_dir: train/val/test.pt, report.json and the
    previews. Raises UserError on input the user must fix, before anything is written."""
    out_dir = Path(out_dir)
    source = params.source_path(root)
    found = discover(source)
    masks_root = source / MASKS_DIR
    tasks = [_Task(str(source / img.rel), _mask_path(masks_root, img.rel) if masks_root.is_dir() else None)
             for img in found.images]
    decoded = _decode_all(tasks, params.img_size, params.data.resize, params.data.workers, progress)

    _check_readable(found, decoded)
    kept = [i for i, error in enumerate(decoded.errors) if error is None]
    split_of = assign_splits(found, kept, params.data.val_fraction, params.data.test_fraction, params.seed,
                             decoded.digests)
    # Masks are all or nothing: training code reads masks[i] for every i, so a partial set is reported, not used.
    use_masks = masks_root.is_dir() and bool(decoded.has_mask[kept].all())
    report = _report(params, found, decoded, split_of, masks_root.is_dir(), use_masks, out_dir)
    _write_outputs(out_dir, found, decoded, split_of, use_masks, report)
    return report
