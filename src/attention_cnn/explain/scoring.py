"""Every method x every score on one set of test images, batched: what the evaluate stage measures.

For each method: its maps of all images (explaining the class the model predicts on the intact image), then
per image: deletion and insertion AUC (metrics/deletion_insertion.py), ROAD MoRF / LeRF and their summary
(metrics/road.py), and, where ground-truth masks exist, the pointing game and relevance mass accuracy
(metrics/pointing.py). Every perturbation step of every image goes through the model in full batches.
Where mosaics are given, each method also explains each cell's class on the whole mosaic: the grid pointing
game (metrics/grid.py), one score per mosaic.
The sanity check (randomization.py) runs on the first `sanity_images` of the same images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm import tqdm

from attention_cnn.explain.base import Explainer, cache_sized, scale_unit
from attention_cnn.explain.baselines import EdgeMap, RandomMap
from attention_cnn.explain.metrics.deletion_insertion import ScoreFn, deletion_fill, deletion_insertion, perturbation
from attention_cnn.explain.metrics.grid import Mosaics, grid_scores
from attention_cnn.explain.metrics.pointing import pointing_game, pointing_tolerance, relevance_mass
from attention_cnn.explain.metrics.road import road
from attention_cnn.explain.methods import (AttendedMap, GradCAM, IntegratedGradientsMap, MaskMap, NativeMap,
                                           OcclusionMap, SmoothGrad)
from attention_cnn.explain.randomization import Cascade, cascading_randomization
from attention_cnn.inference import model_device
from attention_cnn.model import AttentionCNN, autocast
from attention_cnn.params import EXPLAIN_METHODS

METHODS = EXPLAIN_METHODS  # every method evaluate.methods may name, in the order tables and figures show them
MASK_METHODS = ("mask", "attended")  # need a model that learns a mask (model.attention != none)
# Per-image scores (morf and lerf: the ROAD curves' means over the removal fractions), and "gpg", the grid
# pointing game, one per mosaic; "mprt", the sanity check, is one number per method.
SCORES = ("del", "ins", "morf", "lerf", "road", "pg", "mass", "gpg")


def skipped_methods(names: list[str] | tuple[str, ...], model: AttentionCNN) -> dict[str, str]:
    """{method: one line saying why it is not run} for the named methods this model cannot have."""
    skipped = {}
    if not model.learns_mask:
        skipped.update({name: f"{name} map skipped: model.attention=none learns no mask"
                        for name in MASK_METHODS if name in names})
    return skipped


@dataclass(frozen=True)
class MethodResult:
    maps: torch.Tensor                 # (N, S, S) in [0, 1], on the CPU
    scores: dict[str, torch.Tensor]    # score -> (N,) per image (NaN where undefined); "gpg" (M,) per mosaic
    mosaic_maps: torch.Tensor | None   # (cells, H, W) the first mosaic's maps, one per cell's class, in [0, 1]
    morf: torch.Tensor                 # (fractions,) mean ROAD curve, most relevant first
    lerf: torch.Tensor                 # (fractions,) least relevant first


@dataclass(frozen=True)
class Scored:
    methods: dict[str, MethodResult]
    cascade: Cascade | None
    targets: torch.Tensor              # (N,) the class each map explains
    mosaics: Mosaics | None = None     # the grid pointing game's mosaics, when there were enough classes


def build_methods(names: list[str] | tuple[str, ...], model: AttentionCNN, seed: int,
                  batch_size: int) -> list[Explainer]:
    """The methods to run, in METHODS order; the learned mask's two maps only for a model that has one."""
    makers = {"native": NativeMap, "mask": MaskMap, "attended": AttendedMap, "gradcam": GradCAM,
              "ig": lambda: IntegratedGradientsMap(batch_size), "smoothgrad": lambda: SmoothGrad(seed, batch_size),
              "occlusion": lambda: OcclusionMap(batch_size), "random": lambda: RandomMap(seed), "edge": EdgeMap}
    skipped = skipped_methods(names, model)
    return [makers[name]() for name in METHODS if name in names and name not in skipped]


