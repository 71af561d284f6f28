"""The sanity check: cascading model-parameter randomisation (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018).

The layers are randomised one after the other from the top (the last layer the forward pass runs) down, and
after each step every method's maps are compared with its maps of the intact model by the Spearman rank
correlation over pixels, averaged over images. A method that explains the MODEL must change when the weights
it explains are gone: its correlation falls towards 0. A map that stays correlated explains the image (an edge
detector would), whatever it looks like.

- A layer is every module that owns parameters itself, in the order the model registers them, reversed; so a
  bare `nn.Parameter` such as `ConvAttention.scale` is a layer of its own module, and every parameter of the
  model is randomised by the last step (checked).
- Randomising a tensor draws it from a Gaussian with the tensor's own mean and standard deviation (a tensor
  whose entries are all equal takes |mean|, or 1 for zeros, as its deviation): each layer keeps its scale, so
  activations stay in range, and loses what it learned. Buffers (batch-norm statistics, the input
  normalisation) are not learned by gradient and are left alone.
- The class each map explains stays the one the intact model predicted.
- A map that becomes constant ranks nothing: its correlation is taken as 0 (it kept none of the ranking).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from attention_cnn.explain.base import Explainer


@dataclass(frozen=True)
class Cascade:
    layers: list[str]                      # the layers in the order randomised, top first
    correlation: dict[str, list[float]]    # method -> [1.0, after 1 layer, ..., after all layers]


def parameter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that owns parameters directly, top layer first."""
    owners = [(name, module) for name, module in model.named_modules() if list(module.parameters(recurse=False))]
    return owners[::-1]


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter the module owns directly (see the module docstring)."""
    for param in module.parameters(recurse=False):
        flat = param.detach().float().flatten()
        std = float(flat.std()) if flat.numel() > 1 else 0.0
        if not std > 0:
            std = abs(float(flat.mean())) or 1.0
        noise = torch.randn(param.shape, generator=generator).to(param.device)
        param.copy_((float(flat.mean()) + std * noise).to(param.dtype))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N,) ranks from 0, tied values sharing their average rank."""
    order = x.argsort(stable=True)
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() + 1) / 2           # mean of positions start .. end - 1
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) maps -> (B,) Spearman rank correlation of each pair over pixels (ties averaged); 0 where either
    map is constant."""
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        ra, rb = _average_ranks(a[i].flatten().cpu()), _average_ranks(b[i].flatten().cpu())
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = (ra.norm() * rb.norm()).item()
        out[i] = (ra @ rb).item() / denominator if denominator > 0 else 0.0
    return out


def cascading_randomization(model: nn.Module, methods: list[Explainer], images: torch.Tensor,
                            targets: torch.Tensor, seed: int) -> Cascade:
    """Mean Spearman correlation of each method's maps with its intact-model maps after each cascade step."""
    model = copy.deepcopy(model).eval()
    originals = {m.name: m(model, images, targets) for m in methods}
    layers = parameter_layers(model)
    generator = torch.Generator().manual_seed(seed)
    correlation = {m.name: [1.0] for m in methods}
    for _, module in layers:
        randomize_(module, generator)
        for method in methods:
            maps = method(model, images, targets)
            correlation[method.name].append(float(spearman(maps, originals[method.name]).mean()))
    return Cascade(layers=[name for name, _ in layers], correlation=correlation)
