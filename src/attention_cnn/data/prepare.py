"""The prepare stage: decode a real image folder once into resized train/val/test tensors.

`data.source` may hold one of three layouts, detected from its top-level folders (discover.py):
    class_folders  <class>/<images>                    val and test are drawn per class by the fractions
    train_test     train/<class>/..., test/<class>/... test as given, val carved out of train per class
                   (an optional val/ folder is used as given instead)
    intel          seg_train/seg_train/<class>, seg_test/seg_test/<class>, seg_pred/seg_pred/*.jpg
                   as the Intel Image Classification download unpacks; seg_pred is unlabelled and unused
Class folders may nest sub-folders. Hidden files and folders (and zip's __MACOSX), non-regular files and
symlinks back into the source are never read; other files without an image extension are ignored and listed
in the report. Every image file is decoded exactly once, in parallel worker processes (decode.py). A file that
cannot be decoded is skipped and listed with its reason; the run fails only on errors the user must fix
(UserError). Splits: split.py.

The output folder holds train.pt, val.pt, test.pt (format: prepared.py), report.json and one preview PNG
per split. It is built in a temporary folder next to it and renamed into place, so a failed run never
leaves partial outputs. Memory does not grow with the number of images: see `prepare`.

Ground-truth masks: the mask of `<source>/<rel>.<ext>` is `<source>/.masks/<rel without ext>.png`. They
get the same geometry as their image and are kept only when every kept image has one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from attention_cnn.atomic import Owned, atomic_dir, check_output_dir
from attention_cnn.data.decode import decode_image, parallel_map, resolve_workers
from attention_cnn.data.discover import LAYOUT_CLASS_FOLDERS, MASKS_DIR, Discovery, discover, display_name
from attention_cnn.data.prepared import SPLITS, PreparedSplit, Rows, load_split, save_split_streamed
from attention_cnn.data.split import assign_splits, check_readable, find_duplicates, split_counts
from attention_cnn.params import Params

PREVIEW_PER_CLASS = 8
CHUNK_BYTES = 16 * 2**20  # pixels held at once while a split is written; memory does not grow with the data
CONSOLE_LIST = 10  # skipped and ignored files printed on the console; report.json lists them all
# What a previous prepare wrote into its output folder; a folder holding anything else is never replaced.
PREPARED_FILES = Owned(sign="report.json", patterns=("*.pt", "report.json", "preview_*.png"))


# --------------------------------------------------------------------------------------------------------
# Decoding every file, in parallel


@dataclass(frozen=True)
class _Task:
    row: int                # where its pixels (and mask) go in the raw files
    path: str
    mask_path: str | None


@dataclass(frozen=True)
class _RawFiles:
    pixels: Path            # row i = image i, (3, S, S) uint8; rows of skipped files are zero
    masks: Path | None      # row i = mask i, (S, S) uint8, only when some file has a mask path


@dataclass(frozen=True)
class _Outcome:
    """What a worker sends back: its pixels went to the raw files, so only this crosses the process boundary."""
    digest: str | None
    error: str | None
    mask_error: str | None
    has_mask: bool


def _write_row(path: Path, row: int, array: np.ndarray) -> None:
    """Row `row` of a raw file of `array`-sized rows; a short write is retried, so a full disk raises its errno."""
    data, offset = memoryview(np.ascontiguousarray(array)).cast("B"), row * array.nbytes
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    finally:
        os.close(fd)


def _decode_task(task: _Task, img_size: int, policy: str, raw: _RawFiles) -> _Outcome:
    decoded = decode_image(task.path, img_size, policy, task.mask_path)
    if decoded.pixels is not None:
        _write_row(raw.pixels, task.row, decoded.pixels)
    if decoded.mask is not None:
        _write_row(raw.masks, task.row, decoded.mask)
    return _Outcome(decoded.digest, decoded.error, decoded.mask_error, decoded.mask is not None)


@dataclass
class _DecodedSet:
    raw: _RawFiles
    has_mask: np.ndarray        # (N,) bool
    digests: list[str | None]
    errors: list[str | None]
    mask_errors: list[str | None]


def _decode_all(tasks: list[_Task], img_size: int, policy: str, workers: int, progress: bool,
                scratch: Path) -> _DecodedSet:
    """Decode every task; each worker writes its pixels (and mask) straight into raw files in `scratch`, sized
    up front (sparse), and sends back only the outcome. So memory holds a few images however many there are,
    and the main process neither receives nor writes pixels. Ordinary writes, not a memory map: pages written
    through a map would stay in the writer's resident set until it unmaps them."""
    n = len(tasks)
    out = _DecodedSet(raw=_RawFiles(scratch / "images.raw", scratch / "masks.raw" if any(t.mask_path for t in tasks)
                                    else None),
                      has_mask=np.zeros(n, bool), digests=[None] * n, errors=[None] * n, mask_errors=[None] * n)
    for path, row_bytes in ((out.raw.pixels, 3 * img_size ** 2), (out.raw.masks, img_size ** 2)):
        if path is not None:
            with open(path, "wb") as f:
                f.truncate(n * row_bytes)
    decode = functools.partial(_decode_task, img_size=img_size, policy=policy, raw=out.raw)
    results = parallel_map(decode, tasks, min(resolve_workers(workers), n), "prepare: decode", progress)
    with closing(results):  # a failed write (a full disk) ends the progress bar and the workers before the error
        for i, result in enumerate(results):
            out.digests[i], out.errors[i], out.mask_errors[i] = result.digest, result.error, result.mask_error
            out.has_mask[i] = result.has_mask
    return out


