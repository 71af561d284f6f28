"""The evaluate stage: score the trained model on the test split, and measure its attention, not just draw it.

Writes
- `metrics_dir/metrics.json` through DVCLive: classification metrics (metrics.py) and, per saliency method
  (maps.py: the learned attention, Grad-CAM on the same layer, a random map), deletion/insertion AUC and the
  pointing game against the ground-truth masks when the split has them (faithfulness.py);
- `output_dir/confusion.json`: one {"actual", "predicted"} record per test image, for DVC's confusion template;
- `output_dir/misclassified.png`: the most confident mistakes, each titled true / predicted / confidence.

The test split is only reported on; model selection happened on val in the train stage.
Both folders are built in temp dirs and swapped in at the end, so a failed run leaves the old ones intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from dvclive import Live
from tqdm import tqdm

from attention_cnn.atomic import atomic_dir
from attention_cnn.data.prepared import load_split
from attention_cnn.faithfulness import (ScoreFn, deletion_fill, deletion_insertion, perturbation, pointing_game,
                                        pointing_tolerance)
from attention_cnn.figures import draw_gallery, prediction_label
from attention_cnn.inference import (check_model_matches, images_to_float, load_for_inference, model_device,
                                     predict_logits, spread_over_classes)
from attention_cnn.maps import AttentionMap, GradCAM, RandomMap, SaliencyMap
from attention_cnn.metrics import ClassificationReport, classification_report
from attention_cnn.model import AttentionCNN, autocast
from attention_cnn.params import Params

GALLERY_SIZE = 24


@dataclass(frozen=True)
class MapQuality:
    deletion_auc: float           # lower is better
    insertion_auc: float          # higher is better
    pointing_game: float | None   # hit rate in [0, 1]; None without ground-truth masks


@dataclass(frozen=True)
class EvaluateResult:
    report: ClassificationReport
    map_quality: dict[str, MapQuality]  # by method name: attention, gradcam, random
    metrics: dict[str, float]           # flat names exactly as logged ('/' nests them in metrics.json)


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
    if model.params.attention != "none":
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
    metrics = {}
    for name, q in quality.items():
        metrics[f"{name}/deletion_auc"] = q.deletion_auc
        metrics[f"{name}/insertion_auc"] = q.insertion_auc
        if q.pointing_game is not None:
            metrics[f"{name}/pointing_game"] = q.pointing_game
    return metrics


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
    """Score `model_path` on the test split of `prepared_dir`; write metrics_dir/metrics.json (DVCLive) and
    out_dir/{confusion.json, misclassified.png}. Raises UserError for a missing or stale model or split."""
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
    metrics = {**report.as_metrics(), **quality_metrics(quality)}

    with atomic_dir(metrics_dir) as metrics_tmp, atomic_dir(out_dir) as out_tmp:
        # dvcyaml=None: DVCLive must not rewrite dvc.yaml; save_dvc_exp=False: `dvc exp run` tracks the experiment.
        with Live(dir=str(metrics_tmp), dvcyaml=None, save_dvc_exp=False) as live:
            for name, value in metrics.items():
                live.log_metric(name, value, plot=False)
        records = confusion_records(test.labels, report.predictions, test.classes)
        (out_tmp / "confusion.json").write_text(json.dumps(records, indent=1) + "\n")
        write_misclassified(out_tmp / "misclassified.png", test.images, test.labels, report, test.classes)
    return EvaluateResult(report=report, map_quality=quality, metrics=metrics)