def class_probabilities(model: AttentionCNN) -> ScoreFn:
    """Float images in [0, 1] -> softmax probabilities, under inference mode and the device's autocast."""
    device = model_device(model)

    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device):
            return torch.cat([model(piece).logits.float().softmax(dim=1) for piece in cache_sized(images.to(device))])

    return score


def channels_last(model: AttentionCNN, images: torch.Tensor) -> tuple[AttentionCNN, torch.Tensor]:
    """A channels_last copy of the model and images: every forward and backward below (tens of thousands of
    images) runs 1.7x faster on the CPU (measured at 64 px, 256 images: 0.55 s against 0.95 s), same logits to
    1e-7. A copy, so the caller's model keeps its layout."""
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return fast, images.contiguous(memory_format=torch.channels_last)


def method_maps(method: Explainer, model: AttentionCNN, images: torch.Tensor, targets: torch.Tensor,
                batch_size: int) -> torch.Tensor:
    """(N, 3, S, S) -> (N, S, S) maps in [0, 1], batch by batch (fp32: attributions need the precision)."""
    return torch.cat([method(model, images[lo:lo + batch_size], targets[lo:lo + batch_size]).float()
                      for lo in range(0, images.shape[0], batch_size)])


def positive_maps(method: Explainer, model: AttentionCNN, images: torch.Tensor, targets: torch.Tensor,
                  batch_size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H, W) the positive part of each raw map (Explainer.positive), batch by batch."""
    return torch.cat([method.positive(model, images[lo:lo + batch_size], targets[lo:lo + batch_size]).float()
                      for lo in range(0, images.shape[0], batch_size)])


def score_methods(model: AttentionCNN, images: torch.Tensor, masks: torch.Tensor | None, methods: list[Explainer],
                  steps: int, batch_size: int, seed: int, sanity_images: int, mosaics: Mosaics | None = None) -> Scored:
    """Per-image scores of each method's maps on float images (N, 3, S, S) in [0, 1] on the model's device;
    masks (N, S, S) or None; mosaics (uint8, metrics/grid.py) or None for no grid pointing game."""
    model, images = channels_last(model, images)
    mosaic_images = None
    if mosaics is not None:
        mosaic_images = (mosaics.images.to(images.device).float() / 255).contiguous(memory_format=torch.channels_last)
        mosaic_targets = mosaics.targets.to(images.device)
    score = class_probabilities(model)
    targets = torch.cat([score(images[lo:lo + batch_size]).argmax(dim=1)
                         for lo in range(0, images.shape[0], batch_size)])
    setup = perturbation(score, images, targets, batch_size, fill=deletion_fill(images, model.mean))
    tolerance = pointing_tolerance(images.shape[-1])
    results = {}
    for method in tqdm(methods, desc="attention quality", unit="method", leave=False):
        maps = method_maps(method, model, images, targets, batch_size)  # (N, S, S)
        curves = deletion_insertion(score, setup, maps, steps, batch_size)
        removal = road(score, images, targets, maps, batch_size, seed)
        nan = torch.full((images.shape[0],), float("nan"))
        scores = {"del": curves.deletion_auc, "ins": curves.insertion_auc, "morf": removal.morf.mean(0),
                  "lerf": removal.lerf.mean(0), "road": removal.road,
                  "pg": nan if masks is None else pointing_game(maps.cpu(), masks, tolerance),
                  "mass": nan if masks is None else relevance_mass(maps.cpu(), masks)}
        first = None
        if mosaic_images is None:
            scores["gpg"] = torch.full((1,), float("nan"))
        else:
            grid_maps = positive_maps(method, model, mosaic_images, mosaic_targets, batch_size).cpu()
            scores["gpg"] = grid_scores(grid_maps, mosaics)
            first = scale_unit(grid_maps[:mosaics.per_mosaic])  # drawn like every other map, 0 to 1
        results[method.name] = MethodResult(maps=maps.cpu(), scores=scores, morf=removal.morf.mean(1),
                                            lerf=removal.lerf.mean(1), mosaic_maps=first)
    cascade = None
    if sanity_images > 0 and methods:
        n = min(sanity_images, images.shape[0])
        cascade = cascading_randomization(model, methods, images[:n], targets[:n], seed)
    return Scored(methods=results, cascade=cascade, targets=targets.cpu(), mosaics=mosaics)
