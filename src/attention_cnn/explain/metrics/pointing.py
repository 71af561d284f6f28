"""Scores against ground truth: does the map point at where the class evidence really is?

Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016): a hit when the
map's maximum lies within 15 px (Euclidean, a disk) of the ground-truth evidence mask at 224 px, the radius
scaled to the image size (`pointing_tolerance`). A disk, not a square: a square reaches 41 % further along the
diagonals and doubles the random baseline's score. Ties for the maximum (e.g. a constant map) score the share
of tied pixels inside the mask, the expected hit under random tie-breaking, so a flat map cannot score by luck
of raster order.

Relevance mass accuracy (Arras, Osman & Samek, "CLEVR-XAI", Information Fusion 2022): the share of the map's
mass that lies inside the mask, sum(map * mask) / sum(map), on the [0, 1] maps every method gives. It uses the
whole map, not only its peak. A map with no mass (a constant map, which min-max scaling makes all zeros) is
read as uniform: it scores the mask's share of the image, the same as any flat map.

Images whose mask is empty get NaN in both (there is nothing to point at); average with nanmean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POINTING_RADIUS_AT_224 = 15  # px, Zhang et al. 2016


def pointing_tolerance(img_size: int) -> float:
    """Radius in pixels within which a map's maximum may miss the mask and still hit: 15 px at 224 px."""
    return POINTING_RADIUS_AT_224 * img_size / 224


def grow_by_disk(evidence: torch.Tensor, radius: float) -> torch.Tensor:
    """(B, S, S) bool -> (B, S, S) bool: every pixel within Euclidean distance `radius` of an evidence pixel."""
    reach = math.floor(radius)
    if reach < 1:
        return evidence
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None] ** 2 <= radius ** 2).float()     # (2r+1, 2r+1)
    counts = F.conv2d(evidence.float()[:, None], disk[None, None].to(evidence.device), padding=reach)
    return counts[:, 0] > 0


def _check(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if saliency.shape != masks.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and masks {tuple(masks.shape)} differ")
    return (masks.flatten(1) > 0).sum(1) == 0  # (B,) empty masks


def pointing_game(saliency: torch.Tensor, masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(B,) hit score in [0, 1] per image: 1 when the maximum of saliency (B, S, S) lies in masks (B, S, S)
    (nonzero = evidence) grown by a disk of radius `tolerance` px; the in-mask share of tied maxima when there
    are ties; NaN for an empty mask."""
    empty = _check(saliency, masks)
    evidence = grow_by_disk(masks > 0, tolerance)                    # (B, S, S)
    flat = saliency.flatten(1)
    is_max = flat == flat.amax(dim=1, keepdim=True)                  # (B, S*S)
    hits = (is_max & evidence.flatten(1)).sum(1).float() / is_max.sum(1).float()
    return torch.where(empty, torch.full_like(hits, float("nan")), hits)


def relevance_mass(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) share in [0, 1] of the mass of saliency (B, S, S), values >= 0, inside masks (B, S, S); a map with no
    mass scores the mask's area share (uniform); NaN for an empty mask."""
    empty = _check(saliency, masks)
    inside = (masks > 0).flatten(1).float()                          # (B, S*S)
    flat = saliency.flatten(1).float().clamp_min(0)
    total = flat.sum(1)
    share = torch.where(total > 0, (flat * inside).sum(1) / total.clamp_min(1e-12), inside.mean(1))
    return torch.where(empty, torch.full_like(share, float("nan")), share)
