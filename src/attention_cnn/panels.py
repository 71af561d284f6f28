"""The seed's feature, done well: where the network looks, before and after its attention mask.

For each drawn image, four panels side by side:
    input | before: features.amax(1), the seed's merged filter | the mask: mask.mean(1) | after: attended.amax(1)
Each map is upsampled bilinearly to the image and overlaid on it, on one colour scale with a colour bar.
Before and after are min-max scaled JOINTLY per image, so what the mask removed shows as a darker "after".
The mask is min-max scaled on its own, per image, and its raw range is written under its panel: drawn as it
is, a `conv` mask (mean over channels, about 0.45-0.55 everywhere) looks flat and an `ltpa` mask (a softmax
that sums to 1) looks black, although both rank the positions clearly. A model without attention
(model.attention=none) has no mask to show, so its figures have three panels.

Used by the visualize stage and by predict. Each figure layout is built once and reused: creating figures and
axes is the slow part, not saving them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from attention_cnn.errors import UserError
from attention_cnn.figures import DPI, image_array
from attention_cnn.inference import forward_batches
from attention_cnn.explain.base import scale_unit, upsample
from attention_cnn.model import AttentionCNN

PANEL_TITLES = ("input", "before (max over channels)", "attention mask (scaled)", "after (max over channels)")
MASK_PANEL = 2  # index of the mask in PANEL_TITLES
PANEL_INCHES = 1.7


@dataclass(frozen=True)
class Panels:
    """Everything the panels need for B images, at image resolution S."""
    images: torch.Tensor       # (B, 3, S, S) uint8
    before: torch.Tensor       # (B, S, S) in [0, 1], scaled jointly with `after`
    mask: torch.Tensor         # (B, S, S) in [0, 1], min-max scaled per image
    mask_range: torch.Tensor   # (B, 2) the mask's raw (min, max) before that scaling
    after: torch.Tensor        # (B, S, S) in [0, 1]
    probs: torch.Tensor        # (B, K) softmax
    predictions: torch.Tensor  # (B,) int64
    confidence: torch.Tensor   # (B,) probability of the prediction


def compute_panels(model: AttentionCNN, images: torch.Tensor, batch_size: int = 256) -> Panels:
    """Run the model on uint8 images (B, 3, S, S) and build the before/mask/after maps, batch by batch."""
    size = images.shape[-1]
    before, mask, mask_range, after, probs = [], [], [], [], []
    for _, out in forward_batches(model, images, batch_size):
        b = upsample(out.features.float().amax(dim=1), size)                        # (b, S, S)
        a = upsample(out.attended.float().amax(dim=1), size)
        both = scale_unit(torch.stack([b, a], dim=1))                                # one scale per image
        before.append(both[:, 0].cpu())
        after.append(both[:, 1].cpu())
        m = upsample(out.mask.float().mean(dim=1), size).clamp(0, 1)               # (b, S, S)
        mask.append(scale_unit(m).cpu())
        mask_range.append(torch.stack([m.flatten(1).amin(1), m.flatten(1).amax(1)], dim=1).cpu())
        probs.append(out.logits.float().softmax(dim=1).cpu())
    probs_all = torch.cat(probs)
    confidence, predictions = probs_all.max(dim=1)
    return Panels(images=images, before=torch.cat(before), mask=torch.cat(mask), mask_range=torch.cat(mask_range),
                  after=torch.cat(after), probs=probs_all, predictions=predictions, confidence=confidence)


def check_colormap(name: str) -> Colormap:
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise UserError(f"colormap {name!r} (visualize.colormap in params.yaml) is not a matplotlib colormap; "
                        f"try jet, viridis, inferno or magma.") from None


class PanelFigure:
    """A reusable figure of `rows` x panels with one shared colour bar; draw rows, save, draw again.
    `mask_panel=False` leaves out the mask (for a model without attention, whose mask is constant)."""

    def __init__(self, rows: int, colormap: str, alpha: float, dpi: int = DPI, mask_panel: bool = True):
        self.cmap = check_colormap(colormap)
        self.alpha, self.dpi, self.rows = alpha, dpi, rows
        self.shown = [p for p in range(len(PANEL_TITLES)) if mask_panel or p != MASK_PANEL]
        columns = len(self.shown)
        # Sizes in inches: a label margin on the left, the panels, the colour bar and its label on the right.
        left, right, top, gap = 0.3, 0.75, 0.7, 0.22
        width = left + columns * PANEL_INCHES + 0.3 + right
        height = top + rows * (PANEL_INCHES + gap)
        self.figure = Figure(figsize=(width, height))
        FigureCanvasAgg(self.figure)
        grid = self.figure.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.08], left=left / width,
                                        right=1 - right / width, bottom=gap / 2 / height, top=1 - top / height,
                                        wspace=0.05, hspace=gap / PANEL_INCHES)
        self.axes, self.artists, self.row_titles = [], [], []
        for r in range(rows):
            row_axes = [self.figure.add_subplot(grid[r, c]) for c in range(columns)]
            for ax, panel in zip(row_axes, self.shown):
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(PANEL_TITLES[panel], fontsize=7)
            self.axes.append(row_axes)
            self.artists.append([ax.imshow(np.zeros((2, 2, 3)), interpolation="nearest") for ax in row_axes])
            # The row's own title (true/pred/confidence) sits on the left, under the column titles.
            self.row_titles.append(row_axes[0].set_ylabel("", fontsize=6, labelpad=2))
        colorbar = self.figure.colorbar(ScalarMappable(Normalize(0, 1), self.cmap),
                                        cax=self.figure.add_subplot(grid[:, columns]))
        colorbar.set_label("min-max scaled per image", fontsize=6)
        colorbar.ax.tick_params(labelsize=6)
        self.title = self.figure.suptitle("", fontsize=8, y=1 - 0.1 / height)

    def overlay(self, rgb: np.ndarray, heat: torch.Tensor) -> np.ndarray:
        colour = self.cmap(heat.numpy())[..., :3]  # (S, S, 3)
        return (1 - self.alpha) * rgb + self.alpha * colour

    def draw_row(self, row: int, panels: Panels, index: int, label: str) -> None:
        """Draw image `index` of `panels` into `row`; `label` goes on the row's left edge."""
        rgb = image_array(panels.images[index])
        pictures = (rgb, self.overlay(rgb, panels.before[index]), self.overlay(rgb, panels.mask[index]),
                    self.overlay(rgb, panels.after[index]))
        for ax, artist, panel in zip(self.axes[row], self.artists[row], self.shown):
            picture = pictures[panel]
            artist.set_data(np.clip(picture, 0, 1))
            artist.set_extent((-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5))
            ax.set_visible(True)
        self.row_titles[row].set_text(label)
        if MASK_PANEL in self.shown:
            low, high = panels.mask_range[index].tolist()
            self.axes[row][self.shown.index(MASK_PANEL)].set_xlabel(f"raw {low:.2f} to {high:.2f}", fontsize=6,
                                                                    labelpad=1)

    def hide_rows_from(self, row: int) -> None:
        for r in range(row, self.rows):
            for ax in self.axes[r]:
                ax.set_visible(False)

    def save(self, path: Path, title: str = "") -> None:
        self.title.set_text(title)
        self.figure.savefig(path, dpi=self.dpi)
