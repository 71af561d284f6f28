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
conjugate gradients, not pixel by pixel. Plain (Jacobi-preconditioned) CG needs O(S) iterations on the large
holes of the 80-90 % removals, so a 150 px image cost hundreds of iterations; a geometric multigrid V-cycle as
the preconditioner (`_Multigrid`) makes that about 7 whatever the side. Hand-written because neither torch nor
Captum solves batched sparse systems; tests/test_explain_scores.py checks it against a dense solve and
pytorch-grad-cam's imputer.

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
# CG stops when no Jacobi step would move a pixel by more than this: the imputation is then within 5e-4 of the
# exact solve (measured on 64 and 150 px test images, bench/evaluate.py), twenty times below ROAD's noise.
TOLERANCE = 1e-4
MAX_ITERATIONS = 100   # multigrid-preconditioned CG needs 5-10; the cap only bounds a pathological input
IMPUTE_PIXELS = 2**18  # pixels (x 3 channels) imputed together: fewer pay Python's cost per tensor op, more
#                        spill the caches (measured best at 64 and 150 px, 1.2x faster there than 2**20)
SMOOTHING = 0.8        # damped Jacobi, the multigrid smoother
COARSEST_SWEEPS = 20   # Jacobi sweeps that solve the coarsest grid (at most 3 x 3)


@dataclass(frozen=True)
class RoadResult:
    morf: torch.Tensor  # (fractions, B) score after removing the most relevant fraction
    lerf: torch.Tensor  # (fractions, B) score after removing the least relevant fraction
    road: torch.Tensor  # (B,) mean over fractions of (lerf - morf) / 2


def _binomial_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> the 3 x 3 sum with weights [1 2 1]^T [1 2 1] (zero outside the image): two separable passes,
    fewer tensor ops than eight shifted adds. The ROAD weights are this / 12, less the centre's 4/12."""
    padded = F.pad(x, (1, 1, 1, 1))
    rows = padded[..., :-2, :] + padded[..., 2:, :]
    rows.add_(padded[..., 1:-1, :], alpha=2)
    total = rows[..., :-2] + rows[..., 2:]
    return total.add_(rows[..., 1:-1], alpha=2)


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> the ROAD-weighted sum of each pixel's in-image neighbours."""
    return _binomial_sum(x).div_(12).sub_(x, alpha=1 / 3)


class _Grid:
    """One level of the multigrid: the ROAD operator (D - W) restricted to the unknown pixels `unknown`
    (M, 1, H, W) in {0, 1}, zero elsewhere; the same weights on every level (cell-centred bilinear transfer makes
    the coarse operator about the fine one's Galerkin projection). `apply` is written as
    unknown * ((D + 1/3) x - binomial(x) / 12): two fused passes after the stencil."""

    def __init__(self, unknown: torch.Tensor):
        self.unknown = unknown
        degree = _neighbour_sum(torch.ones_like(unknown))
        self.centre = unknown * (degree + 1 / 3)
        self.side = unknown / 12
        self.smoother = unknown * (SMOOTHING / degree)  # a damped Jacobi step is smoother * residual

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.centre * x, self.side, _binomial_sum(x), value=-1)

    def select(self, keep: torch.Tensor) -> _Grid:
        grid = _Grid.__new__(_Grid)
        grid.unknown, grid.centre, grid.side, grid.smoother = (self.unknown[keep], self.centre[keep],
                                                               self.side[keep], self.smoother[keep])
        return grid


