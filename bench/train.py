"""Benchmark our training loop against a seed-equivalent loop, on the same synthetic images, in one run.

    .venv/bin/python bench/train.py                      # CPU, 64 px, ~2-3 minutes on 2 cores
    .venv/bin/python bench/train.py --device cuda --img-size 150 --batch-size 512 --compile --images 14000
    bash bench/gpu_check.sh                              # the whole GPU check, on a machine with a GPU
    .venv/bin/python bench/train.py --profile            # CPU: where a step's time goes, at 32 and 128 channels

The fixture is generated in a temporary folder: class-dependent images (oriented stripes, a frequency and an
angle per class, random phase, tint and noise), written as 150x150 JPEGs like the Intel set the seed used.
    ours   attention_cnn.training.train.train with the default attention (conv) on the JPEGs decoded once (what `prepare`
           does). The timed part is the whole training pass: indexing the uint8 tensors, augmentation, forward,
           backward, Adam and the loss/accuracy sums; validation and DVCLive (left out here) are outside it.
           images/s is the median over the epochs after the first (the first warms up or compiles);
           with --compile --also-eager the eager loop is timed as well, on the same data.
    seed   the seed's recipe: dense attention, fp32, batch 32, 128 channels, Adam, and a torch DataLoader
           that decodes every JPEG each epoch (Pillow + torchvision Resize/ToTensor).
    old    the recipe before the small-folder defaults: batch 64, the flatten head, flips and shifts only, timed the same
           way beside the new default, so the new / old images/s ratio comes from one run.
It also measures this machine's matmul peak (a big torch.mm) and reports our achieved FLOP/s as a share of it
(FLOPs of a training step, forward and backward, counted by torch's FlopCounterMode), and (on CPU) trains
once at img_size 150 in a child process to report its peak RSS, and shows the seed's dense layer being refused.
Other jobs on a shared machine make wall-clock numbers noisy: run it twice and keep the better.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from tqdm import tqdm

from attention_cnn.data.prepared import PreparedSplit, load_split, save_split
from attention_cnn.training.distributed import kernel_settings
from attention_cnn.training.epoch import BatchSource, draw_augmentation, reuse_freed_host_memory, train_epoch
from attention_cnn.errors import UserError
from attention_cnn.memory import check_model_fits
from attention_cnn.model import AttentionCNN
from attention_cnn.params import ModelParams, TrainParams, parse_params
from attention_cnn.training.train import train

SOURCE_SIZE = 150
SEED_CHANNELS, SEED_BATCH = 128, 32
# The recipe before the small-folder defaults (params.yaml then): batch 64, the flatten head, flips and shifts only.
OLD_DEFAULT = {"model": {"head": "flatten"},
               "train": {"batch_size": 64, "flip": "horizontal", "rotate": 0.0, "scale": 0.0, "color_jitter": 0.0,
                         "grey": 0.0, "channel_shuffle": 0.0, "label_smoothing": 0.0}}
OLD_DESCRIPTION = "batch 64, model.head=flatten, flips and shifts only"


# ----------------------------------------------------------------------------------------------------------
# Fixture


def synthetic_images(n: int, classes: int, size: int, seed: int = 0, chunk: int = 500):
    """(n, 3, size, size) uint8 and (n,) labels: stripes whose angle and frequency depend on the class.
    Drawn in chunks, so 14k images need a few hundred MB of floats at a time, not gigabytes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.cat([_stripes(labels[i:i + chunk], classes, size, g) for i in range(0, n, chunk)])
    return images, labels


def _stripes(labels: torch.Tensor, classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    n = len(labels)
    angle = labels * (math.pi / classes) + 0.15 * torch.randn(n, generator=g)
    freq = 2 * math.pi * (3 + 2 * (labels % 3)) / size
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    proj = xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]          # (n, S, S)
    stripes = torch.sin(proj * freq[:, None, None] + phase[:, None, None])             # (n, S, S)
    tint = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=g)                             # (n, 3, 1, 1)
    noise = 0.25 * torch.randn(n, 3, size, size, generator=g)
    pixels = 127.5 + 100 * tint * stripes[:, None] + 40 * noise
    return pixels.clamp(0, 255).to(torch.uint8)


def write_jpegs(root: Path, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[Path, int]]:
    items = []
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        path = root / f"class{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=90)
        items.append((path, label))
    return items


