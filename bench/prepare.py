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

Scale mode: peak memory of the stage as a user runs it, for growing data (needs GNU time at /usr/bin/time;
`apt-get install time` where it is missing):

    .venv/bin/python bench/prepare.py --scale 5000 20000 100000 --compare-repo ../attention-cnn-old   # a clone of an older commit

generates the largest count of Intel-like 150x150 JPEGs once (the smaller sets are hard links to its first
files), then for each count runs `/usr/bin/time -v python stages/prepare.py` in a scratch repo at
img_size 150 and reports the "Maximum resident set size" (interpreter and torch included; the largest single
process, i.e. the main one, not the decode workers) and the wall time, start-up included. --compare-repo runs
another checkout's stage and src the same way, alternating, up to --compare-max images, so old and new code
are compared in one run on the same files; the single-process Pillow loop above is timed on the same files
too, as the throughput reference.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
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


# --------------------------------------------------------------------------------------------------------
# Scale mode

REPO = Path(__file__).resolve().parents[1]
GNU_TIME = Path("/usr/bin/time")


@dataclass(frozen=True)
class StageRun:
    images: int
    wall: float     # seconds, interpreter and torch start-up included
    cpu: float      # user + system CPU seconds, decode workers included: what other jobs do not inflate
    peak_mib: float  # "Maximum resident set size" as /usr/bin/time -v reports it (in KiB there)


def run_stage(checkout: Path, source: Path, images: int, img_size: int, workers: int, work: Path) -> StageRun:
    """`/usr/bin/time -v python stages/prepare.py` in a scratch repo holding `checkout`'s stage script and
    params.yaml (data.source and img_size set), with `checkout`'s src first on PYTHONPATH."""
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(checkout / "stages", repo / "stages")
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    params["img_size"] = img_size
    params["data"].update(source=str(source), workers=workers)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    done = subprocess.run([str(GNU_TIME), "-v", sys.executable, "stages/prepare.py"], cwd=repo, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench: prepare from {checkout} failed:\n{done.stdout}{done.stderr}")
    peak_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr).group(1))
              for kind in ("User", "System"))
    shutil.rmtree(repo)
    return StageRun(images, wall, cpu, int(peak_kb.group(1)) / 1024)


def startup_seconds(checkout: Path) -> float:
    """What the stage spends before its first image: the interpreter and the imports (torch), best of 3."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    command = [sys.executable, "-c", "import attention_cnn.data.prepare, attention_cnn.params"]
    return min(timed(lambda: subprocess.run(command, env=env, check=True)) for _ in range(3))


def linked_subset(pool: Path, target: Path, images: int) -> Path:
    """The first `images` files of a make_fixture pool as hard links: a folder of its own, no copy."""
    for name in CLASSES:
        (target / name).mkdir(parents=True)
    for i in range(images):
        relative = Path(CLASSES[i % len(CLASSES)], f"{i:06d}.jpg")
        os.link(pool / relative, target / relative)
    return target


def pillow_loop_seconds(files: list[Path], img_size: int) -> float:
    """The single-process Pillow loop over `files`, 1000 at a time so the bench itself stays small."""
    return sum(timed(lambda: baseline(files[k:k + 1000], img_size)) for k in range(0, len(files), 1000))


def scale(args: argparse.Namespace) -> None:
    if not GNU_TIME.is_file():
        raise SystemExit(f"bench: --scale reads the peak memory from GNU time, and {GNU_TIME} is missing. "
                         "Install it (Debian/Ubuntu: apt-get install time) and run again.")
    compare = Path(args.compare_repo).resolve() if args.compare_repo else None
    startup = startup_seconds(REPO)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-scale-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        make_fixture(tmp / "pool", max(args.scale), (args.scale_size, args.scale_size))
        print(f"fixture: {max(args.scale)} {args.scale_size}x{args.scale_size} JPEGs in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        for images in sorted(args.scale):
            source = linked_subset(tmp / "pool", tmp / f"set{images}", images)
            files = sorted(source.rglob("*.jpg"))
            loop = pillow_loop_seconds(files, args.img_size_scale)
            ours = run_stage(REPO, source, images, args.img_size_scale, args.workers, tmp)
            old = (run_stage(compare, source, images, args.img_size_scale, args.workers, tmp)
                   if compare and images <= args.compare_max else None)
            rows.append((ours, old, loop))
            print(f"  {images}: this checkout {ours.peak_mib:.0f} MiB, {ours.wall:.1f} s"
                  + (f"; {compare} {old.peak_mib:.0f} MiB, {old.wall:.1f} s" if old else "")
                  + f"; Pillow loop {loop:.1f} s", flush=True)
            shutil.rmtree(source)
    report_scale(rows, startup, args)


def report_scale(rows: list, startup: float, args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nmachine: {cores} CPU cores, load average {os.getloadavg()[0]:.1f} at the end; img_size "
          f"{args.img_size_scale}; prepare workers {resolve_workers(args.workers)}; one run each, so wall times "
          f"are noisy when other jobs run. 'net': wall time less the start-up (interpreter and imports, "
          f"{startup:.1f} s), against the Pillow loop's")
    print(f"{'images':>8}{'pixels GB':>11}  {'who':<14}{'peak RSS MiB':>13}{'wall s':>9}{'net img/s':>11}"
          f"{'net vs loop':>13}{'CPU s':>8}")
    for ours, old, loop in rows:
        pixels = ours.images * 3 * args.img_size_scale ** 2 / 1e9
        for who, run in (("this checkout", ours), ("compare-repo", old)):
            if run is not None:
                net = max(run.wall - startup, 1e-9)
                print(f"{run.images:>8}{pixels:>11.2f}  {who:<14}{run.peak_mib:>13.0f}{run.wall:>9.1f}"
                      f"{run.images / net:>11.0f}{loop / net:>12.2f}x{run.cpu:>8.1f}")
        print(f"{ours.images:>8}{pixels:>11.2f}  {'Pillow loop':<14}{'':>13}{loop:>9.1f}{ours.images / loop:>11.0f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="150x150 JPEGs, as in the Intel set")
    parser.add_argument("--photos", type=int, default=60, help="1600x1200 JPEGs, as from a camera (0: skip)")
    parser.add_argument("--img-size", type=int, default=64, help="img_size of both contenders")
    parser.add_argument("--workers", type=int, default=0, help="data.workers for prepare (0: one per core)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each contender, alternating")
    parser.add_argument("--load-images", type=int, default=14000, help="synthetic split for the load test (0: skip)")
    parser.add_argument("--load-size", type=int, default=150)
    parser.add_argument("--scale", type=int, nargs="+", help="scale mode: these image counts (see above)")
    parser.add_argument("--scale-size", type=int, default=150, help="scale mode: side of the generated JPEGs")
    parser.add_argument("--img-size-scale", type=int, default=150, help="scale mode: img_size of the stage")
    parser.add_argument("--compare-repo", help="scale mode: a checkout whose stage runs too (e.g. the old code)")
    parser.add_argument("--compare-max", type=int, default=20000, help="scale mode: largest count for it")
    parser.add_argument("--tmp", help="scale mode: where the fixture goes (default: the system's temp folder)")
    return parser.parse_args()


def race_mode(args: argparse.Namespace) -> None:
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
    report_races(races, loads, load_before, args)


def report_races(races: list[Race], loads: list[LoadTiming], load_before: float, args: argparse.Namespace) -> None:
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


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    if args.scale:
        scale(args)
    else:
        race_mode(args)


if __name__ == "__main__":
    main()