def _interpolate(coarse: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Cell-centred bilinear interpolation to twice the side, edges held, cropped to `shape` (odd sides)."""
    h, w = coarse.shape[-2:]
    return F.interpolate(coarse, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)[..., :shape[-2],
                                                                                              :shape[-1]]


def _restrict_1d(fine: torch.Tensor, size: int) -> torch.Tensor:
    """Along the last axis: the exact transpose of `_interpolate`'s weights (3/4 from the nearest coarse pixel,
    1/4 from the next, edges held), so the V-cycle is symmetric, as CG needs. Tested against autograd."""
    fine = F.pad(fine, (0, 2 * size - fine.shape[-1]))
    even, odd = fine[..., 0::2], fine[..., 1::2]
    coarse = (even + odd).mul_(0.75)
    coarse[..., :-1].add_(even[..., 1:], alpha=0.25)
    coarse[..., 1:].add_(odd[..., :-1], alpha=0.25)
    coarse[..., :1].add_(even[..., :1], alpha=0.25)
    coarse[..., -1:].add_(odd[..., -1:], alpha=0.25)
    return coarse


def _restrict(fine: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rows = _restrict_1d(fine, shape[-1])
    return _restrict_1d(rows.transpose(-1, -2), shape[-2]).transpose(-1, -2)


class _Multigrid:
    """The V-cycle preconditioner: grids of half the side down to 3 x 3 or less. A coarse pixel is unknown when
    its 2 x 2 children all are (a known child pins it, so scattered known pixels stay constraints on every
    level); a missing child at an odd edge copies its neighbour, so the image's border stays a free edge."""

    def __init__(self, unknown: torch.Tensor):
        self.grids = [_Grid(unknown)]
        while min(unknown.shape[-2:]) > 3:
            h, w = unknown.shape[-2:]
            unknown = -F.max_pool2d(-F.pad(unknown, (0, w % 2, 0, h % 2), mode="replicate"), 2)
            if not bool(unknown.any()):
                break
            self.grids.append(_Grid(unknown))

    def select(self, keep: torch.Tensor) -> _Multigrid:
        multigrid = _Multigrid.__new__(_Multigrid)
        multigrid.grids = [grid.select(keep) for grid in self.grids]
        return multigrid

    def __call__(self, residual: torch.Tensor, level: int = 0) -> torch.Tensor:
        """An approximate solve of A x = residual, symmetric as CG needs: on coarse grids damped Jacobi, the
        next grid's correction, Jacobi again (the same smoother before and after)."""
        grid = self.grids[level]
        x = residual * grid.smoother
        if level + 1 == len(self.grids):
            for _ in range(COARSEST_SWEEPS - 1):
                x.addcmul_(residual - grid.apply(x), grid.smoother)
            return x
        coarse = self.grids[level + 1]
        if level == 0:
            # On the finest grid the Jacobi step and the coarse correction are added, not chained (additive
            # multigrid): it saves the finest grid's two operator applications per iteration, the costliest part
            # of the solve, and costs CG about one more iteration (25 % faster on 150 px holes).
            correction = self(_restrict(residual, coarse.unknown.shape).mul_(coarse.unknown), 1)
            return x.addcmul_(_interpolate(correction, x.shape), grid.unknown)
        correction = self(_restrict(residual - grid.apply(x), coarse.unknown.shape).mul_(coarse.unknown), level + 1)
        x.addcmul_(_interpolate(correction, x.shape), grid.unknown)
        return x.addcmul_(residual - grid.apply(x), grid.smoother)


