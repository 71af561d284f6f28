"""The evaluate stage: score the trained model on the test split, and measure its explanations, not just draw them.

Writes what `dvc metrics show` lists, few columns so that its table fits 160 characters:
- `metrics_dir/metrics.json`: the headline classification numbers (metrics.py) and the best epoch (stored in
  the model file, so evaluate depends on nothing that changes when a retrain gives the same model);
- beside it, `maps/<method>.json` (one row per explanation method: six short score keys, the same in every
  file) and `ci/<method>.json` (their 95 % bootstrap half-widths) plus `ci/paired.json` (the learned mask
  against Grad-CAM): see explain/report.py for what each key means;
and what `dvc plots show` draws:
- `output_dir/per_class.json`: precision, recall, F1 and support of each class (`dvc plots diff` compares them);
- `output_dir/confusion.json`: one {"actual", "predicted"} record per test image, for the confusion template;
- `output_dir/misclassified.png`: the most confident mistakes, each titled true / predicted / confidence;
- `output_dir/road_morf.json`, `road_lerf.json`, `sanity.json`: the ROAD curves and the sanity check, one line
  per method; `output_dir/maps/NN_<image>.png`: the input and every method's map, one figure per image;
- `output_dir/mosaic.png`: the first mosaic of the grid pointing game and each method's map of each cell's class;
- `output_dir/explain.json`: every score with both interval ends (`python tools/attention_table.py` prints it),
  and `verdict`, one sentence on whether the native map explains this model better than Grad-CAM.
What it was asked for and cannot give (the mask of a model without one, the pointing game without ground-truth
masks, intervals from fewer than MIN_IMAGES images) gets one line on stdout, kept in explain.json's "notes".

The test split is only reported on; model selection happened on val in the train stage.
Every folder is built in a temp dir and swapped in at the end, so a failed run leaves the old ones intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from attention_cnn.atomic import Owned, atomic_dir, check_output_dir
from attention_cnn.data.prepared import load_split
from attention_cnn.explain.figures import MethodFigure, draw_mosaic, draw_note
from attention_cnn.explain.metrics.grid import (Mosaics, build_mosaics, confident, grid_unsupported,
                                                layout_for)
from attention_cnn.explain.metrics.road import FRACTIONS
from attention_cnn.explain.report import metric_files, road_records, sanity_records, summarize, verdict
from attention_cnn.explain.scoring import MASK_METHODS, Scored, build_methods, score_methods
from attention_cnn.explain.statistics import MIN_IMAGES
from attention_cnn.figures import draw_gallery, numbered_name, prediction_label
from attention_cnn.inference import (check_model_matches, images_to_float, load_for_inference, model_device,
                                     predict_logits, spread_over_classes)
from attention_cnn.metrics import ClassificationReport, chance_level, classification_report, not_learned_warning
from attention_cnn.params import Params

GALLERY_SIZE = 24
# What evaluate writes into --metrics-dir and --out; a folder holding anything else is refused, not replaced.
METRICS_FILES = Owned(patterns=("*.json",), sign="metrics.json")
PLOT_FILES = Owned(patterns=("*.json", "*.png"), sign="confusion.json")  # "*" spans "/": maps/NN_*.png too
SCORE_FILES = Owned(patterns=("*.json",))  # metrics/maps and metrics/ci


@dataclass(frozen=True)
class EvaluateResult:
    report: ClassificationReport
    explained: dict                     # output/evaluate/explain.json: every score with its interval
    metrics: dict[str, float]           # every number, flat: report.as_metrics() and maps/<method>/<score>
    headline: dict[str, float]          # what metrics_dir/metrics.json holds

    def summary(self) -> list[str]:
        """What the stage and `attention-cnn evaluate` print: the headline numbers, the verdict on the native map
        and, when the model is no better than guessing, the same warning train prints."""
        report = self.report
        lines = [f"evaluate: test accuracy {report.accuracy:.4f}, macro F1 {report.macro_f1:.4f}"]
        if "verdict" in self.explained:
            lines.append(f"evaluate: {self.explained['verdict']}")
        warning = not_learned_warning("test accuracy", report.accuracy, len(report.per_class),
                                      len(report.predictions))
        return lines + ([warning] if warning else [])


def explain_subset(model, images: torch.Tensor, masks: torch.Tensor | None, params: Params,
                   mosaics: Mosaics | None = None) -> Scored:
    """Every method in evaluate.methods, every score, on uint8 `images` (N, 3, S, S) (see explain/scoring.py)."""
    cfg = params.evaluate
    methods = build_methods(cfg.methods, model, params.seed, cfg.batch_size)
    x = images_to_float(images, model_device(model))                    # (N, 3, S, S)
    return score_methods(model, x, masks, methods, cfg.faithfulness_steps, cfg.batch_size, params.seed,
                         cfg.sanity_images, mosaics)


def grid_mosaics(model, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, num_classes: int,
                 params: Params) -> tuple[Mosaics | None, str | None]:
    """The grid pointing game's mosaics from the whole test split, or None and one line saying why not."""
    if params.evaluate.mosaics == 0:
        return None, "grid pointing game skipped: evaluate.mosaics is 0"
    unsupported = grid_unsupported(model.params.attention, model.params.head)
    if unsupported:
        return None, unsupported
    threshold = params.evaluate.grid_confidence
    eligible = confident(logits.softmax(dim=1), labels, threshold)
    mosaics = build_mosaics(images, labels, eligible, num_classes, params.evaluate.mosaics, params.seed)
    if mosaics is None:
        rows, cols = layout_for(num_classes)
        return None, (f"grid pointing game skipped: it needs correctly classified test images with probability "
                      f">= {threshold} (evaluate.grid_confidence) in at least {rows * cols} classes")
    return mosaics, None


