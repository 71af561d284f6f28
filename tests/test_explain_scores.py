"""ROAD, relevance mass and the statistics on hand-made cases whose answers are known: the imputation against a
direct dense solve and pytorch-grad-cam's imputer, maps that point exactly at the evidence, their reverse, a
constant map, and bootstrap intervals against a known distribution."""

import pytest
import torch

from attention_cnn.explain.metrics.pointing import relevance_mass
from attention_cnn.explain.metrics.road import NEIGHBOURS, impute, road
from attention_cnn.explain.statistics import bootstrap_ci, paired_p_value


def dense_imputation(image: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The ROAD system written out pixel by pixel and solved directly: each removed pixel equals the weighted
    mean of its in-image neighbours. image (C, H, W) float64, removed (H, W) bool."""
    H, W = removed.shape
    unknown = [(i, j) for i in range(H) for j in range(W) if removed[i, j]]
    index = {p: k for k, p in enumerate(unknown)}
    A = torch.zeros(len(unknown), len(unknown), dtype=torch.float64)
    b = torch.zeros(len(unknown), image.shape[0], dtype=torch.float64)
    for k, (i, j) in enumerate(unknown):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                w = float(NEIGHBOURS[di + 1, dj + 1])
                ni, nj = i + di, j + dj
                if w == 0 or not (0 <= ni < H and 0 <= nj < W):
                    continue
                A[k, k] += w
                if removed[ni, nj]:
                    A[k, index[(ni, nj)]] -= w
                else:
                    b[k] += w * image[:, ni, nj]
    out = image.clone()
    solution = torch.linalg.solve(A, b)                    # (unknowns, C)
    for k, (i, j) in enumerate(unknown):
        out[:, i, j] = solution[k]
    return out


def test_the_batched_imputation_equals_a_dense_solve_and_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 9, 9, generator=g, dtype=torch.float64)
    removed = torch.rand(3, 9, 9, generator=g) < torch.tensor([0.2, 0.6, 0.9])[:, None, None]
    removed[2, :5, :5] = True                              # a large hole
    ours = impute(images, removed)
    for i in range(3):
        # Within 1e-3, ten times below the noise ROAD adds (CG stops when no Jacobi step moves a pixel by 1e-4).
        torch.testing.assert_close(ours[i], dense_imputation(images[i], removed[i]), atol=1e-3, rtol=0)
        library = NoisyLinearImputer(noise=0)(images[i].float(), (~removed[i]).float())
        torch.testing.assert_close(ours[i].float(), library, atol=1e-3, rtol=0)
    assert torch.equal(ours[~removed[:, None].expand_as(ours)], images[~removed[:, None].expand_as(images)])


def test_the_multigrid_imputation_equals_a_dense_solve_on_large_holes_and_odd_sides():
    """The 80-90 % removals of ROAD: one big hole, and a smooth map's blobs, on a side that halves to odd sizes
    (37 -> 19 -> 10 -> 5 -> 3), where the coarse grids must keep the image's border a free edge."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 37, 37, generator=g, dtype=torch.float64)
    removed = torch.zeros(3, 37, 37, dtype=torch.bool)
    removed[0, 2:, :] = True                                             # only two rows known
    smooth = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 5, generator=g), size=(37, 37), mode="bilinear")
    removed[1] = smooth[0, 0] > smooth.quantile(0.1)                     # 90 % removed, in blobs
    removed[2] = torch.rand(37, 37, generator=g) < 0.9                   # 90 % removed, scattered
    ours = impute(images, removed)
    for i in range(3):
        torch.testing.assert_close(ours[i], dense_imputation(images[i], removed[i]), atol=1e-3, rtol=0)


def test_the_multigrid_restriction_is_the_transpose_of_its_interpolation():
    """CG needs a symmetric preconditioner: the V-cycle's restriction must be exactly the interpolation's
    transpose (autograd's vector-Jacobian product of it), on even and odd sides."""
    from attention_cnn.explain.metrics.road import _interpolate, _restrict

    g = torch.Generator().manual_seed(2)
    for fine_side, coarse_side in ((16, 8), (15, 8), (5, 3)):
        coarse = torch.rand(2, 3, coarse_side, coarse_side, generator=g, dtype=torch.float64, requires_grad=True)
        fine = torch.rand(2, 3, fine_side, fine_side, generator=g, dtype=torch.float64)
        (vjp,) = torch.autograd.grad(_interpolate(coarse, fine.shape), coarse, fine)
        torch.testing.assert_close(_restrict(fine, coarse.shape), vjp, atol=1e-12, rtol=0)