def _rows(raw: Path, members: list[int], row_shape: tuple[int, ...], chunk_bytes: int) -> Rows:
    """Rows `members` of a raw file, in that order, read with pread into one reused chunk buffer."""
    row_bytes = int(np.prod(row_shape))
    per_chunk = max(1, chunk_bytes // row_bytes)

    def chunks() -> Iterator[np.ndarray]:
        buffer = np.empty((min(per_chunk, len(members)), *row_shape), np.uint8)
        with open(raw, "rb", buffering=0) as f:
            for start in range(0, len(members), per_chunk):
                batch = members[start:start + per_chunk]
                for row, i in zip(buffer, batch):
                    if os.preadv(f.fileno(), [row], i * row_bytes) != row_bytes:
                        raise RuntimeError(f"{raw}: shorter than the {len(members)} rows decoded into it")
                yield buffer[:len(batch)]  # written out before the next chunk overwrites the buffer

    return Rows((len(members), *row_shape), chunks)


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
    unreadable: list[dict[str, str]]         # {"path", "reason", "class"}: folders that could not be listed
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
        if self.unreadable:
            lost = sorted({e["class"] for e in self.unreadable if "class" in e})
            classes = f" from class{'es' if len(lost) > 1 else ''} {', '.join(repr(c) for c in lost)}" if lost else ""
            line += (f"; WARNING: {len(self.unreadable)} folder{'s' if len(self.unreadable) > 1 else ''} could not "
                     f"be listed, so their images are missing{classes}")
        if self.duplicates_across_splits:
            n = sum(len(group["files"]) for group in self.duplicates_across_splits)
            line += (f"; WARNING: {n} byte-identical files in different splits "
                     f"({len(self.duplicates_across_splits)} groups)")
        if self.skipped or self.unreadable or self.duplicates_across_splits or \
                (self.masks["found"] and not self.masks["used"]):
            line += f" -- details in {self.out_dir}/report.json"
        return "\n".join([line, *self.first_not_read()])

    def first_not_read(self, limit: int = CONSOLE_LIST) -> list[str]:
        """The first `limit` skipped or ignored files with their reasons, as console lines."""
        entries = ([("unreadable", e) for e in self.unreadable] + [("skipped", e) for e in self.skipped]
                   + [("ignored", e) for e in self.ignored])
        lines = [f"  {kind} {entry['path']}: {entry['reason']}"
                 + (f" (class '{entry['class']}' loses them)" if "class" in entry else "")
                 for kind, entry in entries[:limit]]
        if len(entries) > limit:
            lines.append(f"  ... and {len(entries) - limit} more in {self.out_dir}/report.json")
        return lines



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


def _shown(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**entry, "path": display_name(entry["path"])} for entry in entries]


