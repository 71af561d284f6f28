"""Prediction on any folder of images, labelled or not (e.g. the Intel download's seg_pred): the seed's
`visualize.py --data_folder`, as `attention-cnn predict`.

Every image file under the folder is found by the prepare stage's own walker (data/discover.py: recursive;
hidden, non-regular and symlinked-back files are not read) and decoded by its own decoder (data/decode.py:
EXIF orientation, every mode to RGB, the decompression-bomb guard), resized to the model's img_size by the
policy its training images were prepared with (data.resize, stored in the model file), and classified.
Writes into the --out folder:
    predictions.csv  file, predicted_class, confidence, top1_class, top1_prob, top2_class, top2_prob, ...
                     (one column per value: any class name, even "a:0.9;b", reads back exactly)
    skipped.csv      file, reason: image files that could not be decoded, files that are not images, and
                     folders that could not be listed ("sub/")
    <file>.png       the input | before | mask | after | native figure of each image (panels.py; input | feature
                     map | native for a model without attention), unless figures=False; named by figure_names,
                     unique and short whatever the names and depth of the files; the native panel draws the
                     map of the predicted class, or of the class --explain-class names (runner-up: the second
                     most probable)
Names that are not valid UTF-8 are written with escapes ("\\xff", discover.display_name).
Bad files are reported, never fatal; the run fails (UserError) only when nothing could be predicted.
"""

from __future__ import annotations

import csv
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attention_cnn.atomic import Owned, atomic_dir, check_output_dir
from attention_cnn.data.decode import Decoded, decode_image, parallel_map, resolve_workers
from attention_cnn.data.discover import Skips, display_name, image_extensions, walk_images
from attention_cnn.errors import UserError
from attention_cnn.model import TrainedModel
from attention_cnn.params import VisualizeParams
from attention_cnn.figures import prediction_label, unique_stem
from attention_cnn.inference import load_for_inference
from attention_cnn.panels import EXPLAIN_CHOICES, PanelFigure, check_colormap, compute_panels

DEFAULT_TOP_K = 3          # classes listed per image when --top-k is not given (fewer if the model has fewer)
MIN_FILES_PER_WORKER = 64  # below this a decode process costs more than it saves
# What an earlier predict wrote; an --out holding anything else is refused, never replaced.
PREDICT_FILES = Owned(sign="predictions.csv", patterns=("predictions.csv", "skipped.csv", "*.png"))


@dataclass(frozen=True)
class Skipped:
    file: str    # relative to the images folder, as display_name shows it
    reason: str


@dataclass(frozen=True)
class Prediction:
    file: str                 # relative to the images folder, as display_name shows it
    predicted_class: str
    confidence: float
    top_k: list[tuple[str, float]]  # most probable first


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]
    skipped: list[Skipped]


@dataclass(frozen=True)
class FolderListing:
    images: list[str]      # relative paths of regular files with an image extension, sorted
    not_read: list[Skipped]  # other files, with the reason


def list_folder(folder: Path, exclude: Path | None = None) -> FolderListing:
    """Every image file under `folder`, by the same rules as prepare. `exclude` (the output folder, when it
    lies inside) is not read, so a second run does not classify the first run's figures."""
    try:
        os.scandir(folder).close()  # the folder itself: nothing to predict on, so fatal (a sub-folder is reported)
    except OSError as exc:
        raise UserError(f"--images {folder}: cannot be listed ({exc.strerror or exc}). Give this user read and "
                        f"execute permission on it (chmod u+rx), or choose another folder.") from None
    skips = Skips()
    images = walk_images(folder, skips=skips, exclude=exclude)
    return FolderListing(images=images, not_read=[Skipped(display_name(e["path"]), e["reason"])
                                                  for e in skips.unreadable + skips.ignored])


