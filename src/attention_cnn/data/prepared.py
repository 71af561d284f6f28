"""The prepared-split format: what `prepare` writes and what train, evaluate and visualize read.

One `<split>.pt` file per split (train, val, test) in the prepared folder, written with `torch.save` and read
with `torch.load(..., weights_only=True, mmap=True)`, so loading 14k images at 150 px is a memory map, not a
decode. DVC hashes a handful of files instead of thousands.

Each file holds a dict:
    images:  uint8  (N, 3, S, S)  RGB, already resized to img_size S
    labels:  int64  (N,)          index into `classes`
    masks:   uint8  (N, S, S)     ground-truth evidence masks (255 = evidence), or None when the source has none
    files:   list[str]            source path of each image, relative to data.source
    classes: list[str]            sorted class names, the same in every split
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attention_cnn.atomic import atomic_torch_save
from attention_cnn.errors import UserError

SPLITS = ("train", "val", "test")
_KEYS = {"images", "labels", "masks", "files", "classes"}


@dataclass
class PreparedSplit:
    images: torch.Tensor        # (N, 3, S, S) uint8
    labels: torch.Tensor        # (N,) int64
    masks: torch.Tensor | None  # (N, S, S) uint8, or None
    files: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def img_size(self) -> int:
        return self.images.shape[-1]


def split_path(prepared_dir: Path | str, split: str) -> Path:
    return Path(prepared_dir) / f"{split}.pt"


def save_split(prepared_dir: Path | str, split: str, data: PreparedSplit) -> Path:
    """Write one split atomically: a killed run never leaves a half-written file under the final name."""
    return atomic_torch_save({"images": data.images.contiguous(), "labels": data.labels, "masks": data.masks,
                              "files": list(data.files), "classes": list(data.classes)},
                             split_path(prepared_dir, split))


def load_split(prepared_dir: Path | str, split: str) -> PreparedSplit:
    path = split_path(prepared_dir, split)
    if not path.is_file():
        raise UserError(f"{path}: prepared split not found. Run `dvc repro prepare` first.")
    try:
        blob = torch.load(path, weights_only=True, mmap=True)
    except Exception as exc:  # truncated, empty or foreign: torch raises RuntimeError, UnpicklingError, ...
        raise UserError(f"{path}: not a readable prepared split ({type(exc).__name__}; truncated, damaged, or "
                        "written by another program). Re-run `dvc repro prepare` to write it again.") from exc
    if not isinstance(blob, dict) or not _KEYS <= set(blob):
        raise UserError(f"{path}: not a prepared split written by this version of attention_cnn. Re-run "
                        "`dvc repro prepare` to write it again.")
    return PreparedSplit(images=blob["images"], labels=blob["labels"], masks=blob["masks"],
                         files=list(blob["files"]), classes=list(blob["classes"]))