def _report(params: Params, found: Discovery, decoded: _DecodedSet, split_of: dict[int, str], masks_found: bool,
            use_masks: bool, out_dir: Path) -> PrepareReport:
    kept = sorted(split_of)
    counts = split_counts(found, split_of)
    duplicates = find_duplicates(found, decoded.digests, split_of)
    notes = []
    if found.layout != LAYOUT_CLASS_FOLDERS:
        notes.append(f"test split as given in {found.pool_dirs['test']}/; data.test_fraction is not used")
        if "val" in found.pool_dirs:
            notes.append(f"val split as given in {found.pool_dirs['val']}/; data.val_fraction is not used")
    return PrepareReport(
        source=params.data.source, layout=found.layout, classes=[display_name(c) for c in found.classes],
        img_size=params.img_size,
        resize=params.data.resize, seed=params.seed, counts=counts,
        totals={split: sum(per_class.values()) for split, per_class in counts.items()},
        image_files=len(found.images), kept=len(kept),
        skipped=_shown([{"path": found.images[i].rel, "reason": error}
                        for i, error in enumerate(decoded.errors) if error]),
        ignored=_shown(sorted(found.skips.ignored, key=lambda entry: entry["path"])),
        unreadable=_shown(found.skips.unreadable), hidden_ignored=found.skips.hidden,
        unlabelled=found.unlabelled, duplicates_across_splits=duplicates.across_splits,
        duplicate_groups_within_split=duplicates.groups_within_split,
        masks={"found": masks_found, "matched": int(decoded.has_mask[kept].sum()), "used": use_masks,
               "problems": _shown([{"path": found.images[i].rel, "reason": decoded.mask_errors[i]}
                                   for i in kept if decoded.mask_errors[i] is not None])},
        notes=notes, out_dir=out_dir.as_posix())


def _write_splits(build_dir: Path, found: Discovery, decoded: _DecodedSet, split_of: dict[int, str],
                  use_masks: bool, img_size: int, resize: str, chunk_bytes: int) -> None:
    """Each split's file from the decoded raw files, chunk by chunk, and its preview from the written file."""
    for split in SPLITS:
        members = sorted((i for i, s in split_of.items() if s == split),
                         key=lambda i: (found.images[i].label, found.images[i].rel))
        save_split_streamed(
            build_dir, split, images=_rows(decoded.raw.pixels, members, (3, img_size, img_size), chunk_bytes),
            labels=torch.tensor([found.images[i].label for i in members], dtype=torch.int64),
            masks=_rows(decoded.raw.masks, members, (img_size, img_size), chunk_bytes) if use_masks else None,
            files=[display_name(found.images[i].rel) for i in members],
            classes=[display_name(c) for c in found.classes], resize=resize)
        written = load_split(build_dir, split)  # a memory map: the preview reads only the rows it shows
        preview_grid(written).save(build_dir / f"preview_{split}.png", compress_level=1)  # 2x faster than 6
        del written


def prepare(params: Params, out_dir: Path | str = "data/prepared", root: Path | str = ".",
            progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> PrepareReport:
    """Decode params.data.source (relative to `root`) into out_dir: train/val/test.pt, report.json and the
    previews. Raises UserError on input the user must fix, leaving out_dir as it was.

    Everything is built in a hidden folder next to out_dir (same file system, so the final rename is atomic),
    then swapped in; any failure removes the build. Decoded pixels go to a raw file there first, because the
    split of a file is known only once every file is decoded (a file that fails to decode changes its class'
    draw); then each split is copied out of it `chunk_bytes` at a time. So memory stays flat whatever the
    data's size, and the disk holds the decoded pixels twice until the raw file is removed."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, PREPARED_FILES)
    source = params.source_path(root)
    found = discover(source)
    masks_root = source / MASKS_DIR
    tasks = [_Task(i, str(source / img.rel), _mask_path(masks_root, img.rel) if masks_root.is_dir() else None)
             for i, img in enumerate(found.images)]
    with atomic_dir(out_dir, PREPARED_FILES) as build_dir:
        scratch = build_dir / ".decoded"
        scratch.mkdir()
        decoded = _decode_all(tasks, params.img_size, params.data.resize, params.data.workers, progress, scratch)
        check_readable(found, decoded.errors)
        kept = [i for i, error in enumerate(decoded.errors) if error is None]
        split_of = assign_splits(found, kept, params.data.val_fraction, params.data.test_fraction, params.seed,
                                 decoded.digests)
        # Masks are all or nothing: training reads masks[i] for every i, so a partial set is reported, not used.
        use_masks = masks_root.is_dir() and bool(decoded.has_mask[kept].all())
        report = _report(params, found, decoded, split_of, masks_root.is_dir(), use_masks, out_dir)
        _write_splits(build_dir, found, decoded, split_of, use_masks, params.img_size, params.data.resize,
                      chunk_bytes)
        shutil.rmtree(scratch)
        (build_dir / "report.json").write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return report