def not_scored_lines(methods: tuple[str, ...], learns_mask: bool, images: int, has_masks: bool) -> list[str]:
    """One line per thing evaluate was asked for and cannot score, known before scoring: a table's missing
    column or null file must never be the only sign. `images`: how many test images get scored."""
    lines = []
    without_mask = [m for m in methods if m in MASK_METHODS and not learns_mask]
    if without_mask:
        left = [m for m in methods if m not in without_mask]
        lines.append(f"evaluate: {', '.join(without_mask)} not scored: the model was trained with model.attention "
                     f"none, so it has no mask to explain with; their metrics/maps and metrics/ci files hold null"
                     + ("" if left else ". No explanation method is left to score, so only the test metrics are "
                        "written: add e.g. gradcam to evaluate.methods to score explanations"))
    if not has_masks and len(without_mask) < len(methods):
        lines.append("evaluate: pointing game (pg) and relevance mass (mass) not scored: they need ground-truth "
                     "masks, and the test images have none (data.source has no .masks/ folder); their columns "
                     "hold null")
    if images < MIN_IMAGES and len(without_mask) < len(methods):
        verb = "is" if images == 1 else "are"
        lines.append(f"evaluate: no 95 % intervals and no p-values: they need at least {MIN_IMAGES} images and "
                     f"{images} {verb} scored (evaluate.faithfulness_images, at most the test split); metrics/ci "
                     f"holds null")
    return lines


def write_method_figures(folder: Path, scored: Scored, images: torch.Tensor, files: list[str], labels: torch.Tensor,
                         classes: list[str], count: int) -> None:
    """The first `count` images (spread over the classes): input and every method's map, one PNG each."""
    if not scored.methods or count == 0:
        return
    folder.mkdir()
    figure = MethodFigure(list(scored.methods))
    for i in range(min(count, images.shape[0])):
        target = int(scored.targets[i])
        title = f"true: {classes[int(labels[i])]} | maps explain: {classes[target]}"
        figure.draw(images[i], [r.maps[i] for r in scored.methods.values()], title,
                    folder / numbered_name(i + 1, files[i]))


def headline_metrics(report: ClassificationReport, best_epoch: int | None) -> dict[str, float]:
    headline = {"accuracy": report.accuracy, "guess": round(chance_level(len(report.per_class)), 3),
                "macro_f1": report.macro_f1, "loss": report.loss,
                "top2_accuracy": report.top2_accuracy, "ece": report.ece}
    if best_epoch is not None:
        headline["best_epoch"] = best_epoch
    return headline


def per_class_records(report: ClassificationReport) -> list[dict]:
    """One {"class", "metric", "value", "support"} record per class and metric, the layout .dvc/plots/per_class.json
    draws as grouped bars."""
    return [{"class": name, "metric": metric, "value": getattr(scores, metric), "support": scores.support}
            for name, scores in report.per_class.items() for metric in ("precision", "recall", "f1")]


def write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=1) + "\n")


def confusion_records(labels: torch.Tensor, predictions: torch.Tensor, classes: list[str]) -> list[dict[str, str]]:
    """One record per image with class names, the data layout of DVC's `confusion` plot template."""
    return [{"actual": classes[t], "predicted": classes[p]} for t, p in zip(labels.tolist(), predictions.tolist())]