def decode_once(items: list[tuple[Path, int]], img_size: int) -> torch.Tensor:
    """What `prepare` does, once: decode and stretch every JPEG to img_size (bilinear)."""
    out = torch.empty(len(items), 3, img_size, img_size, dtype=torch.uint8)
    for i, (path, _) in enumerate(items):
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((img_size, img_size), Image.Resampling.BILINEAR)
            out[i] = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(img_size, img_size, 3) \
                .permute(2, 0, 1)
    return out


def write_prepared(folder: Path, images: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
    n_val = max(classes, len(labels) // 10)
    names = [f"class{k}" for k in range(classes)]
    for split, sl in (("train", slice(n_val, None)), ("val", slice(0, n_val)), ("test", slice(0, n_val))):
        save_split(folder, split, PreparedSplit(images=images[sl].contiguous(), labels=labels[sl].clone(),
                                                masks=None, files=[f"{i}.jpg" for i in range(len(labels[sl]))],
                                                classes=names))


# ----------------------------------------------------------------------------------------------------------
# Contenders


def run_ours(prepared: Path, out: Path, args, params_overrides: dict) -> dict:
    raw = {"seed": 0, "img_size": args.img_size,
           "model": {"attention": "conv", **params_overrides.get("model", {})},
           "train": {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device,
                     "compile": args.compile, "patience": 1000, **params_overrides.get("train", {})}}
    params = parse_params(raw)
    # No metrics folder: DVCLive writes once per epoch, outside the timed part, and leaving it out lets this
    # script run where only torch is installed (the GPU image of bench/gpu_check.sh has no dvclive).
    result = train(params, prepared, out / "model.pt", out / "checkpoints", metrics_dir=None, progress=True)
    rates = [r.images_per_s for r in result.history[1:]] or [result.history[0].images_per_s]
    return {"images_per_s": statistics.median(rates), "params": params}


class JpegFolder(Dataset):
    """The seed's input pipeline: every item is opened and decoded from its JPEG, every epoch."""

    def __init__(self, items: list[tuple[Path, int]], img_size: int):
        self.items = items
        self.transform = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor()])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def run_seed(items: list[tuple[Path, int]], classes: int, args) -> dict:
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    torch.manual_seed(0)
    seed_params = ModelParams(attention="dense", channels=SEED_CHANNELS)
    try:
        check_model_fits(seed_params, args.img_size, device, batch_size=SEED_BATCH)
    except UserError as exc:
        return {"refused": str(exc)}
    with torch.device(device):
        model = AttentionCNN(classes, args.img_size, seed_params)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(JpegFolder(items, args.img_size), batch_size=SEED_BATCH, shuffle=True,
                        num_workers=args.seed_workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.seed_workers > 0)
    model.train()
    seen, started, step = 0, None, 0
    warmup = 2
    while step < warmup + args.seed_batches:
        for x, y in loader:
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the seed logs the loss every batch
            seen += len(y) if step >= warmup else 0
            step += 1
            print(f"\rseed loop: batch {step}/{warmup + args.seed_batches}", end="", file=sys.stderr, flush=True)
            if step >= warmup + args.seed_batches:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(file=sys.stderr)
    return {"images_per_s": seen / (time.perf_counter() - started)}


