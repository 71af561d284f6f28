"""How long a recipe sits at chance: steps until validation accuracy first reaches 0.6, per seed.

    .venv/bin/python bench/takeoff.py --kind cluttered --per-class 300 --seeds 0 1 2 \\
        --config old model.dropout=0.5 --config new

A short, cheap probe of the plateau that bench/small_data.py's full runs show: the folder is drawn and prepared
once per seed (cached in --work), then each config trains with the library's model, batches and augmentation
(params.yaml's defaults plus its overrides) for at most --steps steps, with the LR warmed up over the first 100
and then held at train.lr: the take-off, not the decay, is what it measures. Val accuracy every 50 steps; a
run ends early once four checks in a row reach 0.9. One torch thread (set OMP_NUM_THREADS=1 for the same
figures).
Prints one row per run: the take-off step ("> steps" when it never came) and the last val accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_data import params_with  # noqa: E402  (the same overrides as the full runs)

from attention_cnn.data.prepare import prepare  # noqa: E402
from attention_cnn.data.prepared import load_split  # noqa: E402
from attention_cnn.data.sample import write_sample  # noqa: E402
from attention_cnn.data.synthetic import write_folder  # noqa: E402
from attention_cnn.model import AttentionCNN  # noqa: E402
from attention_cnn.training.epoch import (BatchSource, draw_augmentation, train_epoch,  # noqa: E402
                                         validation_totals)
from attention_cnn.training.train import channel_stats  # noqa: E402

TAKEOFF, WARMUP, EVERY = 0.6, 100, 50


def prepared(kind: str, per_class: int, seed: int, work: Path, overrides: list[str]) -> Path:
    cache = work / f"{kind}{per_class}-s{seed}"
    if not (cache / "prepared" / "test.pt").is_file():
        if kind == "sample":
            write_sample(cache / "folder", seed, per_class, image_size=150)
        else:
            write_folder(cache / "folder", kind, per_class, seed=seed)
        prepare(params_with([f"seed={seed}", "img_size=64", *overrides], cache / "folder"), cache / "prepared",
                progress=False)
    return cache


def takeoff(cache: Path, seed: int, overrides: list[str], steps: int, adamw: float | None) -> tuple[int | None, float]:
    """Trains with the library's own step (training.epoch.train_epoch) in slices of EVERY steps, validating
    after each slice with its validation_totals."""
    params = params_with([f"seed={seed}", "img_size=64", *overrides], cache / "folder")
    train, val = load_split(cache / "prepared", "train"), load_split(cache / "prepared", "val")
    torch.manual_seed(seed)
    net = AttentionCNN(len(train.classes), train.img_size, params.model)
    net.set_normalization(*channel_stats(train.images))
    net.to(memory_format=torch.channels_last)  # as training does: the same CPU kernels
    tp = params.train
    optimizer = (torch.optim.AdamW(net.parameters(), lr=tp.lr, weight_decay=adamw) if adamw is not None
                 else torch.optim.Adam(net.parameters(), lr=tp.lr, weight_decay=tp.weight_decay))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP))
    cpu, quiet = torch.device("cpu"), tqdm(disable=True)
    source = BatchSource(train.images, train.labels, cpu, True)
    val_source = BatchSource(val.images, val.labels, cpu, True)
    shuffle, augment = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)
    step, checks, first = 0, [], None
    while step < steps:
        order = torch.randperm(len(train), generator=shuffle)
        order = order[:len(order) // tp.batch_size * tp.batch_size]  # whole batches only
        draws = draw_augmentation(len(train), train.img_size, tp, augment) if tp.augment else None
        start = 0
        while start < len(order):  # slices that end on every EVERY-th step of the run, across passes
            part = slice(start, start + (EVERY - step % EVERY) * tp.batch_size)
            train_epoch(net, optimizer, source, order[part], None if draws is None else draws[part], tp, quiet,
                        step_scheduler=warmup)
            step, start = step + len(order[part]) // tp.batch_size, part.stop
            if step % EVERY:
                continue
            _, correct, count = validation_totals(net, val_source, torch.arange(len(val)), 256).tolist()
            checks.append(correct / count)
            first = first or (step if checks[-1] >= TAKEOFF else None)
            if step >= steps or (len(checks) >= 4 and min(checks[-4:]) >= 0.9):
                return first, checks[-1]
    return first, checks[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="cluttered", help="sample, or a kind of attention_cnn.data.synthetic")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--config", nargs="+", action="append", metavar="LABEL [KEY=VALUE ...]",
                        help="a candidate: a label and its params overrides (repeat to compare several)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--adamw", type=float, help="AdamW with this decoupled weight decay instead of Adam")
    parser.add_argument("--work", type=Path, default=Path("/tmp/takeoff"), help="where the folders are cached")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| config | seed | take-off step | last val accuracy |\n|---|---:|---:|---:|", flush=True)
    for label, *overrides in args.config or [["defaults"]]:
        for seed in args.seeds:
            cache = prepared(args.kind, args.per_class, seed, args.work, overrides)
            first, last = takeoff(cache, seed, overrides, args.steps, args.adamw)
            print(f"| {label} | {seed} | {first or f'> {args.steps}'} | {last:.2f} |", flush=True)


if __name__ == "__main__":
    main()
