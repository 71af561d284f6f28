"""Two maps that any real explanation must beat: they never look at the model.

- RandomMap: seeded uniform noise on the final feature map's grid (the same maps on every run), upsampled: the
  chance level of every score.
- EdgeMap: the Sobel gradient magnitude of the grey image. Adebayo et al. (2018) showed that several saliency
  methods are close to an edge detector; a method that does not beat this map explains the image, not the model.
Both pass the sanity check's "does the map change with the weights?" question with "no", as they must.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_cnn.explain.base import Explainer
from attention_cnn.model import feature_size

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


class RandomMap(Explainer):
    name = "random"

    def __init__(self, seed: int):
        self.seed = seed

    def raw(self, model, images, targets):
        # A fresh generator per call: the same images get the same noise however often they are explained.
        h, w = feature_size(images.shape[-2]), feature_size(images.shape[-1])
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(images.shape[0], h, w, generator=generator).to(images.device)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (B, S, S) Sobel gradient magnitude of the grey image, replicate padding."""
    grey = images.float().mean(dim=1, keepdim=True)                       # (B, 1, S, S)
    kernels = torch.stack([SOBEL_X, SOBEL_X.T])[:, None].to(grey)          # (2, 1, 3, 3): d/dx, d/dy
    grads = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)  # (B, 2, S, S)
    return grads.pow(2).sum(dim=1).sqrt()


class EdgeMap(Explainer):
    name = "edge"

    def raw(self, model, images, targets):
        return sobel_magnitude(images)
