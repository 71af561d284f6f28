"""Learning curves on small folders: test accuracy against images per class.

    .venv/bin/python bench/small_data.py                                  # the curve of README / BENCHMARKS
    .venv/bin/python bench/small_data.py --kinds shapes --per-class 60 300 --set train.epochs=15 model.head=flatten

Each row: a folder written in a temporary directory (the built-in sample at that many images per class, or a
folder of attention_cnn.data.synthetic: shapes, textures, noise), prepared, trained and scored on its test split
with the library's own prepare / train / predict_logits, params.yaml's defaults plus --set overrides
(img_size 64 unless set). Seeded: the same table on the same machine. Wall-clock seconds are the train stage's,
on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from attention_cnn.data.prepare import prepare
from attention_cnn.data.prepared import load_split
from attention_cnn.data.sample import write_sample
from attention_cnn.data.synthetic import KINDS, write_folder
from attention_cnn.inference import load_for_inference, predict_logits
from attention_cnn.params import parse_params
from attention_cnn.training.train import train

REPO = Path(__file__).resolve().parents[1]


def parse_value(text: str):
    return yaml.safe_load(text)  # 0.1 -> float, true -> bool, flatten -> str, as `dvc exp run -S` reads them


def params_with(overrides: list[str], source: Path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(source)
    raw["data"]["workers"] = 1
    raw["train"]["device"] = "cpu"
    for item in overrides:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = parse_value(value)
    return parse_params(raw)


def one_row(kind: str, per_class: int, overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if kind == "sample":
            write_sample(tmp / "folder", seed, per_class, image_size=150)
        else:
            write_folder(tmp / "folder", kind, per_class, seed=seed)
        params = params_with([f"seed={seed}", *overrides], tmp / "folder")
        prepare(params, tmp / "prepared", progress=False)
        started = time.perf_counter()
        result = train(params, tmp / "prepared", tmp / "model.pt", tmp / "ckpt", metrics_dir=None, progress=False)
        seconds = time.perf_counter() - started
        model = load_for_inference(tmp / "model.pt").model
        test = load_split(tmp / "prepared", "test")
        accuracy = (predict_logits(model, test.images, 256).argmax(1).cpu() == test.labels).float().mean().item()
    return {"kind": kind, "per_class": per_class, "test_accuracy": accuracy,
            "best_val_accuracy": result.best_val_accuracy, "epochs": result.epochs_run,
            "best_epoch": result.best_epoch, "train_s": seconds, "test_images": len(test)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["sample", "shapes", "textures"],
                        choices=["sample", *KINDS])
    parser.add_argument("--per-class", nargs="+", type=int, default=[20, 60, 150, 300])
    parser.add_argument("--set", nargs="*", default=[], help="params overrides, key=value as for `dvc exp run -S`")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads: 1 runs far faster than 2 on a machine shared with other jobs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = ["img_size=64", *args.set]
    print(f"# overrides: {' '.join(overrides)}", flush=True)
    print("| folder | images/class | test images | test accuracy | best val | epochs run | train s |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for kind in args.kinds:
        for per_class in args.per_class:
            r = one_row(kind, per_class, overrides, args.seed)
            print(f"| {kind} | {per_class} | {r['test_images']} | {r['test_accuracy']:.3f} | "
                  f"{r['best_val_accuracy']:.3f} | {r['epochs']} (best {r['best_epoch']}) | {r['train_s']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