def decode_files(paths: list[Path], img_size: int, resize: str, workers: int, progress: bool) -> list[Decoded]:
    """Decode every file with the prepare stage's `decode_image` and its process-pool map, resized by the
    model's own policy (a model trained on padded images scores chance on stretched ones)."""
    decode = functools.partial(decode_image, img_size=img_size, policy=resize)
    workers = min(resolve_workers(workers), max(1, len(paths) // MIN_FILES_PER_WORKER))
    return list(parallel_map(decode, paths, workers, "predict: decode", progress))


def figure_names(files: list[str]) -> list[str]:
    """A safe figure name per file, unique by construction and short whatever the folder's depth (unique_stem:
    a nested or unsafe path keeps its readable start, '/' -> '__', plus a hash of the whole path)."""
    return [f"{unique_stem(file)}.png" for file in files]


def _check_out_dir(out_dir: Path, images_dir: Path) -> None:
    """predict replaces its --out folder as a whole: never the images, a folder above them, or a folder that
    holds anything but an earlier prediction."""
    out_real, images_real = Path(os.path.realpath(out_dir)), Path(os.path.realpath(images_dir))
    if out_real == images_real or out_real in images_real.parents:
        raise UserError(f"--out {out_dir}: is the --images folder or a folder above it, and predict replaces "
                        f"its --out as a whole. Give a new folder, e.g. {images_dir / 'predictions'}.")
    check_output_dir(out_real, PREDICT_FILES)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@dataclass(frozen=True)
class _Inputs:
    files: list[str]       # relative to the images folder, decoded; real names (display_name to show them)
    pixels: torch.Tensor   # (N, 3, S, S) uint8
    skipped: list[Skipped]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _nothing_decoded(images_dir: Path, listing: FolderListing, failed: list[Skipped]) -> str:
    """Why nothing could be predicted: the files named like images that failed to decode, counted and named apart
    from the entries that were never read (not images, unreadable folders), so each count matches its names."""
    def some(entries: list[Skipped]) -> str:
        return "; ".join(f"{s.file}: {s.reason}" for s in entries[:3]) + (" ..." if len(entries) > 3 else "")

    which = "its 1 file" if len(failed) == 1 else f"none of its {len(failed)} files"
    verb = "could not be decoded" if len(failed) == 1 else "could be decoded"
    others = (f"; {_count(len(listing.not_read), 'other entry')} not read ({some(listing.not_read)})"
              if listing.not_read else "")
    return f"--images {images_dir}: {which} named like an image {verb} ({some(failed)}){others}."


def _read_images(images_dir: Path, out_dir: Path, trained: TrainedModel, workers: int, progress: bool) -> _Inputs:
    listing = list_folder(images_dir, exclude=out_dir)
    if not listing.images:
        raise UserError(f"--images {images_dir}: holds no image files (looked for "
                        f"{', '.join(sorted(image_extensions())[:8])}, ... in every sub-folder).")
    decoded = decode_files([images_dir / rel for rel in listing.images], trained.img_size, trained.resize, workers,
                           progress)
    skipped = [Skipped(display_name(rel), d.error) for rel, d in zip(listing.images, decoded) if d.error is not None]
    skipped += listing.not_read
    kept = [i for i, d in enumerate(decoded) if d.error is None]
    if not kept:
        raise UserError(_nothing_decoded(images_dir, listing, skipped[:len(listing.images)]))
    for s in skipped:
        print(f"predict: skipped {images_dir / s.file}: {s.reason}", file=sys.stderr)
    return _Inputs(files=[listing.images[i] for i in kept], skipped=skipped,
                   pixels=torch.from_numpy(np.stack([decoded[i].pixels for i in kept])))


def explain_target(trained: TrainedModel, explain_class: str) -> str | int:
    """--explain-class as compute_panels takes it: 'predicted', 'runner-up', or the index of a class name."""
    if explain_class in EXPLAIN_CHOICES:
        if explain_class == "runner-up" and len(trained.classes) < 2:
            raise UserError("--explain-class runner-up needs a model of at least two classes.")
        return explain_class
    if explain_class in trained.classes:
        return trained.classes.index(explain_class)
    raise UserError(f"--explain-class {explain_class!r}: not one of {', '.join(EXPLAIN_CHOICES)} or a class of the "
                    f"model ({', '.join(trained.classes)}).")


def _classify(trained: TrainedModel, inputs: _Inputs, tmp: Path, top_k: int, batch_size: int,
              figure: PanelFigure | None, progress: bool, explain: str | int = "predicted") -> list[Prediction]:
    """Predict every input in batches; with `figure`, save each one's figure into `tmp`."""
    classes, files = trained.classes, inputs.files
    names = figure_names(files) if figure is not None else []
    predictions = []
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar:
        for lo in range(0, len(files), batch_size):
            panels = compute_panels(trained.model, inputs.pixels[lo:lo + batch_size], batch_size, explain)
            top_p, top_i = panels.probs.topk(top_k, dim=1)                # (b, k)
            for j in range(panels.probs.shape[0]):
                n = lo + j
                predicted, confidence = int(panels.predictions[j]), float(panels.confidence[j])
                shown = display_name(files[n])
                if figure is not None:
                    figure.draw_row(0, panels, j, "")
                    figure.save(tmp / names[n], title=f"{shown}\n{prediction_label(classes, predicted, confidence)}")
                predictions.append(Prediction(
                    file=shown, predicted_class=classes[predicted], confidence=confidence,
                    top_k=[(classes[int(i)], float(p)) for p, i in zip(top_p[j], top_i[j])]))
                bar.update()
    return predictions


def _predictions_table(predictions: list[Prediction], top_k: int) -> tuple[list[str], list[list]]:
    """predictions.csv's header and rows: every class name and probability in a column of its own."""
    header = ["file", "predicted_class", "confidence"]
    header += [f"top{r}_{what}" for r in range(1, top_k + 1) for what in ("class", "prob")]
    rows = [[p.file, p.predicted_class, f"{p.confidence:.4f}",
             *[x for name, prob in p.top_k for x in (name, f"{prob:.4f}")]] for p in predictions]
    return header, rows


def predict_folder(model_path: Path | str, images_dir: Path | str, out_dir: Path | str, top_k: int | None = None,
                   batch_size: int = 256, figures: bool = True, colormap: str = VisualizeParams.colormap,
                   alpha: float = VisualizeParams.alpha, workers: int = 0, progress: bool = True,
                   explain_class: str = "predicted") -> PredictResult:
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir}: not a folder. Give the folder that holds the images.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha must be between 0 and 1, got {alpha}.")
    check_colormap(colormap)
    _check_out_dir(out_dir, images_dir)
    trained = load_for_inference(model_path)
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, len(trained.classes))
    elif not 1 <= top_k <= len(trained.classes):
        raise UserError(f"--top-k must be between 1 and the model's {len(trained.classes)} classes, got {top_k}.")
    explain = explain_target(trained, explain_class)
    inputs = _read_images(images_dir, out_dir, trained, workers, progress)
    with atomic_dir(out_dir, PREDICT_FILES) as tmp:
        figure = PanelFigure(1, colormap, alpha, mask_panel=trained.model.learns_mask,
                             classes=trained.classes) if figures else None
        predictions = _classify(trained, inputs, tmp, top_k, batch_size, figure, progress, explain)
        _write_csv(tmp / "skipped.csv", ["file", "reason"], [[s.file, s.reason] for s in inputs.skipped])
        _write_csv(tmp / "predictions.csv", *_predictions_table(predictions, top_k))
    print(f"predict: {len(predictions)} images -> {out_dir / 'predictions.csv'}"
          + (f"; skipped {len(inputs.skipped)} files, listed in {out_dir / 'skipped.csv'}" if inputs.skipped else ""),
          file=sys.stderr)
    return PredictResult(predictions=predictions, skipped=inputs.skipped)
