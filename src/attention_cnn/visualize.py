"""The seed's feature, done well: where the network looks, before and after its attention mask.

For each drawn image, four panels side by side:
    input | before: features.amax(1), the seed's merged filter | the mask: mask.mean(1) | after: attended.amax(1)
Each map is upsampled bilinearly to the image and overlaid on it, on one colour scale with a colour bar.
Before and after are min-max scaled JOINTLY per image, so what the mask removed shows as a darker "after".
The mask is min-max scaled on its own, per image, and its raw range is written under its panel: drawn as it
is, a `conv` mask (mean over channels, about 0.45-0.55 everywhere) looks flat and an `ltpa` mask (a softmax
that sums to 1) looks black, although both rank the positions clearly.

Also the drawing helpers shared by evaluate (the misclassified gallery) and predict (one figure per image).

matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend), and each figure
layout is built once and reused: creating figures and axes is the slow part, not saving them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from attention_cnn.atomic import Owned, atomic_dir
from attention_cnn.data.prepared import PreparedSplit, load_split
from attention_cnn.errors import UserError
from attention_cnn.maps import scale_unit, upsample
from attention_cnn.model import AttentionCNN, TrainedModel, autocast, load_model
from attention_cnn.params import Params

PANEL_TITLES = ("input", "before (max over channels)", "attention mask (scaled)", "after (max over channels)")
PANEL_INCHES = 1.7
DPI = 90
# What visualize writes into --out (NN_<name>.png, grid_<class>.png); a folder holding anything else is refused.
FIGURE_FILES = Owned(patterns=("[0-9][0-9]*_*.png", "grid_*.png"))


# ----------------------------------------------------------------------------------------------------------
# Output folders and names


def safe_name(text: str) -> str:
    """A file-name-safe version of `text`: ASCII letters, digits, '-', '_' and '.'; the rest -> '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._")
    return name or "image"


# ----------------------------------------------------------------------------------------------------------
# Choosing images and computing the panels


def spread_over_classes(labels: torch.Tensor, count: int) -> list[int]:
    """Indices of `count` images taken round-robin over the classes (first image of each class, then the
    second, ...), each class in index order: deterministic, and every class shows up before any repeats."""
    per_class = [torch.nonzero(labels == k).flatten().tolist() for k in torch.unique(labels).tolist()]
    picked: list[int] = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        for indices in per_class:
            if rank < len(indices) and len(picked) < count:
                picked.append(indices[rank])
    return picked


@dataclass(frozen=True)
class Panels:
    """Everything the four panels need for B images, at image resolution S."""
    images: torch.Tensor       # (B, 3, S, S) uint8
    before: torch.Tensor       # (B, S, S) in [0, 1], scaled jointly with `after`
    mask: torch.Tensor         # (B, S, S) in [0, 1], min-max scaled per image
    mask_range: torch.Tensor   # (B, 2) the mask's raw (min, max) before that scaling
    after: torch.Tensor        # (B, S, S) in [0, 1]
    probs: torch.Tensor        # (B, K) softmax
    predictions: torch.Tensor  # (B,) int64
    confidence: torch.Tensor   # (B,) probability of the prediction


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(model_path: Path | str) -> TrainedModel:
    """Load the model onto the GPU when there is one, else the CPU, in channels_last: faster convolutions on
    CUDA, and on a 2-core CPU too (1.4x measured on inference at 64 px)."""
    trained = load_model(model_path, map_location=inference_device())
    trained.model.to(memory_format=torch.channels_last)
    return trained


def check_model_matches(trained: TrainedModel, split: PreparedSplit, model_path: Path | str,
                        prepared_dir: Path | str) -> None:
    """Refuse to score a model on data with other classes or another image size (a stale model or split)."""
    if split.classes != trained.classes or split.img_size != trained.img_size:
        raise UserError(f"{model_path}: the model was trained on classes {trained.classes} at {trained.img_size} "
                        f"px, but {prepared_dir} holds {split.classes} at {split.img_size} px. Run `dvc repro` to "
                        f"retrain on the prepared data.")


def model_device(model: AttentionCNN) -> torch.device:
    return next(model.parameters()).device


def compute_panels(model: AttentionCNN, images: torch.Tensor, batch_size: int = 256) -> Panels:
    """Run the model on uint8 images (B, 3, S, S) and build the before/mask/after maps, batch by batch."""
    device = model_device(model)
    size = images.shape[-1]
    before, mask, mask_range, after, probs = [], [], [], [], []
    with torch.inference_mode(), autocast(device):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device).float() / 255               # (b, 3, S, S)
            out = model(x)
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


