"""Uncertainty over images: is 0.285 against 0.261 on 60 images a difference, or noise?

- `bootstrap_ci`: the mean of per-image scores with a 95 % percentile bootstrap interval (Efron & Tibshirani
  1993): images are resampled with replacement `BOOTSTRAP` times, the interval is the 2.5 and 97.5 percentiles
  of the resampled means. Images with no score (NaN: an empty ground-truth mask) are left out.
- `paired_p_value`: a paired bootstrap test of two methods scored on the same images. The per-image differences
  are centred on zero (the null hypothesis: no difference on average), resampled, and the two-sided p-value is
  the share of resampled mean differences at least as far from zero as the observed one. Paired, because the
  images vary far more than the methods do: an unpaired test would drown the difference in image variance.
  Chosen over Wilcoxon's signed-rank test because it tests the mean, the number the tables report.
- Below MIN_IMAGES scored images neither is computed (NaN): resampling one image gives an interval of width 0
  and p = 1/2001 whatever the scores, and a handful of images gives numbers that look precise and are not.
All seeded, vectorised on tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BOOTSTRAP = 2000
LEVEL = 0.95
MIN_IMAGES = 10  # fewest scored images for an interval or a p-value


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _resampled_means(values: torch.Tensor, seed: int, samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, values.numel(), (samples, values.numel()), generator=generator)
    return values[picks].mean(dim=1)  # (samples,)


def bootstrap_ci(values: torch.Tensor, seed: int = 0, samples: int = BOOTSTRAP, level: float = LEVEL) -> Interval:
    """Mean of the finite entries of values (N,) and its percentile bootstrap interval; all NaN for none, the
    interval NaN for fewer than MIN_IMAGES."""
    finite = values.double()[~values.isnan()]
    nan = float("nan")
    if finite.numel() == 0:
        return Interval(nan, nan, nan)
    if finite.numel() < MIN_IMAGES:
        return Interval(float(finite.mean()), nan, nan)
    means = _resampled_means(finite, seed, samples)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return Interval(mean=float(finite.mean()), low=low, high=high)


def paired_p_value(a: torch.Tensor, b: torch.Tensor, seed: int = 0, samples: int = BOOTSTRAP) -> float:
    """Two-sided paired bootstrap p-value of mean(a - b) = 0, over images where both are finite; NaN for fewer
    than MIN_IMAGES."""
    diff = (a.double() - b.double())
    diff = diff[~diff.isnan()]
    if diff.numel() < MIN_IMAGES:
        return float("nan")
    observed = diff.mean()
    null = _resampled_means(diff - observed, seed, samples)
    # +1 in both counts: the observed sample is one of the samples, so p is never exactly 0.
    return float(((null.abs() >= observed.abs() - 1e-12).sum() + 1) / (samples + 1))
