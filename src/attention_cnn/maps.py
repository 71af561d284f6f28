"""Saliency maps behind one interface, so evaluation never asks which kind of map it got.

Shaped after pytorch-grad-cam: a small base class holds what every method shares (upsampling to the image,
scaling to [0, 1]); each method overrides one function, `raw(model, images) -> (B, h, w)` on the final feature
map's grid. Calling a map returns (B, S, S) heat maps in [0, 1] at image resolution:
- AttentionMap: the model's learned mask, averaged over channels (`out.mask.mean(1)`);
- GradCAM (Selvaraju et al. 2017) on the same layer, the final conv feature map (the output of `model.trunk`),
  for the predicted class; its hook is registered and released by a context manager;
- RandomMap: seeded uniform noise on the same grid, the baseline any real map must beat.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention_cnn.model import AttentionCNN, feature_size


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w) -> (B, size, size), bilinear."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def scale_unit(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (B, ...) map to [0, 1]. A constant map carries no ranking and becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = hi - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.view_as(maps)


class SaliencyMap:
    """Base class: `map(model, images)` with images (B, 3, S, S) in [0, 1] -> (B, S, S) in [0, 1]."""

    name = "saliency"

    def raw(self, model: AttentionCNN, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) map on the feature grid, any scale; larger = more important."""
        raise NotImplementedError

    def __call__(self, model: AttentionCNN, images: torch.Tensor) -> torch.Tensor:
        return scale_unit(upsample(self.raw(model, images), images.shape[-1]))


class AttentionMap(SaliencyMap):
    """The learned attention mask, averaged over channels."""

    name = "attention"

    def raw(self, model, images):
        with torch.no_grad():
            return model(images).mask.float().mean(dim=1)  # (B, h, w)


class ActivationHook:
    """Context manager: record a module's forward output while inside, and always release the hook on exit.

    Leaked hooks were pytorch-grad-cam's most reported bug; `with` makes the release impossible to forget.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.activation: torch.Tensor | None = None
        self._handle = None

    def _record(self, module, inputs, output):
        self.activation = output

    def __enter__(self) -> ActivationHook:
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


def final_feature_layer(model: AttentionCNN) -> nn.Module:
    """The module whose output is `AttentionOutput.features`: the conv trunk."""
    return model.trunk


class GradCAM(SaliencyMap):
    """Grad-CAM for the predicted class: ReLU(sum_c mean_hw(d logit / d A_c) * A_c) on the target layer."""

    name = "gradcam"

    def __init__(self, target_layer: Callable[[nn.Module], nn.Module] = final_feature_layer):
        self.target_layer = target_layer

    def raw(self, model, images):
        # Evaluation runs under no_grad/inference_mode; Grad-CAM needs a graph from the logits to the layer.
        with torch.inference_mode(False), torch.enable_grad(), ActivationHook(self.target_layer(model)) as hook:
            logits = model(images.clone()).logits                        # (B, K)
            predicted = logits.argmax(dim=1, keepdim=True)                # (B, 1)
            score = logits.gather(1, predicted).sum()                     # images are independent in eval mode
            (grads,) = torch.autograd.grad(score, hook.activation)        # (B, C, h, w)
            activation = hook.activation.detach()
        weights = grads.float().mean(dim=(2, 3), keepdim=True)            # (B, C, 1, 1)
        return F.relu((weights * activation.float()).sum(dim=1))          # (B, h, w)


class RandomMap(SaliencyMap):
    """Uniform noise on the feature grid, from its own seeded generator (the same maps on every run)."""

    name = "random"

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def raw(self, model, images):
        size = feature_size(images.shape[-1])
        noise = torch.rand(images.shape[0], size, size, generator=self.generator)
        return noise.to(images.device)
