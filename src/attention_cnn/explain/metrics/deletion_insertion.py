"""Deletion and insertion: does changing the pixels a map ranks first change the model's score fastest?

Deletion and insertion (Petsiuk, Das & Saenko, "RISE", BMVC 2018): pixels are ranked by saliency, most salient
first, and changed in that order in `steps` equal steps.
- deletion starts from the image and replaces the ranked pixels with the training images' per-channel mean
  colour (`deletion_fill`: zeros after the model's normalisation, what RISE's reference code deletes to); a
  faithful map makes the score fall fast: LOWER deletion AUC is better. No constant fill is neutral for every
  model: on the 64 px sample model an all-black image is "street" at 0.73 and the mean colour "mountain" at
  0.97 (an earlier model: black "forest" at 0.999). The curve's end point carries that bias for every map
  alike, so compare a map with the random baseline on the same fill, not with a number from elsewhere.
- insertion starts from a blurred copy of the image (Gaussian, sigma = S/16 px) and puts the ranked pixels
  back; a faithful map makes the score rise fast: HIGHER insertion AUC is better.
The score is the softmax probability of the class the model predicts on the intact image (the map explains
the model's decision, right or wrong). AUC = trapezoid rule over the fraction of pixels changed, in [0, 1].

Everything is batched on tensors; maps are (B, S, S) at image resolution (see explain/base.py).
ROAD (road.py) scores the same rankings with an imputation that does not leak the removed region's outline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, S, S) in [0, 1] -> class probabilities (N, K)


@dataclass(frozen=True)
class FaithfulnessResult:
    deletion_auc: torch.Tensor      # (B,) per image
    insertion_auc: torch.Tensor     # (B,)
    deletion_curve: torch.Tensor    # (steps + 1, B) score after removing fraction k/steps of the pixels
    insertion_curve: torch.Tensor   # (steps + 1, B)


@dataclass(frozen=True)
class Perturbation:
    """What every map's curves start from and end at. The curves' first and last points do not depend on the
    map, so they are scored once here and shared by all maps compared on the same images."""
    images: torch.Tensor           # (B, 3, S, S) in [0, 1]
    targets: torch.Tensor          # (B,) class whose probability is the score
    fill: torch.Tensor             # (B, 3, S, S) what deleted pixels become
    insertion_start: torch.Tensor  # (B, 3, S, S) what insertion starts from
    intact_score: torch.Tensor     # (B,) score of the images
    deleted_score: torch.Tensor    # (B,) score of fill
    start_score: torch.Tensor      # (B,) score of insertion_start


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian, size odd."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def blur(images: torch.Tensor) -> torch.Tensor:
    """The insertion start: a Gaussian blur strong enough to wipe out small class evidence (sigma = S/16),
    with reflect padding. Two depthwise 1-D convolutions; torchvision's gaussian_blur computes the same, but
    importing torchvision costs the evaluate stage 2-3 s (it pulls in torch._dynamo), more than all the blurring.
    """
    B, C, H, W = images.shape
    sigma = max(W / 16, 0.5)
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(H, W) - 1) // 2) + 1)  # odd, and reflect padding < side
    kernel = gaussian_kernel(sigma, size).to(images)
    pad = size // 2
    x = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)  # along rows
    return F.conv2d(x, kernel.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)  # along columns


def _target_scores(score_fn: ScoreFn, images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    scores = [score_fn(images[lo:lo + batch_size]).float().gather(1, targets[lo:lo + batch_size, None]).squeeze(1)
              for lo in range(0, images.shape[0], batch_size)]
    return torch.cat(scores).cpu()


def deletion_fill(images: torch.Tensor, channel_mean: torch.Tensor) -> torch.Tensor:
    """What deleted pixels become: `channel_mean` (3 values in [0, 1], the training images' per-channel mean,
    which the model keeps as its `mean` buffer) at every pixel of images (B, 3, S, S). See the module docstring."""
    return channel_mean.reshape(1, 3, 1, 1).to(images).expand_as(images)


def perturbation(score_fn: ScoreFn, images: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 fill: torch.Tensor, insertion_start: torch.Tensor | None = None) -> Perturbation:
    """Set up deletion (pixels become `fill`, (B, 3, S, S), normally `deletion_fill`) and insertion (default
    start: `blur(images)`) for images (B, 3, S, S) in [0, 1]; tests pass their own start."""
    start = blur(images) if insertion_start is None else insertion_start
    targets = targets.to(images.device)
    return Perturbation(images=images, targets=targets, fill=fill, insertion_start=start,
                        intact_score=_target_scores(score_fn, images, targets, batch_size),
                        deleted_score=_target_scores(score_fn, fill, targets, batch_size),
                        start_score=_target_scores(score_fn, start, targets, batch_size))


def saliency_rank(saliency: torch.Tensor) -> torch.Tensor:
    """(B, S, S) map -> (B, S*S) rank of each pixel, 0 = most salient. Ties keep raster order (stable sort)."""
    flat = saliency.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)  # pixel index by rank
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return rank


def perturbation_curve(score_fn: ScoreFn, start: torch.Tensor, fill: torch.Tensor, rank: torch.Tensor,
                       targets: torch.Tensor, steps: int, batch_size: int) -> torch.Tensor:
    """Score of `targets` while the pixels of `start` are replaced by those of `fill` in rank order, at the
    inner steps only: start, fill (B, 3, S, S); rank (B, S*S); targets (B,). Returns (steps - 1, B): row k-1
    has the first floor(k * S*S / steps) ranked pixels taken from `fill`, k = 1 .. steps-1. (step, image)
    pairs are flattened and scored in chunks of `batch_size`, so few images still fill whole batches.
    """
    num_images, pixels = rank.shape
    total = (steps - 1) * num_images
    scores = torch.empty(total, dtype=torch.float32)
    for lo in range(0, total, batch_size):
        pair = torch.arange(lo, min(lo + batch_size, total), device=rank.device)
        step, image = pair // num_images + 1, pair % num_images
        count = step * pixels // steps                                   # (m,) pixels changed so far
        changed = (rank[image] < count[:, None]).view(-1, 1, *start.shape[-2:])  # (m, 1, S, S)
        x = torch.where(changed, fill[image], start[image])              # (m, 3, S, S)
        probs = score_fn(x).float()                                       # (m, K)
        scores[lo:lo + len(pair)] = probs.gather(1, targets[image][:, None]).squeeze(1).cpu()
    return scores.view(steps - 1, num_images)


def curve_auc(curve: torch.Tensor) -> torch.Tensor:
    """(steps + 1, B) scores at fractions 0, 1/steps, ..., 1 -> (B,) trapezoid area."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[0] - 1), dim=0)


def deletion_insertion(score_fn: ScoreFn, setup: Perturbation, saliency: torch.Tensor, steps: int,
                       batch_size: int) -> FaithfulnessResult:
    """Deletion and insertion curves and AUCs of `saliency` (B, S, S) on the images of `setup`."""
    images = setup.images
    if saliency.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"saliency {tuple(saliency.shape)} does not match images {tuple(images.shape)}")
    rank = saliency_rank(saliency.to(images.device))
    deleting = perturbation_curve(score_fn, images, setup.fill, rank, setup.targets, steps, batch_size)
    inserting = perturbation_curve(score_fn, setup.insertion_start, images, rank, setup.targets, steps, batch_size)
    deletion = torch.cat([setup.intact_score[None], deleting, setup.deleted_score[None]])   # (steps + 1, B)
    insertion = torch.cat([setup.start_score[None], inserting, setup.intact_score[None]])
    return FaithfulnessResult(deletion_auc=curve_auc(deletion), insertion_auc=curve_auc(insertion),
                              deletion_curve=deletion, insertion_curve=insertion)
