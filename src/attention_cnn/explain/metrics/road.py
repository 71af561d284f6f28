"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, ICML 2022).

Deletion with a constant fill leaks: the outline of the filled region, not the pixels it removed, can tell the
class (the sample model reads the mean colour alone as "mountain" at 0.97). ROAD fills removed pixels by noisy
linear imputation instead: each removed pixel becomes the weighted mean of its 8 neighbours (weight 1/6 for the
4 direct ones, 1/12 for the diagonals; only neighbours inside the image count), known pixels fixed, and then
Gaussian noise (sigma 0.01 on the [0, 1] scale) is added to the imputed pixels, so the outline of the removed
set carries no information (the paper's `NoisyLinearImputer`, also pytorch-grad-cam's, tested equal).

That is a sparse linear system per image: for removed pixels U, (D - W_UU) x_U = W_UK x_K, with D the summed
weights of each pixel's in-image neighbours. Every connected part of U touches a known pixel when any pixel is
known, so D - W_UU is symmetric positive definite: solved here for all images and channels at once by
conjugate gradients with a Jacobi preconditioner, the operator a 3x3 convolution (`impute`), not pixel by pixel.

Removal fractions 10, 20, ..., 90 % of the pixels, in both orders: MoRF (most relevant first: the score should
fall, LOWER is better) and LeRF (least relevant first: the score should stay, HIGHER is better). The score is
the probability of the class the model predicts on the intact image. One number per image summarises both, as
pytorch-grad-cam's ROADCombined does: road = mean over fractions of (LeRF - MoRF) / 2, in [-0.5, 0.5], HIGHER
is better, 0 for a map that ranks pixels no better than chance would on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention_cnn.explain.metrics.deletion_insertion import ScoreFn, saliency_rank

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NOISE = 0.01
# The 8-neighbour weights of the ROAD paper: direct neighbours 1/6, diagonal 1/12 (centre unused).
NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
TOLERANCE = 1e-4   # conjugate gradients stops when no Jacobi step would move a pixel by more than this
IMPUTE_CHUNK = 256  # images imputed together
MAX_ITERATIONS = (50, 2)
CHECK_EVERY = 4  # iterations between convergence checks (each drops the converged systems)  # ... or after 50 + 2 S iterations (CG on an S x S grid converges in O(S))


@dataclass(frozen=True)
class RoadResult:
    morf: torch.Tensor  # (fractions, B) score after removing the most relevant fraction
    lerf: torch.Tensor  # (fractions, B) score after removing the least relevant fraction
    road: torch.Tensor  # (B,) mean over fractions of (lerf - morf) / 2


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """(M, C, S, S) -> (M, C, S, S): the weighted sum of each pixel's in-image neighbours (zero padding). Eight
    shifted adds: on the CPU several times faster than a 3x3 convolution with one channel per group."""
    S = x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1))
    total = torch.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            weight = float(NEIGHBOURS[dy, dx])
            if weight:
                total.add_(padded[..., dy:dy + S, dx:dx + S], alpha=weight)
    return total