# ----------------------------------------------------------------------------------------------------------
# Drawing


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) uint8 tensor -> (S, S, 3) float array in [0, 1]."""
    return image.permute(1, 2, 0).float().numpy() / 255.0


def check_colormap(name: str) -> Colormap:
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise UserError(f"colormap {name!r} (visualize.colormap in params.yaml) is not a matplotlib colormap; "
                        f"try jet, viridis, inferno or magma.") from None


class PanelFigure:
    """A reusable figure of `rows` x 4 panels with one shared colour bar; draw rows, save, draw again."""

    def __init__(self, rows: int, colormap: str, alpha: float, dpi: int = DPI):
        self.cmap = check_colormap(colormap)
        self.alpha, self.dpi, self.rows = alpha, dpi, rows
        # Sizes in inches: a label margin on the left, 4 panels, the colour bar and its label on the right.
        left, right, top, gap = 0.3, 0.75, 0.7, 0.22
        width = left + 4 * PANEL_INCHES + 0.3 + right
        height = top + rows * (PANEL_INCHES + gap)
        self.figure = Figure(figsize=(width, height))
        FigureCanvasAgg(self.figure)
        grid = self.figure.add_gridspec(rows, 5, width_ratios=[1, 1, 1, 1, 0.08], left=left / width,
                                        right=1 - right / width, bottom=gap / 2 / height, top=1 - top / height,
                                        wspace=0.05, hspace=gap / PANEL_INCHES)
        blank = np.zeros((2, 2, 3))
        self.axes, self.artists, self.row_titles = [], [], []
        for r in range(rows):
            row_axes, row_artists = [], []
            for c in range(4):
                ax = self.figure.add_subplot(grid[r, c])
                ax.set_xticks([]), ax.set_yticks([])
                row_artists.append(ax.imshow(blank, interpolation="nearest"))
                if r == 0:
                    ax.set_title(PANEL_TITLES[c], fontsize=7)
                row_axes.append(ax)
            self.axes.append(row_axes)
            self.artists.append(row_artists)
            # The row's own title (true/pred/confidence) sits on the left, under the column titles.
            self.row_titles.append(row_axes[0].set_ylabel("", fontsize=6, labelpad=2))
        colorbar = self.figure.colorbar(ScalarMappable(Normalize(0, 1), self.cmap),
                                        cax=self.figure.add_subplot(grid[:, 4]))
        colorbar.set_label("min-max scaled per image", fontsize=6)
        colorbar.ax.tick_params(labelsize=6)
        self.title = self.figure.suptitle("", fontsize=8, y=1 - 0.1 / height)

    def overlay(self, rgb: np.ndarray, heat: torch.Tensor) -> np.ndarray:
        colour = self.cmap(heat.numpy())[..., :3]  # (S, S, 3)
        return (1 - self.alpha) * rgb + self.alpha * colour

    def draw_row(self, row: int, panels: Panels, index: int, label: str) -> None:
        """Draw image `index` of `panels` into `row`; `label` goes on the row's left edge."""
        rgb = to_rgb(panels.images[index])
        pictures = (rgb, self.overlay(rgb, panels.before[index]), self.overlay(rgb, panels.mask[index]),
                    self.overlay(rgb, panels.after[index]))
        for ax, artist, picture in zip(self.axes[row], self.artists[row], pictures):
            artist.set_data(np.clip(picture, 0, 1))
            artist.set_extent((-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5))
            ax.set_visible(True)
        self.row_titles[row].set_text(label)
        low, high = panels.mask_range[index].tolist()
        self.axes[row][2].set_xlabel(f"raw {low:.2f} to {high:.2f}", fontsize=6, labelpad=1)

    def hide_rows_from(self, row: int) -> None:
        for r in range(row, self.rows):
            for ax in self.axes[r]:
                ax.set_visible(False)

    def save(self, path: Path, title: str = "") -> None:
        self.title.set_text(title)
        self.figure.savefig(path, dpi=self.dpi)


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
        ax.imshow(to_rgb(images[i]), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(titles[i], fontsize=6)
    figure.suptitle(header, fontsize=8, y=1 - 0.12 / height)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.6 / height, hspace=0.45, wspace=0.08)
    figure.savefig(path, dpi=dpi)


# ----------------------------------------------------------------------------------------------------------
# The visualize stage


@dataclass(frozen=True)
class VisualizeResult:
    image_files: list[Path]  # one figure per image, under the final out_dir
    grid_files: list[Path]   # one grid per class


def visualize(params: Params, prepared_dir: Path | str, model_path: Path | str, out_dir: Path | str,
              batch_size: int = 256) -> VisualizeResult:
    """Draw `visualize.num_images` test images (round-robin over the classes) and one grid per class."""
    out_dir = Path(out_dir)
    trained = load_for_inference(model_path)
    test = load_split(prepared_dir, "test")
    check_model_matches(trained, test, model_path, prepared_dir)
    vis = params.visualize
    chosen = spread_over_classes(test.labels, vis.num_images)
    per_class = {k: torch.nonzero(test.labels == k).flatten()[:vis.per_class].tolist()
                 for k in range(len(test.classes))}
    needed = sorted(set(chosen).union(*per_class.values()))
    position = {index: i for i, index in enumerate(needed)}
    panels = compute_panels(trained.model, test.images[needed], batch_size)

    def label(index: int) -> str:
        i = position[index]
        return prediction_label(test.classes, int(panels.predictions[i]), float(panels.confidence[i]),
                                int(test.labels[index]))

    image_names, grid_names = [], []
    with atomic_dir(out_dir, FIGURE_FILES) as tmp:
        single = PanelFigure(1, vis.colormap, vis.alpha)
        for n, index in enumerate(chosen, start=1):
            name = f"{n:02d}_{safe_name(Path(test.files[index]).stem)}.png"
            single.draw_row(0, panels, position[index], "")
            single.save(tmp / name, title=label(index))
            image_names.append(name)
        grid = PanelFigure(vis.per_class, vis.colormap, vis.alpha)
        for k, indices in per_class.items():
            if not indices:
                continue
            for row, index in enumerate(indices):
                grid.draw_row(row, panels, position[index], label(index).replace(" | ", "\n"))
            grid.hide_rows_from(len(indices))
            name = f"grid_{safe_name(test.classes[k])}.png"
            if name in grid_names:  # two class names that differ only in unsafe characters
                name = f"grid_{k:02d}_{safe_name(test.classes[k])}.png"
            grid.save(tmp / name, title=f"class {test.classes[k]}: {len(indices)} test images")
            grid_names.append(name)
    return VisualizeResult(image_files=[out_dir / n for n in image_names],
                           grid_files=[out_dir / n for n in grid_names])