# ----------------------------------------------------------------------------------------------------------
# Machine peak and our FLOPs


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 25) -> float:
    """Best FLOP/s of an n x n x n torch.mm over `repeats` tries (other jobs may share the machine)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def train_flops_per_image(model_params: ModelParams, img_size: int, classes: int) -> float:
    """FLOPs of one training step per image, forward and backward, as torch's FlopCounterMode counts them
    (convolutions and matrix products; the elementwise ops are not counted). Counted, not taken as 3 x forward:
    the first conv's backward computes no gradient for the input images, so 3 x forward overstates a step by
    about 8 % at 32 channels."""
    model = AttentionCNN(classes, img_size, model_params)
    images, labels = torch.rand(2, 3, img_size, img_size), torch.arange(2) % classes
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(images).logits, labels).backward()
    return counter.get_total_flops() / len(labels)


def profile_steps(prepared: Path, args, channels: int, top: int = 12) -> None:
    """Where a CPU training step spends its time: torch.profiler over one pass of train_epoch (after a warm-up
    pass), set up as attention_cnn.training.train sets it up; ops grouped by name, each one's self time as a share of the
    pass's wall time."""
    split = load_split(prepared, "train")
    device = torch.device("cpu")
    tp = TrainParams(batch_size=args.batch_size)
    steps = min(args.profile_steps, len(split) // tp.batch_size)
    with kernel_settings(device), reuse_freed_host_memory(device):
        torch.manual_seed(0)
        net = AttentionCNN(len(split.classes), split.img_size, ModelParams(channels=channels))
        net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(net.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
        source = BatchSource(split.images, split.labels, device, resident=True)
        order = torch.randperm(len(split))[:steps * tp.batch_size]
        draws = draw_augmentation(order.numel(), split.img_size, tp, torch.Generator())
        bar = tqdm(disable=True)
        train_epoch(net, optimizer, source, order, draws, tp, bar)  # warm-up: oneDNN picks its kernels
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            started = time.perf_counter()
            train_epoch(net, optimizer, source, order, draws, tp, bar)
            wall_us = 1e6 * (time.perf_counter() - started)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"\n== profile: {channels} channels, batch {tp.batch_size}, {steps} steps, "
          f"{order.numel() / wall_us * 1e6:,.0f} images/s while profiled")
    print("| op | share of step time | calls per step |\n| --- | --- | --- |")
    for op in ops[:top]:
        print(f"| {op.key} | {100 * op.self_cpu_time_total / wall_us:.1f} % | {op.count / steps:g} |")
    rest = sum(op.self_cpu_time_total for op in ops[top:])
    print(f"| all other ops ({len(ops) - top}) | {100 * rest / wall_us:.1f} % | |")
    print(f"| outside any op (Python, autograd bookkeeping) | "
          f"{100 * (wall_us - sum(op.self_cpu_time_total for op in ops)) / wall_us:.1f} % | |")


# ----------------------------------------------------------------------------------------------------------


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space that exec created, whereas
    ru_maxrss carries over the high-water mark of the parent that forked us."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kilobytes


def run_child_150(args) -> None:
    """Train our model at img_size 150 in a child process (its own peak RSS) and show it fits this machine."""
    command = [sys.executable, __file__, "--img-size", "150", "--images", str(args.images_150), "--epochs", "2",
               "--skip-seed", "--no-150", "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--channels", str(args.channels)]
    print(f"\n== img_size 150 in a child process: {' '.join(command[1:])}", flush=True)
    proc = subprocess.run(command)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(f"img_size 150: child exit status {proc.returncode} (its peak RSS is printed above; "
          f"this machine has {total:.1f} GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1200, help="synthetic images (a tenth is held out as val)")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of our loop (the first is not counted)")
    parser.add_argument("--batch-size", type=int, default=TrainParams().batch_size, help="our batch size")
    parser.add_argument("--channels", type=int, default=ModelParams().channels, help="our model.channels")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="train.compile for our loop")
    parser.add_argument("--also-eager", action="store_true", help="with --compile: time the eager loop too")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed-batches", type=int, default=12, help="timed batches of the seed loop")
    parser.add_argument("--seed-workers", type=int, default=0, help="DataLoader workers of the seed loop")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-old-default", action="store_true", help="do not time the recipe before the small-folder defaults")
    parser.add_argument("--seed-width", action="store_true", help="also time ours at the seed's 128 channels")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="with --seed-width on CPU: also time ours there with train.cpu_bf16=true")
    parser.add_argument("--no-150", action="store_true", help="skip the img_size 150 memory check")
    parser.add_argument("--images-150", type=int, default=640, help="images of the 150 px run")
    parser.add_argument("--profile", type=int, nargs="*", metavar="CHANNELS",
                        help="CPU: only profile a training step at these widths (default: ours and the seed's)")
    parser.add_argument("--profile-steps", type=int, default=8, help="steps profiled with --profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or
                          (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    describe = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {describe}; img_size {args.img_size}; {args.images} images; torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        images, labels = synthetic_images(args.images, args.classes, SOURCE_SIZE)
        items = write_jpegs(tmp / "jpeg", images, labels)
        decoded = decode_once(items, args.img_size)
        write_prepared(tmp / "prepared", decoded, labels, args.classes)
        print(f"fixture: {len(items)} JPEGs of {SOURCE_SIZE} px, decoded once to {args.img_size} px "
              f"in {time.perf_counter() - started:.1f} s")
        if args.profile is not None:
            for channels in args.profile or (args.channels, SEED_CHANNELS):
                profile_steps(tmp / "prepared", args, channels)
            return

        eager = None
        if args.compile and args.also_eager:
            eager = run_ours(tmp / "prepared", tmp / "eager", args,
                             {"model": {"channels": args.channels}, "train": {"compile": False}})
            print(f"ours without torch.compile: {eager['images_per_s']:,.0f} images/s")
        ours = run_ours(tmp / "prepared", tmp / "ours", args, {"model": {"channels": args.channels}})
        print(f"ours (conv, {args.channels} ch, batch {args.batch_size}"
              f"{', bf16 autocast + channels_last' if device.type == 'cuda' else ', fp32'}"
              f"{', compiled' if args.compile else ''}): {ours['images_per_s']:,.0f} images/s")
        if not args.skip_old_default:  # the small-folder defaults changed the recipe: what their throughput costs, in the same run
            old = run_ours(tmp / "prepared", tmp / "old", args,
                           {"model": {"channels": args.channels, **OLD_DEFAULT["model"]}, "train": OLD_DEFAULT["train"]})
            print(f"old default recipe ({OLD_DESCRIPTION}): {old['images_per_s']:,.0f} images/s; "
                  f"ratio new default / old default: {ours['images_per_s'] / old['images_per_s']:.2f}x")
        if eager:
            print(f"torch.compile speed-up: {ours['images_per_s'] / eager['images_per_s']:.2f}x")
        wide = None
        if args.seed_width:
            wide = run_ours(tmp / "prepared", tmp / "wide", args,
                            {"model": {"channels": SEED_CHANNELS}, "train": {"epochs": 2}})
            print(f"ours at the seed's width (conv, {SEED_CHANNELS} ch): {wide['images_per_s']:,.0f} images/s")
        wide_bf16 = None
        if args.seed_width and args.cpu_bf16 and device.type == "cpu":
            wide_bf16 = run_ours(tmp / "prepared", tmp / "wide_bf16", args,
                                 {"model": {"channels": SEED_CHANNELS}, "train": {"epochs": 2, "cpu_bf16": True}})
            print(f"ours at the seed's width with train.cpu_bf16: {wide_bf16['images_per_s']:,.0f} images/s")
        seed = None
        if not args.skip_seed:
            seed = run_seed(items, args.classes, args)
            if "refused" in seed:
                print(f"seed (dense, {SEED_CHANNELS} ch): refused: {seed['refused']}")
            else:
                print(f"seed (dense, {SEED_CHANNELS} ch, fp32, batch {SEED_BATCH}, JPEG DataLoader, "
                      f"{args.seed_workers} workers): {seed['images_per_s']:,.1f} images/s")

    # Peak: fp32 on CPU; on CUDA the dtype our loop computes in (bf16) and fp32 for reference.
    peak_fp32 = matmul_peak(device, torch.float32)
    flops = train_flops_per_image(ours["params"].model, args.img_size, args.classes)
    achieved = ours["images_per_s"] * flops
    print(f"\nmatmul peak fp32: {peak_fp32 / 1e9:,.1f} GFLOP/s")
    if device.type == "cuda":
        peak_bf16 = matmul_peak(device, torch.bfloat16, n=8192)
        print(f"matmul peak bf16: {peak_bf16 / 1e12:,.1f} TFLOP/s")
    print(f"our train step: {flops / 1e6:,.1f} MFLOP per image (forward + backward, counted) -> achieved "
          f"{achieved / 1e9:,.1f} GFLOP/s = {100 * achieved / peak_fp32:.1f}% of the fp32 matmul peak"
          + (f", {100 * achieved / peak_bf16:.1f}% of bf16" if device.type == "cuda" else ""))
    if seed and "images_per_s" in seed:
        print(f"ratio ours / seed: {ours['images_per_s'] / seed['images_per_s']:,.1f}x")
    if wide:
        wide_flops = train_flops_per_image(wide["params"].model, args.img_size, args.classes)
        print(f"at the seed's width: {wide_flops / 1e6:,.1f} MFLOP per image -> "
              f"{100 * wide['images_per_s'] * wide_flops / peak_fp32:.1f}% of the fp32 matmul peak")
        print(f"ratio ours at seed width / seed: {wide['images_per_s'] / seed['images_per_s']:,.1f}x"
              if seed and "images_per_s" in seed else "")
    if wide_bf16 and seed and "images_per_s" in seed:
        print(f"ratio ours at seed width with train.cpu_bf16 / seed: "
              f"{wide_bf16['images_per_s'] / seed['images_per_s']:,.1f}x")

    if device.type == "cpu" and not args.no_150:
        run_child_150(args)
        started = time.perf_counter()
        try:
            check_model_fits(ModelParams(attention="dense", channels=SEED_CHANNELS), 150)
            print("dense at 150 px with 128 channels fits this machine")
        except UserError as exc:
            print(f"dense at 150 px (the seed's 128 channels) refused in {1e3 * (time.perf_counter() - started):.1f}"
                  f" ms: {exc}")
    print(f"peak RSS of this process (img_size {args.img_size}): {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