def _push_pull(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A smooth fill of the holes (weights 0) of values (M, C, S, S) from a pyramid of weighted means: the start
    of conjugate gradients, close to the solution on large holes where CG's first steps move slowly."""
    if min(values.shape[-2:]) <= 1 or bool((weights > 0).all()):
        return values
    coarse_w = F.avg_pool2d(weights, 2, ceil_mode=True)
    coarse = F.avg_pool2d(values * weights, 2, ceil_mode=True) / coarse_w.clamp_min(1e-12)
    up = F.interpolate(_push_pull(coarse, coarse_w), size=values.shape[-2:], mode="bilinear", align_corners=False)
    return weights * values + (1 - weights) * up


def impute(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Linear imputation without noise: images (M, C, S, S), removed (M, S, S) bool -> images whose removed pixels
    solve the ROAD system, all M * C systems at once by preconditioned conjugate gradients. Every CHECK_EVERY
    iterations the systems that have converged are dropped from the batch: small holes converge in a few
    iterations, large ones need O(S), and iterating all to the slowest cost 2-3x the work."""
    unknown = removed[:, None].to(images.dtype)                          # (M, 1, S, S)
    known = images * (1 - unknown)
    out = _push_pull(known, 1 - unknown) * unknown                       # (M, C, S, S) the start, then solution
    active = torch.arange(images.shape[0], device=images.device)       # systems still iterating
    u = unknown
    degree = _neighbour_sum(torch.ones_like(u))                          # (m, 1, S, S) in-image weights
    x = out
    r = _neighbour_sum(known) * u - (degree * x - _neighbour_sum(x)) * u  # b - A x
    z = r / degree
    p, rz = z, (r * z).sum((2, 3), keepdim=True)                         # (m, C, 1, 1)
    for step in range(MAX_ITERATIONS[0] + MAX_ITERATIONS[1] * images.shape[-1]):
        if step % CHECK_EVERY == 0:
            done = z.flatten(1).abs().amax(1) <= TOLERANCE               # (m,)
            if bool(done.any()):
                out[active[done]] = x[done]
                keep = ~done
                if not bool(keep.any()):
                    return known + out * unknown
                active, u, degree, x, r, z, p, rz = (t[keep] for t in (active, u, degree, x, r, z, p, rz))
        ap = (degree * p - _neighbour_sum(p)) * u                         # (D - W_UU) p on U, zero elsewhere
        alpha = rz / (p * ap).sum((2, 3), keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        z = r / degree
        rz_next = (r * z).sum((2, 3), keepdim=True)
        p = z + (rz_next / rz.clamp_min(1e-30)) * p
        rz = rz_next
    out[active] = x
    return known + out * unknown


def noisy_impute(images: torch.Tensor, removed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ROAD's noisy linear imputation: `impute`, then NOISE * noise (standard normal, like images) on the imputed
    pixels."""
    return impute(images, removed) + NOISE * noise * removed[:, None]


def road(score_fn: ScoreFn, images: torch.Tensor, targets: torch.Tensor, saliency: torch.Tensor, batch_size: int,
         seed: int, fractions: tuple[float, ...] = FRACTIONS) -> RoadResult:
    """MoRF and LeRF curves of `saliency` (B, S, S) on images (B, 3, S, S) in [0, 1]. (order, fraction, image)
    triples are imputed IMPUTE_CHUNK at a time and scored in batches of `batch_size`; the noise is seeded."""
    images = images.contiguous()  # the solver's shifted adds run fastest on plain layout (scoring may pass NHWC)
    num_images, pixels = images.shape[0], images.shape[-1] ** 2
    rank = saliency_rank(saliency.to(images.device))                     # (B, S*S), 0 = most relevant
    counts = torch.tensor([round(f * pixels) for f in fractions], device=images.device)
    total = 2 * len(fractions) * num_images
    chunk = max(batch_size, IMPUTE_CHUNK)  # CG's Python loop costs the same for 5 images as for 256
    scores = torch.empty(total, dtype=torch.float32)
    # One noise field per image, drawn once: the same map gets the same scores whatever the batch size.
    generator = torch.Generator(device=images.device).manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, device=images.device).to(images)  # (B, 3, S, S)
    for lo in range(0, total, chunk):
        triple = torch.arange(lo, min(lo + chunk, total), device=images.device)
        lerf, step, image = triple // (len(fractions) * num_images), (triple // num_images) % len(fractions), \
            triple % num_images
        threshold = torch.where(lerf.bool(), pixels - counts[step], counts[step])[:, None]
        r = rank[image]
        removed = torch.where(lerf.bool()[:, None], r >= threshold, r < threshold)  # (m, S*S)
        x = noisy_impute(images[image], removed.view(-1, *images.shape[-2:]), noise[image]).clamp(0, 1)
        probs = torch.cat([score_fn(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])
        scores[lo:lo + len(triple)] = probs.gather(1, targets[image][:, None]).squeeze(1).cpu()
    morf, lerf_scores = scores.view(2, len(fractions), num_images)
    return RoadResult(morf=morf, lerf=lerf_scores, road=((lerf_scores - morf) / 2).mean(0))
