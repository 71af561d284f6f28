"""The evaluate stage: score the trained model on the test split, and measure its attention, not just draw it.

Writes what `dvc metrics show` lists, few numbers so that its table fits a terminal:
- `metrics_dir/metrics.json`: the headline classification numbers (metrics.py) and the best epoch (stored in
  the model file, so evaluate depends on nothing that changes when a retrain gives the same model);
- `metrics_dir/<method>.json`, one per saliency method (maps.py: `attention`, the learned mask; `gradcam` on the
  same layer; `random`): deletion/insertion AUC and the pointing game against the ground-truth masks when the
  split has them (faithfulness.py). One file per method puts the methods in rows that share three columns.
and what `dvc plots show` draws:
- `output_dir/per_class.json`: precision, recall, F1 and support of each class (`dvc plots diff` compares them);
- `output_dir/confusion.json`: one {"actual", "predicted"} record per test image, for the confusion template;
- `output_dir/misclassified.png`: the most confident mistakes, each titled true / predicted / confidence.

The test split is only reported on; model selection happened on val in the train stage.
Both folders are built in temp dirs and swapped in at the end, so a failed run leaves the old ones intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from attention_cnn.atomic import Owned, atomic_dir, check_output_dir
from attention_cnn.data.prepared import load_split
from attention_cnn.faithfulness import (ScoreFn, deletion_fill, deletion_insertion, perturbation, pointing_game,
                                        pointing_tolerance)
from attention_cnn.figures import draw_gallery, prediction_label
from attention_cnn.inference import (check_model_matches, images_to_float, load_for_inference, model_device,
                                     predict_logits, spread_over_classes)
from attention_cnn.maps import AttentionMap, GradCAM, RandomMap, SaliencyMap
from attention_cnn.metrics import ClassificationReport, chance_level, classification_report
from attention_cnn.model import AttentionCNN, autocast
from attention_cnn.params import Params

GALLERY_SIZE = 24
# What evaluate writes into --metrics-dir and --out; a folder holding anything else is refused, not replaced.
METRICS_FILES = Owned(patterns=("*.json",), sign="metrics.json")
PLOT_FILES = Owned(patterns=("*.json", "*.png"), sign="confusion.json")


@dataclass(frozen=True)
class MapQuality:
    deletion_auc: float           # lower is better
    insertion_auc: float          # higher is better
    pointing_game: float | None   # hit rate in [0, 1]; None without ground-truth masks


@dataclass(frozen=True)
class EvaluateResult:
    report: ClassificationReport
    map_quality: dict[str, MapQuality]  # by method name: attention, gradcam, random
    metrics: dict[str, float]           # every number, flat: report.as_metrics() and method/score
    headline: dict[str, float]          # what metrics_dir/metrics.json holds


def class_probabilities(model: AttentionCNN) -> ScoreFn:
    """The score function deletion/insertion call: float images in [0, 1] -> softmax probabilities."""
    device = model_device(model)

    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device):
            return model(images.to(device)).logits.float().softmax(dim=1)

    return score


def saliency_methods(model: AttentionCNN, seed: int) -> list[SaliencyMap]:
    """The maps to compare. A model without attention (model.attention=none) has a constant mask, which ranks
    nothing, so its `attention/*` metrics are left out rather than reported as if they meant something."""
    methods: list[SaliencyMap] = [GradCAM(), RandomMap(seed)]
    if model.learns_mask:
        methods.insert(0, AttentionMap())
    return methods


def compute_maps(method: SaliencyMap, model: AttentionCNN, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, 3, S, S) float images on the model's device -> (N, S, S) maps in [0, 1], batch by batch."""
    device = model_device(model)
    with autocast(device):
        return torch.cat([method(model, images[lo:lo + batch_size]).float()
                          for lo in range(0, images.shape[0], batch_size)])


def attention_quality(model: AttentionCNN, images: torch.Tensor, masks: torch.Tensor | None,
                      methods: list[SaliencyMap], steps: int, batch_size: int) -> dict[str, MapQuality]:
    """Deletion/insertion AUC (and the pointing game when `masks` (N, S, S) exist) of each method's maps on
    uint8 `images` (N, 3, S, S), explaining the class the model predicts."""
    device = model_device(model)
    x = images_to_float(images, device)                                   # (N, 3, S, S)
    score = class_probabilities(model)
    targets = torch.cat([score(x[lo:lo + batch_size]).argmax(dim=1) for lo in range(0, x.shape[0], batch_size)])
    setup = perturbation(score, x, targets, batch_size, fill=deletion_fill(x, model.mean))
    quality = {}
    for method in tqdm(methods, desc="attention quality", unit="map", leave=False):
        saliency = compute_maps(method, model, x, batch_size)            # (N, S, S)
        curves = deletion_insertion(score, setup, saliency, steps, batch_size)
        pointing = None
        if masks is not None:
            hits = pointing_game(saliency.cpu(), masks, pointing_tolerance(images.shape[-1]))
            pointing = float(hits.nanmean()) if not hits.isnan().all() else None
        quality[method.name] = MapQuality(deletion_auc=float(curves.deletion_auc.mean()),
                                          insertion_auc=float(curves.insertion_auc.mean()), pointing_game=pointing)
    return quality


def quality_metrics(quality: dict[str, MapQuality]) -> dict[str, float]:
    return {f"{name}/{key}": value for name, scores in quality_files(quality).items() for key, value in scores.items()}


def quality_files(quality: dict[str, MapQuality]) -> dict[str, dict[str, float]]:
    """{method: {score: value}}, the content of metrics_dir/<method>.json."""
    files = {}
    for name, q in quality.items():
        files[name] = {"deletion_auc": q.deletion_auc, "insertion_auc": q.insertion_auc}
        if q.pointing_game is not None:
            files[name]["pointing_game"] = q.pointing_game
    return files


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
    """Score `model_path` on the test split of `prepared_dir`; write metrics_dir/{metrics, <method>}.json and
    out_dir/{per_class.json, confusion.json, misclassified.png}, with the best epoch the model file holds.
    Raises UserError for a missing or stale model or split."""
    check_output_dir(metrics_dir, METRICS_FILES), check_output_dir(out_dir, PLOT_FILES)  # before computing
    trained = load_for_inference(model_path)
    model = trained.model
    test = load_split(prepared_dir, "test")
    check_model_matches(trained, test, model_path, prepared_dir)
    cfg = params.evaluate

    logits = predict_logits(model, test.images, cfg.batch_size)          # (N, K)
    report = classification_report(logits, test.labels, test.classes)

    subset = spread_over_classes(test.labels, cfg.faithfulness_images)   # balanced and deterministic
    masks = test.masks[subset] if test.masks is not None else None
    quality = attention_quality(model, test.images[subset], masks, saliency_methods(model, params.seed),
                                cfg.faithfulness_steps, cfg.batch_size)
    headline = headline_metrics(report, trained.best_epoch)

    with atomic_dir(metrics_dir, METRICS_FILES) as metrics_tmp, atomic_dir(out_dir, PLOT_FILES) as out_tmp:
        write_json(metrics_tmp / "metrics.json", headline)
        for name, scores in quality_files(quality).items():
            write_json(metrics_tmp / f"{name}.json", scores)
        write_json(out_tmp / "per_class.json", per_class_records(report))
        write_json(out_tmp / "confusion.json", confusion_records(test.labels, report.predictions, test.classes))
        write_misclassified(out_tmp / "misclassified.png", test.images, test.labels, report, test.classes)
    every = {**report.as_metrics(), **quality_metrics(quality)}
    return EvaluateResult(report=report, map_quality=quality, metrics=every, headline=headline)
