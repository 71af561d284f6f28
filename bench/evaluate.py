"""The evaluate stage's wall time at default params, and ROAD's imputation against plain CG.

    .venv/bin/python bench/evaluate.py                    # 64 and 150 px: about 10 min on the 2-core CPU
    .venv/bin/python bench/evaluate.py --img-size 64 --solver-images 4

For each img_size: a scratch workspace with params.yaml's defaults at that size runs the real stage scripts
(sample, prepare, train, then evaluate, timed as a whole process, imports included: what `dvc repro` waits for).
Then, on the first test images of that workspace and smooth random maps (the large blobs of removed pixels that
Grad-CAM-like maps make, the solver's hard case), the 18 ROAD removal sets per image are imputed twice in the
same process: by the library (multigrid-preconditioned CG) and by the Jacobi-preconditioned CG it replaced (the
baseline, below), each compared with a tight multigrid solve in float64.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from attention_cnn.data.prepared import load_split
from attention_cnn.explain.metrics import road
from attention_cnn.explain.metrics.deletion_insertion import saliency_rank

REPO = Path(__file__).resolve().parents[1]


def run_stage(name: str, workspace: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=workspace, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def jacobi_cg(images: torch.Tensor, removed: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """The baseline: CG with a Jacobi preconditioner from the same push-pull start, stopping like the library
    (no Jacobi step moves a pixel by more than `tolerance`), capped at 50 + 2 S iterations as before."""
    unknown = removed[:, None].to(images.dtype)
    known = images * (1 - unknown)
    degree = road._neighbour_sum(torch.ones_like(unknown))
    x = road._push_pull(known, 1 - unknown) * unknown
    r = road._neighbour_sum(known) * unknown - (degree * x - road._neighbour_sum(x)) * unknown
    z = r / degree * unknown
    p, rz = z, (r * z).sum((2, 3), keepdim=True)
    for _ in range(50 + 2 * images.shape[-1]):
        if float(z.abs().max()) <= tolerance:
            break
        ap = (degree * p - road._neighbour_sum(p)) * unknown
        alpha = rz / (p * ap).sum((2, 3), keepdim=True).clamp_min(1e-30)
        x, r = x + alpha * p, r - alpha * ap
        z = r / degree * unknown
        rz_next = (r * z).sum((2, 3), keepdim=True)
        p, rz = z + rz_next / rz.clamp_min(1e-30) * p, rz_next
    return known + x * unknown


def removal_sets(test_images: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(18 * count, 3, S, S) images and (18 * count, S, S) removed pixels: MoRF and LeRF at 10 ... 90 % of smooth
    random maps."""
    g = torch.Generator().manual_seed(seed)
    images = test_images[:count].float() / 255
    side = images.shape[-1]
    maps = F.interpolate(torch.rand(count, 1, 6, 6, generator=g), size=(side, side), mode="bilinear")[:, 0]
    rank, pixels = saliency_rank(maps), side * side
    removed = [rank >= pixels - round(f * pixels) if lerf else rank < round(f * pixels)
               for lerf in (False, True) for f in road.FRACTIONS]
    return images.repeat(len(removed), 1, 1, 1), torch.cat(removed).view(-1, side, side)


def compare_solvers(test_images: torch.Tensor, count: int) -> dict[str, float]:
    images, removed = removal_sets(test_images, count, seed=0)
    saved = road.TOLERANCE
    road.TOLERANCE = 1e-9
    try:
        exact = road.impute(images.double(), removed).float()
    finally:
        road.TOLERANCE = saved
    out = {}
    for name, solve in (("multigrid", road.impute), ("jacobi", jacobi_cg)):
        start = time.perf_counter()
        if name == "jacobi":  # chunked like the library, so only the preconditioner differs
            chunk = max(1, road.IMPUTE_PIXELS // images[0, 0].numel())
            filled = torch.cat([solve(images[i:i + chunk], removed[i:i + chunk]) for i in range(0, len(images), chunk)])
        else:
            filled = solve(images, removed)
        out[f"{name}_ms"] = (time.perf_counter() - start) / len(images) * 1000
        out[f"{name}_error"] = float((filled - exact).abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img-size", type=int, nargs="+", default=[64, 150])
    parser.add_argument("--solver-images", type=int, default=8, help="test images whose 18 removal sets are imputed")
    args = parser.parse_args()
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    print("| img_size | sample + prepare + train | evaluate (whole stage) | ROAD imputation per removal set: "
          "multigrid CG / Jacobi CG (ms) | max error vs exact: multigrid / Jacobi |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.img_size:
        with tempfile.TemporaryDirectory(prefix=f"bench-evaluate-{size}-") as scratch:
            workspace = Path(scratch)
            (workspace / "params.yaml").write_text(yaml.safe_dump({**defaults, "img_size": size}, sort_keys=False))
            before = sum(run_stage(name, workspace) for name in ("sample", "prepare", "train"))
            evaluate_s = run_stage("evaluate", workspace)
            solvers = compare_solvers(load_split(workspace / "data/prepared", "test").images, args.solver_images)
        print(f"| {size} | {before:.0f} s | **{evaluate_s:.1f} s** | {solvers['multigrid_ms']:.1f} / "
              f"{solvers['jacobi_ms']:.1f} | {solvers['multigrid_error']:.1e} / {solvers['jacobi_error']:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
