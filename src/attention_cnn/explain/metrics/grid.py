"""The grid pointing game (Böhle, Fritz & Schiele, "B-cos Networks", CVPR 2022): a localisation score that
needs no ground-truth masks, so every user's own folder gets one.

A mosaic puts test images of different classes side by side: 2 x 2 cells with four or more classes, 1 x 2 with
two or three. Each cell holds an image that the model classifies correctly with a softmax probability of at
least `CONFIDENCE` on its own (evaluate.grid_confidence, 0.9 by default), so that each cell certainly holds evidence for its class and for none of the
others. A method explains each cell's class on the whole mosaic; the score is the share of the map's positive
mass that falls inside that cell, sum(map+ * cell) / sum(map+) (relevance mass with the cell as the mask), on
the positive part of each method's raw map at image size (Explainer.positive), as Böhle et al. score positive
attributions: not on the min-max scaled maps, whose shift by the minimum would spread mass over every cell.
1/cells is no localisation; a constant map, and a map with no positive mass, are read as uniform and score
exactly that.

The unit of the bootstrap and of the paired test is the mosaic (the mean over its cells), not the cell: the
cells of one mosaic share their images, so they are not independent draws.

Heads that fix the input size to img_size (`model.head=flatten`, `model.attention=dense`) cannot take a mosaic
of twice that side; they are left out (see `grid_unsupported`) rather than fed a mosaic shrunk to img_size,
which would halve every image's resolution and score a different task than the other models'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attention_cnn.explain.metrics.pointing import relevance_mass

CONFIDENCE = 0.9  # softmax probability of the true class an image needs to enter a mosaic (the default)


@dataclass(frozen=True)
class Mosaics:
    images: torch.Tensor   # (M * cells, 3, rows * S, cols * S): each mosaic repeated once per cell it explains
    targets: torch.Tensor  # (M * cells,) the class each copy's map explains: the class of its cell
    cells: torch.Tensor    # (M * cells, rows * S, cols * S) uint8, 255 inside the explained cell
    sources: torch.Tensor  # (M, cells) index of each cell's image in the images the mosaics were drawn from
    layout: tuple[int, int]

    @property
    def count(self) -> int:
        return self.sources.shape[0]

    @property
    def per_mosaic(self) -> int:
        return self.layout[0] * self.layout[1]


def layout_for(num_classes: int) -> tuple[int, int]:
    """(rows, cols): 2 x 2 with four or more classes, 1 x 2 with two or three."""
    return (2, 2) if num_classes >= 4 else (1, 2)


def grid_unsupported(attention: str, head: str) -> str | None:
    """Why a model cannot play the grid pointing game, in one line, or None when it can."""
    if head == "flatten" or attention == "dense":
        what = "model.head=flatten" if head == "flatten" else "model.attention=dense"
        return (f"grid pointing game skipped: {what} fixes the input to img_size, and a mosaic is twice that "
                f"side (shrinking it would halve each image's resolution, another task)")
    return None


def confident(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float = CONFIDENCE) -> torch.Tensor:
    """(N, K) softmax, (N,) labels -> (N,) bool: correct, with probability >= threshold on the true class."""
    return (probabilities.argmax(dim=1) == labels) & (probabilities.gather(1, labels[:, None])[:, 0] >= threshold)


def build_mosaics(images: torch.Tensor, labels: torch.Tensor, eligible: torch.Tensor, num_classes: int,
                  count: int, seed: int) -> Mosaics | None:
    """Up to `count` mosaics of `images` (N, 3, S, S) whose `eligible` (N,) is True, each cell a different class
    drawn at random, and a random eligible image of it (seeded); None when fewer classes than cells have an
    eligible image. Each mosaic is drawn independently, so an image may recur in other mosaics."""
    rows, cols = layout_for(num_classes)
    cells = rows * cols
    pools = [torch.nonzero(eligible & (labels == k)).flatten().tolist() for k in range(num_classes)]
    ready = [k for k in range(num_classes) if pools[k]]
    if len(ready) < cells or count < 1:
        return None
    rng = np.random.default_rng(seed)
    sources = []
    for _ in range(count):
        classes = rng.choice(ready, size=cells, replace=False)
        sources.append([pools[k][int(rng.integers(len(pools[k])))] for k in classes])
    sources_t = torch.tensor(sources, dtype=torch.long)                      # (M, cells)
    S = images.shape[-1]
    tiles = images[sources_t.flatten()].view(count, rows, cols, *images.shape[1:])  # (M, rows, cols, 3, S, S)
    mosaic = tiles.permute(0, 3, 1, 4, 2, 5).reshape(count, images.shape[1], rows * S, cols * S)
    cell_masks = torch.zeros(cells, rows * S, cols * S, dtype=torch.uint8)
    for c in range(cells):
        r, q = divmod(c, cols)
        cell_masks[c, r * S:(r + 1) * S, q * S:(q + 1) * S] = 255
    return Mosaics(images=mosaic.repeat_interleave(cells, dim=0),
                   targets=labels[sources_t.flatten()],
                   cells=cell_masks.repeat(count, 1, 1),
                   sources=sources_t, layout=(rows, cols))


def grid_scores(maps: torch.Tensor, mosaics: Mosaics) -> torch.Tensor:
    """(M * cells, H, W) maps >= 0 (negative values count as 0), one per cell in `mosaics` order -> (M,) mean
    in-cell share of the mass per mosaic."""
    shares = relevance_mass(maps.float().cpu(), mosaics.cells)              # (M * cells,)
    return shares.view(mosaics.count, mosaics.per_mosaic).mean(dim=1)
