"""What every explanation method shares: scaling to the image, and running gradients inside evaluation.

Shaped after pytorch-grad-cam's `BaseCAM`: a method overrides one function, `raw(model, images, targets)`, which
returns a (B, h, w) map on any grid and scale, larger = more important. Calling the method upsamples that map
bilinearly to the image and min-max scales each image's map to [0, 1], so every score and figure sees the same
kind of map and never asks which method made it. `targets` (B,) is the class each map explains: evaluation
passes the class the model predicts on the intact image.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, size, size), or (B, H, W) for size (H, W) (a 1 x 2 mosaic is not square), bilinear; a map
    already at that size is returned as float."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def scale_unit(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (B, ...) map to [0, 1]. A constant map carries no ranking and becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = hi - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.view_as(maps)


@contextlib.contextmanager
def gradients_on() -> Iterator[None]:
    """Evaluation runs under inference mode; gradient methods need a graph. Hooks that Captum registers inside are
    released by Captum itself (in `finally`), so a failing forward leaves none behind (tested)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


# On the CPU a forward of this many pixels at a time (5 images at 150 px, 32 at 64 px) keeps the activations in
# the cache: 2.2-2.4x the images per second of one batch of 256 (measured at 64 and 150 px on the 2-core CPU),
# and 1.5x for a forward with its backward. A GPU wants whole batches.
CACHE_PIXELS = 2**17


def cache_sized(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A batch (B, C, H, W) split for the forward passes that dominate evaluation (see CACHE_PIXELS)."""
    if images.device.type != "cpu":
        return (images,)
    return images.split(max(1, CACHE_PIXELS // (images.shape[-1] * images.shape[-2])))


def logits_of(model: nn.Module, split: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward function Captum calls: images -> (B, K) logits (our model returns a named tuple), in
    cache-sized pieces unless `split` is False (a layer method's hooks must see one forward per call)."""
    if not split:
        return lambda images: model(images).logits
    return lambda images: torch.cat([model(piece).logits for piece in cache_sized(images)])


def once_per_image(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`forward` run once per run of identical consecutive rows, its output repeated over the run: for methods
    without gradients. The grid pointing game explains each mosaic once per cell's class, so the batches that
    Occlusion perturbs hold every mosaic 4 times (2 x 2) in a row; without this they cost 4 forwards for one (a
    third of evaluate's time went to the mosaics' maps)."""
    def call(images: torch.Tensor) -> torch.Tensor:
        first = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        first[1:] = (images[1:] != images[:-1]).flatten(1).any(dim=1)
        return forward(images[first])[first.cumsum(0) - 1]
    return call


def plain(images: torch.Tensor) -> torch.Tensor:
    """A copy that autograd may use: tensors made under inference mode cannot enter a graph."""
    with torch.inference_mode(False):
        return images.detach().clone()


class Explainer:
    """Base class: `method(model, images, targets)` with images (B, 3, H, W) in [0, 1] -> (B, H, W) in [0, 1]."""

    name = "explainer"

    def raw(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, h, w) map on any grid, any scale; larger = more important."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return scale_unit(upsample(self.raw(model, images, targets).detach(), tuple(images.shape[-2:])))

    def positive(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, H, W) the positive part of the raw map at image size, not rescaled: the mass the grid pointing game
        shares out (Böhle et al. score positive attributions). Min-max scaling would shift a map whose minimum is
        not 0 (occlusion's negative drops, |IG|'s floor) and spread mass evenly over every cell."""
        return upsample(self.raw(model, images, targets).detach(), tuple(images.shape[-2:])).clamp_min(0)