def write_misclassified(path: Path, images: torch.Tensor, labels: torch.Tensor, report: ClassificationReport,
                        classes: list[str]) -> None:
    """Gallery of the most confident mistakes (up to GALLERY_SIZE); says so when there are none."""
    wrong = torch.nonzero(report.predictions != labels).flatten()
    order = report.confidence[wrong].argsort(descending=True, stable=True)
    shown = wrong[order][:GALLERY_SIZE]
    titles = [prediction_label(classes, int(report.predictions[i]), float(report.confidence[i]), int(labels[i]))
              .replace(" | ", "\n") for i in shown.tolist()]
    header = (f"misclassified test images: {len(wrong)} of {len(labels)}"
              + (f" (the {len(shown)} most confident shown)" if len(wrong) > len(shown) else ""))
    draw_gallery(images[shown], titles, path, header)


def evaluate(params: Params, prepared_dir: Path | str, model_path: Path | str, metrics_dir: Path | str,
             out_dir: Path | str) -> EvaluateResult:
    """Score `model_path` on the test split of `prepared_dir`; write metrics_dir/metrics.json, the per-method
    scores beside it (maps/, ci/), and out_dir/ (per_class, confusion, misclassified, explain, road_*, sanity,
    maps/NN_*.png), with the best epoch the model file holds.
    Raises UserError for a missing or stale model or split."""
    metrics_dir = Path(metrics_dir)
    score_dirs = {"maps": metrics_dir.with_name("maps"), "ci": metrics_dir.with_name("ci")}
    check_output_dir(metrics_dir, METRICS_FILES)  # every output folder before computing anything
    check_output_dir(out_dir, PLOT_FILES)
    for folder in score_dirs.values():
        check_output_dir(folder, SCORE_FILES)
    trained = load_for_inference(model_path)
    model = trained.model
    test = load_split(prepared_dir, "test")
    check_model_matches(trained, test, model_path, prepared_dir)
    cfg = params.evaluate

    logits = predict_logits(model, test.images, cfg.batch_size)          # (N, K)
    report = classification_report(logits, test.labels, test.classes)

    subset = spread_over_classes(test.labels, cfg.faithfulness_images)   # balanced and deterministic
    masks = test.masks[subset] if test.masks is not None else None
    notes = not_scored_lines(cfg.methods, model.learns_mask, len(subset), masks is not None)
    mosaics, grid_skipped = grid_mosaics(model, test.images, test.labels, logits, len(test.classes), params)
    notes += [f"evaluate: {grid_skipped}"] if grid_skipped else []
    for line in notes:
        print(line)
    scored = explain_subset(model, test.images[subset], masks, params, mosaics)
    explained = {**summarize(scored, params.seed), "notes": notes}
    sentence = verdict(explained)
    if sentence:
        explained["verdict"] = sentence
    headline = headline_metrics(report, trained.best_epoch)
    files = metric_files(explained)                                      # "maps/<method>.json" -> scores

    with atomic_dir(metrics_dir, METRICS_FILES) as metrics_tmp, atomic_dir(out_dir, PLOT_FILES) as out_tmp, \
            atomic_dir(score_dirs["maps"], SCORE_FILES) as maps_tmp, \
            atomic_dir(score_dirs["ci"], SCORE_FILES) as ci_tmp:
        write_json(metrics_tmp / "metrics.json", headline)
        for relative, content in files.items():
            folder, name = relative.split("/")
            write_json({"maps": maps_tmp, "ci": ci_tmp}[folder] / name, content)
        write_json(out_tmp / "per_class.json", per_class_records(report))
        write_json(out_tmp / "confusion.json", confusion_records(test.labels, report.predictions, test.classes))
        write_misclassified(out_tmp / "misclassified.png", test.images, test.labels, report, test.classes)
        write_json(out_tmp / "explain.json", explained)
        for order, records in road_records(scored, FRACTIONS).items():
            write_json(out_tmp / f"road_{order}.json", records)
        write_json(out_tmp / "sanity.json", sanity_records(scored))
        write_method_figures(out_tmp / "maps", scored, test.images[subset], [test.files[i] for i in subset],
                             test.labels[subset], test.classes, cfg.figures)
        if mosaics is not None and scored.methods:
            draw_mosaic(out_tmp / "mosaic.png", mosaics, {n: r.mosaic_maps for n, r in scored.methods.items()},
                        test.classes)
        else:  # the figure dvc.yaml declares says why it is empty, so `dvc plots` has no missing file to warn of
            draw_note(out_tmp / "mosaic.png", grid_skipped or "grid pointing game: no explanation method to draw")
    maps = {f"{path.removesuffix('.json')}/{key}": value for path, content in files.items()
            if path.startswith("maps/") for key, value in content.items()}
    every = {**report.as_metrics(), **maps}
    return EvaluateResult(report=report, explained=explained, metrics=every, headline=headline)
