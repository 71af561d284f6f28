"""Benchmark the prepare stage against a plain single-process Pillow loop, on the same files in the same run.

    .venv/bin/python bench/prepare.py                             # ~1-2 minutes on 2 cores
    .venv/bin/python bench/prepare.py --images 14000 --photos 0   # an Intel-sized set

Two fixtures are generated in a temporary folder and raced separately: Intel-like 150x150 JPEGs (smooth
scenes plus sensor-like noise, quality 90, ~11 kB each like the real set), where the gain is parallelism,
and camera-sized 1600x1200 JPEGs, where JPEG draft mode adds to it. Both contenders turn every file into
an img_size x img_size RGB array:
    baseline  for each file: Image.open -> convert("RGB") -> resize -> numpy, one process
    prepare   attention_cnn.data.prepare.prepare, everything included: discovery, hashing, EXIF, parallel
              decode with draft, splitting, writing train/val/test.pt, report.json and previews
Each is timed `--repeats` times, alternating. Reported: the best time of each and the median ratio of
back-to-back pairs (other jobs share the machine), and CPU seconds (workers included), which other jobs do
not inflate: prepare's CPU time below the baseline's is the per-image saving, the rest is parallelism.
Then load_split of the produced train split is timed, and of a synthetic Intel-sized split (14k x 150 px).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attention_cnn.data.prepare import prepare, resolve_workers
from attention_cnn.data.prepared import PreparedSplit, load_split, save_split
from attention_cnn.params import parse_params

CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")


def make_fixture(root: Path, images: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """`images` JPEGs of `size` (w, h) spread over the classes. Returns the files, sorted."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    w, h = size
    noise = rng.normal(0, 12, (h + 200, w + 200, 1)).astype(np.int16)  # random crops of it: cheap per image
    for i in range(images):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))  # a smooth random scene
        scene = np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
        y, x = rng.integers(0, 200), rng.integers(0, 200)
        pixels = np.clip(scene + noise[y:y + h, x:x + w], 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg", quality=90)
    return sorted(root.rglob("*.jpg"))


def baseline(files: list[Path], img_size: int) -> np.ndarray:
    out = np.empty((len(files), img_size, img_size, 3), np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            out[i] = np.asarray(image.convert("RGB").resize((img_size, img_size)))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (prepare's worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float   # CPU seconds, worker processes included


def timed_with_cpu(fn) -> Timing:
    cpu = cpu_seconds()
    wall = timed(fn)
    return Timing(wall, cpu_seconds() - cpu)


@dataclass(frozen=True)
class LoadTiming:
    images: int
    img_size: int
    load: float   # load_split: opens the memory map
    touch: float  # then reading every pixel once


def time_load(prepared: Path, split: str) -> LoadTiming:
    load = timed(lambda: load_split(prepared, split))
    data = load_split(prepared, split)
    touch = timed(lambda: data.images.clone())  # reads every page of the memory map once
    return LoadTiming(len(data), data.img_size, load, touch)


@dataclass(frozen=True)
class Race:
    name: str
    files: int
    megabytes: float
    baseline: list[Timing]
    prepare: list[Timing]

    def row(self, who: str, runs: list[Timing]) -> str:
        best = min(run.wall for run in runs)
        return f"  {who:<42}{best:>10.2f}{self.files / best:>12.0f}{min(run.cpu for run in runs):>10.2f}"

    def speedup(self) -> float:
        return min(run.wall for run in self.baseline) / min(run.wall for run in self.prepare)

    def paired(self) -> float:
        return statistics.median(b.wall / o.wall for b, o in zip(self.baseline, self.prepare))


def race(name: str, source: Path, files: list[Path], img_size: int, workers: int, repeats: int) -> Race:
    """Both contenders on the same files, alternating, so both see the same machine."""
    params = parse_params({"img_size": img_size, "data": {"source": str(source), "workers": workers}})
    base_runs, ours_runs = [], []
    for _ in range(repeats):
        base_runs.append(timed_with_cpu(lambda: baseline(files, img_size)))
        ours_runs.append(timed_with_cpu(lambda: prepare(params, out_dir=source.parent / "prepared", progress=False)))
    return Race(name, len(files), sum(f.stat().st_size for f in files) / 1e6, base_runs, ours_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="150x150 JPEGs, as in the Intel set")
    parser.add_argument("--photos", type=int, default=60, help="1600x1200 JPEGs, as from a camera (0: skip)")
    parser.add_argument("--img-size", type=int, default=64, help="img_size of both contenders")
    parser.add_argument("--workers", type=int, default=0, help="data.workers for prepare (0: one per core)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each contender, alternating")
    parser.add_argument("--load-images", type=int, default=14000, help="synthetic split for the load test (0: skip)")
    parser.add_argument("--load-size", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]

    races, loads = [], []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        sets = [("Intel-like 150x150", args.images, (150, 150)), ("photos 1600x1200", args.photos, (1600, 1200))]
        for k, (name, count, size) in enumerate(sets):
            if count == 0:
                continue
            source = tmp / f"set{k}" / "source"
            start = time.perf_counter()
            files = make_fixture(source, count, size, seed=k)
            print(f"fixture: {count} {name} JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
            races.append(race(name, source, files, args.img_size, args.workers, args.repeats))
            if k == 0:
                loads.append(time_load(source.parent / "prepared", "train"))
            shutil.rmtree(source.parent)

        if args.load_images:
            shape = (args.load_images, 3, args.load_size, args.load_size)
            pattern = torch.arange(256, dtype=torch.uint8).repeat(int(np.prod(shape)) // 256 + 1)
            synthetic = PreparedSplit(images=pattern[:int(np.prod(shape))].view(shape),
                                      labels=torch.arange(args.load_images) % len(CLASSES), masks=None,
                                      files=[f"{i:06d}.jpg" for i in range(args.load_images)],
                                      classes=list(CLASSES))
            save_split(tmp / "synthetic", "train", synthetic)
            del synthetic, pattern
            loads.append(time_load(tmp / "synthetic", "train"))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nmachine: {cores} CPU cores, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after "
          f"(other jobs slow both contenders, the parallel one more); prepare workers: "
          f"{resolve_workers(args.workers)}; img_size {args.img_size}; best of {args.repeats}")
    print(f"{'files -> img_size x img_size RGB':<44}{'seconds':>10}{'images/s':>12}{'CPU s':>10}")
    for r in races:
        print(f"{r.name}: {r.files} files, {r.megabytes:.0f} MB")
        print(r.row("baseline: open -> convert -> resize, 1 proc", r.baseline))
        print(r.row("prepare (full stage, parallel, draft)", r.prepare))
        print(f"  {'speed-up: best times / median of pairs':<42}{r.speedup():>9.2f}x{r.paired():>11.2f}x")
        print(f"  all runs (wall s): baseline {', '.join(f'{t.wall:.2f}' for t in r.baseline)}; "
              f"prepare {', '.join(f'{t.wall:.2f}' for t in r.prepare)}")
    print(f"\n{'load_split(train)':<44}{'images':>8}{'load s':>10}{'+ read all s':>14}")
    for name, load in zip(("prepared Intel-like above", "synthetic"), loads):
        label = f"  {name}, {load.img_size} px"
        print(f"{label:<44}{load.images:>8}{load.load:>10.3f}{load.touch:>14.3f}")


if __name__ == "__main__":
    main()