def evidence_score(images: torch.Tensor) -> torch.Tensor:
    """A 'model' that reads only the left half of channel 0: p(class 0) = its mean brightness."""
    p = images[:, 0, :, :images.shape[-1] // 2].mean(dim=(1, 2)).clamp(0, 1)
    return torch.stack([p, 1 - p], dim=1)


def test_road_ranks_the_exact_map_over_a_constant_map_over_its_reverse():
    S = 8
    images = torch.zeros(1, 3, S, S)
    images[..., :S // 2] = 1.0                             # the evidence: the left half, bright
    exact = torch.zeros(1, S, S)
    exact[..., :S // 2] = 1.0
    targets = torch.zeros(1, dtype=torch.long)
    results = {name: road(evidence_score, images, targets, m, batch_size=7, seed=0)
               for name, m in {"exact": exact, "reverse": 1 - exact, "constant": torch.zeros(1, S, S)}.items()}
    half = 4  # fraction 0.5: index 4 of 0.1 ... 0.9
    assert results["exact"].morf[half, 0] == pytest.approx(0.0, abs=0.02)  # evidence gone, imputed from the dark
    assert results["exact"].lerf[half, 0] == 1.0                            # evidence untouched
    assert results["reverse"].morf[half, 0] == 1.0
    assert results["reverse"].lerf[half, 0] == pytest.approx(0.0, abs=0.02)
    road_of = {name: float(r.road[0]) for name, r in results.items()}
    assert road_of["exact"] > 0.2 and road_of["reverse"] < -0.2
    assert road_of["exact"] > road_of["constant"] > road_of["reverse"]
    again = road(evidence_score, images, targets, exact, batch_size=3, seed=0)  # the noise is seeded, per image
    torch.testing.assert_close(again.morf, results["exact"].morf, atol=1e-3, rtol=0)


def test_relevance_mass_of_exact_reverse_constant_and_empty():
    mask = torch.zeros(4, 6, 6)
    mask[:3, :, :2] = 1                                    # a third of the image; the last mask is empty
    exact = mask.clone()
    exact[3] = 1
    share = relevance_mass(torch.stack([exact[0], 1 - mask[1], torch.zeros(6, 6), exact[3]]), mask)
    assert share[:3].tolist() == pytest.approx([1.0, 0.0, 1 / 3])
    assert share[3].isnan()


def test_bootstrap_interval_matches_the_normal_theory_and_covers_95_percent():
    g = torch.Generator().manual_seed(0)
    sigma, n = 0.1, 400
    values = 0.5 + sigma * torch.randn(n, generator=g)
    interval = bootstrap_ci(values, seed=1)
    assert interval.mean == pytest.approx(float(values.double().mean()))
    assert interval.half_width == pytest.approx(1.96 * sigma / n ** 0.5, rel=0.1)
    # Coverage of the true mean over repeated samples of 60 (the evaluate stage's count) from a skewed law.
    covered = 0
    for rep in range(100):
        sample = torch.empty(60, dtype=torch.float64).exponential_(generator=g)  # true mean 1
        ci = bootstrap_ci(sample, seed=rep, samples=500)
        covered += ci.low <= 1.0 <= ci.high
    assert 0.85 <= covered / 100 <= 1.0  # 95 % nominal; 100 draws give +-4.4 % of binomial spread
    assert bootstrap_ci(torch.tensor([float("nan"), 1.0, 3.0]), seed=0).mean == 2.0  # NaN images left out


def test_paired_test_agrees_with_the_t_test_and_finds_a_real_difference():
    from scipy.stats import ttest_rel

    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g, dtype=torch.float64)
    a = base + 0.15 * torch.randn(200, generator=g, dtype=torch.float64) + 0.02
    p = paired_p_value(a, base, seed=0, samples=4000)
    assert p == pytest.approx(ttest_rel(a.numpy(), base.numpy()).pvalue, abs=0.03)
    assert paired_p_value(base + 0.1, base + 0.1 * torch.randn(200, generator=g, dtype=torch.float64)) < 0.001
    assert paired_p_value(base, base) == 1.0
