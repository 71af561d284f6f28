"""Drawing basics shared by every figure: file-safe names, prediction labels, uint8 images as arrays, and the
gallery of images with titles (evaluate's most confident mistakes).

matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend).
The attention panels (input | before | mask | after | native, with colour bars) are in panels.py.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 90
STEM_CHARS = 100  # readable part of an output file name: with a prefix and the hash, far below NAME_MAX (255)


def safe_name(text: str) -> str:
    """A file-name-safe version of `text`: ASCII letters, digits, '-', '_' and '.'; the rest -> '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._")
    return name or "image"


def unique_stem(text: str) -> str:
    """A file-name stem for `text` that no other text gets: `text` itself when it is already safe (safe_name)
    and short, else its safe form cut to STEM_CHARS + "~" + a hash of the whole text. "~" is not a safe
    character, so a hashed stem never equals a kept one, and texts that differ (`café` and `caf`, `a/b` and
    `a__b`, two 250-character names alike at the start) get different stems. Names that are not valid UTF-8
    (surrogate-escaped by os.listdir) hash by their original bytes."""
    if safe_name(text) == text and len(text) <= STEM_CHARS:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=5).hexdigest()
    return f"{safe_name(text.replace('/', '__'))[:STEM_CHARS]}~{digest}"


def numbered_name(number: int, file: str) -> str:
    """`NN_<stem>.png` for the number-th figure of `file`: unique by its number, its stem cut to STEM_CHARS so a
    long file name never makes a name the file system refuses."""
    return f"{number:02d}_{safe_name(Path(file).stem)[:STEM_CHARS]}.png"


def image_array(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) uint8 tensor -> (S, S, 3) float array in [0, 1], the layout matplotlib draws."""
    return image.permute(1, 2, 0).float().numpy() / 255.0


def prediction_label(classes: list[str], predicted: int, confidence: float, true: int | None = None) -> str:
    pred = f"pred: {classes[predicted]} ({confidence:.2f})"
    return pred if true is None else f"true: {classes[true]} | {pred}"


def draw_gallery(images: torch.Tensor, titles: list[str], path: Path, header: str, columns: int = 6,
                 dpi: int = DPI) -> None:
    """A grid of uint8 images (M, 3, S, S), each with its title; with M = 0 the image says so instead."""
    count = images.shape[0]
    cols = max(1, min(columns, count))
    rows = max(1, -(-count // cols))
    height = rows * 1.75 + 0.6  # inches: 0.6 for the header above the first row's titles
    figure = Figure(figsize=(max(cols * 1.6, 4.0), height))
    FigureCanvasAgg(figure)
    if count == 0:
        figure.text(0.5, 0.5, "no misclassified test images", ha="center", va="center", fontsize=10)
    for i in range(count):
        ax = figure.add_subplot(rows, cols, i + 1)
        ax.imshow(image_array(images[i]), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(titles[i], fontsize=6)
    figure.suptitle(header, fontsize=8, y=1 - 0.12 / height)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.6 / height, hspace=0.45, wspace=0.08)
    figure.savefig(path, dpi=dpi)
