"""The seed's feature, done well: where the network looks, before and after its attention mask.

For each drawn image, five panels side by side:
    input | before: features.amax(1), the seed's merged filter | the mask: mask.mean(1) | after: attended.amax(1)
    | native: the model's own map of one class (below)
Each map is upsampled bilinearly to the image and overlaid on it. Two colour bars say what the colours mean:
- before and after are the max over channels of the final feature map, min-max scaled JOINTLY per image (one
  scale for the pair), so what the mask removed shows as a darker "after";
- the mask is drawn on its raw scale, 0 to 1, as the sigmoid made it: a `conv` mask of 0.51 to 0.54 looks as
  flat as it is. `ltpa`'s mask is a softmax over positions that sums to 1 (about 1/64 everywhere at 64 px), so
  its raw scale would be black; it alone is stretched to its own range, and its panel and colour bar say so.
The raw range of the mask is written under its panel either way. A model without attention
(model.attention=none) has no mask: before and after are the same map, so its figures show the input and that
feature map, titled as having no attention. Each PNG's Description holds its panel titles.
Every model gets one more panel, the native map: its own evidence for one class (AttentionCNN.class_maps,
positive part, min-max scaled per image), the predicted class unless another is asked for; the panel's title
names the class. The mask says where the model looks, the same for every class; the
native map says what there counts for the named class.

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

PANEL_TITLES = ("input", "before the mask", "attention mask", "after the mask", "native map")
MASK_PANEL = 2  # index of the mask in PANEL_TITLES
NATIVE_PANEL = 4
PANEL_INCHES = 1.7
MASK_BAR_INCHES = 0.75  # the mask's colour bar and its label, right of the feature maps' bar
NO_MASK_PANEL = 1   # for a model without a mask: "before", drawn once under NO_MASK_TITLE
NO_MASK_TITLE = "feature map (no attention)"
FEATURE_BAR_LABEL = ("before and after: max over channels, one scale\nper image; native map: the class's evidence,"
                     "\nmin-max scaled per image")
NO_MASK_BAR_LABEL = ("feature map: max over channels (model.attention\nnone: no mask); native map: the class's "
                     "evidence;\neach min-max scaled per image")
MASK_BAR_LABEL = {False: "attention mask, raw value\n(mean over channels)",
                  True: "attention mask, STRETCHED to\neach image's range (under it)"}
BAR_FONT = 5.5
STRETCHED_VARIANTS = ("ltpa",)  # masks that sum to 1 over positions: too small to see on their raw scale


@dataclass(frozen=True)
class Panels:
    """Everything the panels need for B images, at image resolution S."""
    images: torch.Tensor       # (B, 3, S, S) uint8
    before: torch.Tensor       # (B, S, S) in [0, 1], scaled jointly with `after`
    mask: torch.Tensor         # (B, S, S) in [0, 1]: raw, or min-max scaled per image when `mask_stretched`
    mask_range: torch.Tensor   # (B, 2) the mask's raw (min, max)
    mask_stretched: bool       # True for the STRETCHED_VARIANTS
    after: torch.Tensor        # (B, S, S) in [0, 1]
    probs: torch.Tensor        # (B, K) softmax
    predictions: torch.Tensor  # (B,) int64
    confidence: torch.Tensor   # (B,) probability of the prediction
    native: torch.Tensor         # (B, S, S) in [0, 1]: the native map of native_class
    native_class: torch.Tensor   # (B,) int64: the class each native map explains


EXPLAIN_CHOICES = ("predicted", "runner-up")  # or a class index


def explained_classes(probs: torch.Tensor, explain: str | int) -> torch.Tensor:
    """(B, K) probabilities -> (B,) the class each native map explains: the predicted one, the runner-up (the
    second most probable), or one class index for every image."""
    if explain == "predicted":
        return probs.argmax(dim=1)
    if explain == "runner-up":
        return probs.topk(2, dim=1).indices[:, 1]
    return torch.full((probs.shape[0],), int(explain), dtype=torch.long)


def native_maps(model: AttentionCNN, attended: torch.Tensor, classes: torch.Tensor, size: int) -> torch.Tensor:
    """The native map of `classes` (B,) from the forward pass's attended map: positive part, upsampled to the
    image, min-max scaled per image (B, S, S), as the evaluate stage scores it."""
    maps = model.class_maps(attended.float())[torch.arange(classes.shape[0]), classes.to(attended.device)]
    return scale_unit(upsample(maps.clamp_min(0), size))


def compute_panels(model: AttentionCNN, images: torch.Tensor, batch_size: int = 256,
                   explain: str | int = "predicted") -> Panels:
    """Run the model on uint8 images (B, 3, S, S) and build the before/mask/after maps, batch by batch, and the
    native map of the class `explain` names (EXPLAIN_CHOICES or a class index)."""
    size = images.shape[-1]
    stretched = model.params.attention in STRETCHED_VARIANTS
    before, mask, mask_range, after, probs, natives, native_class = [], [], [], [], [], [], []
    for _, out in forward_batches(model, images, batch_size):
        b = upsample(out.features.float().amax(dim=1), size)                        # (b, S, S)
        a = upsample(out.attended.float().amax(dim=1), size)
        both = scale_unit(torch.stack([b, a], dim=1))                                # one scale per image
        before.append(both[:, 0].cpu())
        after.append(both[:, 1].cpu())
        m = upsample(out.mask.float().mean(dim=1), size).clamp(0, 1)               # (b, S, S)
        mask.append((scale_unit(m) if stretched else m).cpu())
        mask_range.append(torch.stack([m.flatten(1).amin(1), m.flatten(1).amax(1)], dim=1).cpu())
        probs.append(out.logits.float().softmax(dim=1).cpu())
        native_class.append(explained_classes(probs[-1], explain))
        natives.append(native_maps(model, out.attended, native_class[-1], size).cpu())
    probs_all = torch.cat(probs)
    confidence, predictions = probs_all.max(dim=1)
    return Panels(images=images, before=torch.cat(before), mask=torch.cat(mask), mask_range=torch.cat(mask_range),
                  mask_stretched=stretched, after=torch.cat(after), probs=probs_all, predictions=predictions,
                  confidence=confidence, native=torch.cat(natives),
                  native_class=torch.cat(native_class))


def class_average_native(model: AttentionCNN, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         batch_size: int = 256) -> dict[int, torch.Tensor]:
    """{class: (S, S)} the mean over that class's images of the native map of the class itself (each map
    min-max scaled per image first, so every image weighs the same); classes without images are left out."""
    size, sums = images.shape[-1], {}
    for start, out in forward_batches(model, images, batch_size):
        batch_labels = labels[start:start + out.logits.shape[0]]
        maps = native_maps(model, out.attended, batch_labels, size).cpu()
        for k in batch_labels.unique().tolist():
            picked = maps[batch_labels == k]
            total, count = sums.get(k, (0, 0))
            sums[k] = (total + picked.sum(dim=0), count + picked.shape[0])
    return {k: total / count for k, (total, count) in sorted(sums.items()) if k < num_classes}


def draw_class_averages(path: Path, averages: dict[int, torch.Tensor], classes: list[str], colormap: str,
                        counts: dict[int, int], dpi: int = DPI) -> None:
    """One panel per class: the mean native map of that class over its test images, on one 0-1 colour scale."""
    cmap = check_colormap(colormap)
    n = len(averages)
    width, height = 0.3 + n * PANEL_INCHES + 1.0, PANEL_INCHES + 0.9
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, n + 1, width_ratios=[1] * n + [0.08], left=0.2 / width, right=1 - 0.8 / width,
                               bottom=0.1 / height, top=1 - 0.65 / height, wspace=0.08)
    for column, (k, average) in enumerate(averages.items()):
        ax = figure.add_subplot(grid[0, column])
        ax.set_xticks([]), ax.set_yticks([])
        ax.imshow(average.numpy(), cmap=cmap, norm=Normalize(0, 1), interpolation="nearest")
        ax.set_title(f"{classes[k]}\n({counts[k]} images)", fontsize=7)
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=figure.add_subplot(grid[0, n]))
    bar.set_label("mean native map\n(each min-max scaled)", fontsize=BAR_FONT)
    bar.ax.tick_params(labelsize=6)
    figure.suptitle("native map of each class, averaged over its test images: where the model finds that class",
                    fontsize=8)
    figure.savefig(path, dpi=dpi)


def check_colormap(name: str) -> Colormap:
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise UserError(f"colormap {name!r} (visualize.colormap in params.yaml) is not a matplotlib colormap; "
                        f"try jet, viridis, inferno or magma.") from None


class PanelFigure:
    """A reusable figure of `rows` x panels with its colour bars (the feature maps', the mask's); draw rows, save,
    draw again.
    `mask_panel=False`: a model without attention, whose mask is constant and whose "after" is its "before":
    the input and the feature map only. The last panel is the native map, titled with the class it explains."""

    def __init__(self, rows: int, colormap: str, alpha: float, dpi: int = DPI, mask_panel: bool = True,
                 classes: list[str] | None = None):
        self.cmap = check_colormap(colormap)
        self.alpha, self.dpi, self.rows, self.classes = alpha, dpi, rows, classes
        self.shown = list(range(len(PANEL_TITLES))) if mask_panel else [0, NO_MASK_PANEL, NATIVE_PANEL]
        self.titles = [NO_MASK_TITLE if not mask_panel and p == NO_MASK_PANEL else PANEL_TITLES[p] for p in self.shown]
        columns = len(self.shown)
        # Sizes in inches: a label margin on the left, the panels, the colour bar and its label on the right.
        left, right, top, gap = 0.3, 0.75 + (MASK_BAR_INCHES if mask_panel else 0), 0.7, 0.22
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
            for ax, title in zip(row_axes, self.titles):
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=7)
            self.axes.append(row_axes)
            self.artists.append([ax.imshow(np.zeros((2, 2, 3)), interpolation="nearest") for ax in row_axes])
            # The row's own title (true/pred/confidence) sits on the left, under the column titles.
            self.row_titles.append(row_axes[0].set_ylabel("", fontsize=6, labelpad=2))
        self.bars = [self._colour_bar(self.figure.add_subplot(grid[:, columns]),
                                      FEATURE_BAR_LABEL if mask_panel else NO_MASK_BAR_LABEL)]
        if mask_panel:  # the mask's own bar, beside the first: its scale is not the feature maps'
            box = self.bars[0].ax.get_position()
            self.bars.append(self._colour_bar(self.figure.add_axes(
                (box.x1 + MASK_BAR_INCHES / width, box.y0, box.width, box.height)), MASK_BAR_LABEL[False]))
        self.title = self.figure.suptitle("", fontsize=8, y=1 - 0.1 / height)

    def _colour_bar(self, cax, label: str):
        bar = self.figure.colorbar(ScalarMappable(Normalize(0, 1), self.cmap), cax=cax)
        bar.set_label(label, fontsize=BAR_FONT)
        bar.ax.tick_params(labelsize=6)
        return bar

    def overlay(self, rgb: np.ndarray, heat: torch.Tensor) -> np.ndarray:
        colour = self.cmap(heat.numpy())[..., :3]  # (S, S, 3)
        return (1 - self.alpha) * rgb + self.alpha * colour

    def draw_row(self, row: int, panels: Panels, index: int, label: str) -> None:
        """Draw image `index` of `panels` into `row`; `label` goes on the row's left edge."""
        rgb = image_array(panels.images[index])
        pictures = (rgb, self.overlay(rgb, panels.before[index]), self.overlay(rgb, panels.mask[index]),
                    self.overlay(rgb, panels.after[index]),
                    self.overlay(rgb, panels.native[index]))
        for ax, artist, panel in zip(self.axes[row], self.artists[row], self.shown):
            picture = pictures[panel]
            artist.set_data(np.clip(picture, 0, 1))
            artist.set_extent((-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5))
            ax.set_visible(True)
        self.row_titles[row].set_text(label)
        k = int(panels.native_class[index])
        name = self.classes[k] if self.classes is not None else str(k)
        self.axes[row][-1].set_title(f"native map: {name}", fontsize=7)
        if MASK_PANEL in self.shown:
            low, high = panels.mask_range[index].tolist()
            digits = 2 if high >= 0.01 else 4  # an ltpa mask's values are near 1/positions
            mask_ax = self.axes[row][self.shown.index(MASK_PANEL)]
            mask_ax.set_xlabel(f"raw {low:.{digits}f} to {high:.{digits}f}", fontsize=6, labelpad=1)
            self.bars[1].set_label(MASK_BAR_LABEL[panels.mask_stretched], fontsize=BAR_FONT)
            if row == 0:
                self.titles[MASK_PANEL] = PANEL_TITLES[MASK_PANEL] + (" (STRETCHED)" if panels.mask_stretched else "")
                mask_ax.set_title(self.titles[MASK_PANEL], fontsize=7)

    def hide_rows_from(self, row: int) -> None:
        for r in range(row, self.rows):
            for ax in self.axes[r]:
                ax.set_visible(False)

    def save(self, path: Path, title: str = "") -> None:
        self.title.set_text(title)
        self.figure.savefig(path, dpi=self.dpi, metadata={"Description": "panels: " + " | ".join(self.titles)})
