"""One figure per test image: the input, then each method's map, on one colour scale with one colour bar.

The maps are drawn as they are, not blended into the image, so the colour bar reads true: a colour is a map
value, and every method's map is min-max scaled per image to [0, 1] (1 = ranked most important), which is what
every score ranks. The figure is built once and redrawn per image: creating axes is the slow part.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.patches
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from attention_cnn.figures import DPI, image_array

COLORMAP = "jet"  # the visualize stage's default, so the two stages' figures read alike
PANEL_INCHES = 1.4
TITLES = {"native": "native (class map)", "mask": "learned mask", "attended": "features x mask", "gradcam": "Grad-CAM", "ig": "Integrated Grad.",
          "smoothgrad": "SmoothGrad", "occlusion": "Occlusion", "random": "random (baseline)",
          "edge": "Sobel edges (baseline)"}


def draw_note(path: Path, text: str, dpi: int = DPI) -> None:
    """A small figure that holds one sentence: what stands in for a figure that could not be drawn."""
    figure = Figure(figsize=(6.0, 0.8))
    FigureCanvasAgg(figure)
    figure.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, wrap=True)
    figure.savefig(path, dpi=dpi)


def draw_mosaic(path: Path, mosaics, maps: dict[str, torch.Tensor], classes: list[str], dpi: int = DPI) -> None:
    """The grid pointing game's first mosaic: one row per cell, the mosaic with that cell outlined, then each
    method's map of that cell's class on the whole mosaic (`maps`: method -> (cells, H, W) in [0, 1])."""
    cells = mosaics.per_mosaic
    rows_, cols_ = mosaics.layout
    mosaic = mosaics.images[0]
    H, W = mosaic.shape[-2:]
    panel_w = PANEL_INCHES * max(1.0, W / H)
    columns = len(maps) + 1
    width, height = 0.3 + columns * panel_w + 0.9, 0.6 + cells * (PANEL_INCHES + 0.3)
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(cells, columns + 1, width_ratios=[1] * columns + [0.07], left=0.15 / width,
                               right=1 - 0.75 / width, bottom=0.1 / height, top=1 - 0.55 / height, wspace=0.06,
                               hspace=0.35)
    cmap = matplotlib.colormaps[COLORMAP]
    names = ["mosaic", *[TITLES.get(m, m) for m in maps]]
    for c in range(cells):
        r, q = divmod(c, cols_)
        S = H // rows_
        target = classes[int(mosaics.targets[c])]
        pictures = [image_array(mosaic), *[m[c].float().numpy() for m in maps.values()]]
        for col, picture in enumerate(pictures):
            ax = figure.add_subplot(grid[c, col])
            ax.set_xticks([]), ax.set_yticks([])
            ax.imshow(picture, cmap=cmap, norm=Normalize(0, 1), interpolation="nearest")
            ax.add_patch(matplotlib.patches.Rectangle((q * S - 0.5, r * S - 0.5), S, S, fill=False,
                                                      edgecolor="white", linewidth=1.2))
            ax.set_title(f"{names[col]}: {target}" if col == 0 else names[col], fontsize=6)
    colorbar = figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=figure.add_subplot(grid[:, columns]))
    colorbar.set_label("map value, min-max scaled", fontsize=6)
    colorbar.ax.tick_params(labelsize=6)
    figure.suptitle("grid pointing game: each row's maps explain the outlined cell's class on the whole mosaic",
                    fontsize=8)
    figure.savefig(path, dpi=dpi)


class MethodFigure:
    """input | one panel per method | colour bar, for one image at a time."""

    def __init__(self, methods: list[str], dpi: int = DPI):
        self.dpi = dpi
        self.cmap = matplotlib.colormaps[COLORMAP]
        columns = len(methods) + 1
        width, height = 0.2 + columns * PANEL_INCHES + 0.9, PANEL_INCHES + 0.75
        self.figure = Figure(figsize=(width, height))
        FigureCanvasAgg(self.figure)
        grid = self.figure.add_gridspec(1, columns + 1, width_ratios=[1] * columns + [0.07], left=0.1 / width,
                                        right=1 - 0.75 / width, bottom=0.1 / height, top=1 - 0.65 / height,
                                        wspace=0.06)
        self.axes = [self.figure.add_subplot(grid[0, c]) for c in range(columns)]
        self.artists = []
        for ax, title in zip(self.axes, ["input", *[TITLES.get(m, m) for m in methods]]):
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title, fontsize=7)
            self.artists.append(ax.imshow(np.zeros((2, 2)), cmap=self.cmap, norm=Normalize(0, 1),
                                          interpolation="nearest"))
        colorbar = self.figure.colorbar(ScalarMappable(Normalize(0, 1), self.cmap),
                                        cax=self.figure.add_subplot(grid[0, columns]))
        colorbar.set_label("map value, min-max scaled\nper image and method", fontsize=6)
        colorbar.ax.tick_params(labelsize=6)
        self.title = self.figure.suptitle("", fontsize=8)

    def draw(self, image: torch.Tensor, maps: list[torch.Tensor], title: str, path: Path) -> None:
        """image (3, S, S) uint8 and one (S, S) map in [0, 1] per method -> a PNG at `path`."""
        pictures = [image_array(image), *[m.float().numpy() for m in maps]]
        for artist, picture in zip(self.artists, pictures):
            artist.set_data(picture)
            artist.set_extent((-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5))
        self.title.set_text(title)
        self.figure.savefig(path, dpi=self.dpi)
