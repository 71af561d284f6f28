"""One figure per test image: the input, then each method's map, on one colour scale with one colour bar.

The maps are drawn as they are, not blended into the image, so the colour bar reads true: a colour is a map
value, and every method's map is min-max scaled per image to [0, 1] (1 = ranked most important), which is what
every score ranks. The figure is built once and redrawn per image: creating axes is the slow part.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from attention_cnn.figures import DPI, image_array

COLORMAP = "jet"  # the visualize stage's default, so the two stages' figures read alike
PANEL_INCHES = 1.4
TITLES = {"mask": "learned mask", "attended": "features x mask", "gradcam": "Grad-CAM", "ig": "Integrated Grad.",
          "smoothgrad": "SmoothGrad", "occlusion": "Occlusion", "random": "random (baseline)",
          "edge": "Sobel edges (baseline)"}


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
