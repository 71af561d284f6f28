"""The visualize stage: before/after attention figures of test images (round-robin over the classes) and one
grid per class, in output/visualize/. The panels themselves are drawn by panels.py. Each figure adds the native
map of the predicted class, and native_per_class.png draws each class's native map averaged over its test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attention_cnn.atomic import Owned, atomic_dir, check_output_dir
from attention_cnn.data.prepared import load_split
from attention_cnn.figures import numbered_name, prediction_label, unique_stem
from attention_cnn.inference import check_model_matches, load_for_inference, spread_over_classes
from attention_cnn.panels import PanelFigure, class_average_native, compute_panels, draw_class_averages
from attention_cnn.params import Params

# What visualize writes into --out (NN_<name>.png, grid_<class>.png); a folder holding anything else is refused.
FIGURE_FILES = Owned(patterns=("[0-9][0-9]*_*.png", "grid_*.png", "native_per_class.png"))
NATIVE_AVERAGES = "native_per_class.png"


@dataclass(frozen=True)
class VisualizeResult:
    image_files: list[Path]  # one figure per image, under the final out_dir
    grid_files: list[Path]   # one grid per class
    native_file: Path        # the class averages of the native map


def visualize(params: Params, prepared_dir: Path | str, model_path: Path | str, out_dir: Path | str,
              batch_size: int = 256) -> VisualizeResult:
    """Draw `visualize.num_images` test images (round-robin over the classes) and one grid per class."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, FIGURE_FILES)  # before computing
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
        mask_panel = trained.model.learns_mask
        figure_kw = {"mask_panel": mask_panel, "classes": test.classes}
        single = PanelFigure(1, vis.colormap, vis.alpha, **figure_kw)
        for n, index in enumerate(chosen, start=1):
            name = numbered_name(n, test.files[index])
            single.draw_row(0, panels, position[index], "")
            single.save(tmp / name, title=label(index))
            image_names.append(name)
        grid = PanelFigure(vis.per_class, vis.colormap, vis.alpha, **figure_kw)
        for k, indices in per_class.items():
            if not indices:
                continue
            for row, index in enumerate(indices):
                grid.draw_row(row, panels, position[index], label(index).replace(" | ", "\n"))
            grid.hide_rows_from(len(indices))
            name = f"grid_{unique_stem(test.classes[k])}.png"  # unique, as class names are
            grid.save(tmp / name, title=f"class {test.classes[k]}: {len(indices)} test images")
            grid_names.append(name)
        averages = class_average_native(trained.model, test.images, test.labels, len(test.classes), batch_size)
        counts = {k: int((test.labels == k).sum()) for k in averages}
        draw_class_averages(tmp / NATIVE_AVERAGES, averages, test.classes, vis.colormap, counts)
    return VisualizeResult(image_files=[out_dir / n for n in image_names],
                           grid_files=[out_dir / n for n in grid_names],
                           native_file=out_dir / NATIVE_AVERAGES)