def _push_pull(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A smooth fill of the holes (weights 0) of values (M, C, S, S) from a pyramid of weighted means: the start
    of conjugate gradients, close to the solution on large holes."""
    if min(values.shape[-2:]) <= 1 or bool((weights > 0).all()):
        return values
    coarse_w = F.avg_pool2d(weights, 2, ceil_mode=True)
    coarse = F.avg_pool2d(values * weights, 2, ceil_mode=True) / coarse_w.clamp_min(1e-12)
    up = F.interpolate(_push_pull(coarse, coarse_w), size=values.shape[-2:], mode="bilinear", align_corners=False)
    return weights * values + (1 - weights) * up


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, C, H, W) x 2 -> (M, C, 1, 1): one inner product per image and channel."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[..., None, None]


def _impute_chunk(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    unknown = removed[:, None].to(images.dtype)                          # (M, 1, S, S)
    known = images * (1 - unknown)
    out = _push_pull(known, 1 - unknown) * unknown                       # (M, C, S, S) the start, then solution
    preconditioner = _Multigrid(unknown)
    fine = preconditioner.grids[0]
    active = torch.arange(images.shape[0], device=images.device)       # systems still iterating
    x = out
    r = _neighbour_sum(known).mul_(unknown) - fine.apply(x)              # b - A x
    z = preconditioner(r)
    p, rz = z, _dot(r, z)                                                 # (m, C, 1, 1)
    for _ in range(MAX_ITERATIONS):
        # Dropping converged systems: small holes converge in 2-3 iterations, the largest in about 10.
        done = (r * fine.smoother).flatten(1).abs().amax(1) <= SMOOTHING * TOLERANCE  # (m,)
        if bool(done.any()):
            out[active[done]] = x[done]
            keep = ~done
            if not bool(keep.any()):
                return known + out * unknown
            preconditioner = preconditioner.select(keep)
            fine = preconditioner.grids[0]
            active, x, r, p, rz = (t[keep] for t in (active, x, r, p, rz))
        ap = fine.apply(p)
        alpha = rz / _dot(p, ap).clamp_min(1e-30)
        x = x.addcmul(alpha, p)
        r = r.addcmul(alpha, ap, value=-1)
        z = preconditioner(r)
        rz_next = _dot(r, z)
        p = z.addcmul(rz_next / rz.clamp_min(1e-30), p)
        rz = rz_next
    out[active] = x
    return known + out * unknown


def impute(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Linear imputation without noise: images (M, C, S, S), removed (M, S, S) bool -> images whose removed pixels
    solve the ROAD system, by multigrid-preconditioned conjugate gradients, IMPUTE_PIXELS at a time."""
    chunk = max(1, IMPUTE_PIXELS // (images.shape[-1] * images.shape[-2]))
    return torch.cat([_impute_chunk(images[i:i + chunk], removed[i:i + chunk])
                      for i in range(0, images.shape[0], chunk)])


def noisy_impute(images: torch.Tensor, removed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ROAD's noisy linear imputation: `impute`, then NOISE * noise (standard normal, like images) on the imputed
    pixels."""
    return impute(images, removed) + NOISE * noise * removed[:, None]


def road(score_fn: ScoreFn, images: torch.Tensor, targets: torch.Tensor, saliency: torch.Tensor, batch_size: int,
         seed: int, fractions: tuple[float, ...] = FRACTIONS) -> RoadResult:
    """MoRF and LeRF curves of `saliency` (B, S, S) on images (B, 3, S, S) in [0, 1]. (order, fraction, image)
    triples are imputed and scored `batch_size` at a time; the noise is seeded."""
    images = images.contiguous()  # the solver's stencils run fastest on plain layout (scoring may pass NHWC)
    num_images, pixels = images.shape[0], images.shape[-1] ** 2
    rank = saliency_rank(saliency.to(images.device))                     # (B, S*S), 0 = most relevant
    counts = torch.tensor([round(f * pixels) for f in fractions], device=images.device)
    total = 2 * len(fractions) * num_images
    scores = torch.empty(total, dtype=torch.float32)
    # One noise field per image, drawn once: the same map gets the same scores whatever the batch size.
    generator = torch.Generator(device=images.device).manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, device=images.device).to(images)  # (B, 3, S, S)
    for lo in range(0, total, batch_size):  # imputed together (impute splits further), then scored at once
        triple = torch.arange(lo, min(lo + batch_size, total), device=images.device)
        lerf, step, image = triple // (len(fractions) * num_images), (triple // num_images) % len(fractions), \
            triple % num_images
        threshold = torch.where(lerf.bool(), pixels - counts[step], counts[step])[:, None]
        r = rank[image]
        removed = torch.where(lerf.bool()[:, None], r >= threshold, r < threshold)  # (m, S*S)
        x = noisy_impute(images[image], removed.view(-1, *images.shape[-2:]), noise[image]).clamp(0, 1)
        probs = score_fn(x).float()                                      # (m, K)
        scores[lo:lo + len(triple)] = probs.gather(1, targets[image][:, None]).squeeze(1).cpu()
    morf, lerf_scores = scores.view(2, len(fractions), num_images)
    return RoadResult(morf=morf, lerf=lerf_scores, road=((lerf_scores - morf) / 2).mean(0))
