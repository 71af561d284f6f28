"""Learning curves on small folders: test accuracy against images per class, over seeds and CPU kernel paths.

    .venv/bin/python bench/small_data.py                                  # the curve of README / BENCHMARKS
    .venv/bin/python bench/small_data.py --kinds cluttered --per-class 60 300 --seeds 0 1 2 --isa own default
    .venv/bin/python bench/small_data.py --kinds shapes --per-class 60 --config cosine train.lr_schedule=cosine \\
        --config wsd -S train.lr=0.003                                    # candidates side by side

Each run: a folder written in a temporary directory (the built-in sample at that many images per class, or a
folder of attention_cnn.data.synthetic: shapes, textures, cluttered, noise), prepared, trained and scored on its
test split with the library's own prepare / train / predict_logits, params.yaml's defaults plus the overrides
(img_size 64 unless set). `seed` seeds both the folder and the run (split, weights, augmentation).

Every run is its own process (one torch thread, under `nice`), `--workers` at a time, so that each can pick its
CPU kernels: --isa own leaves torch's choice; default / avx2 / avx512 set ATEN_CPU_CAPABILITY (and
DNNL_MAX_CPU_ISA for avx2), so one machine measures the float rounding of other CPUs. Results depend on that
rounding, so a recipe is judged by the minimum over seeds × paths, and the mean.

Printed: a row per run, then per config and folder the min and mean test accuracy over its runs, and the
steps to 90 % of the final accuracy (the first validation at or above 0.9 × the best val accuracy; max over
runs). --out appends every run as a JSON line.

The probe (--probe N, 100 by default): a second folder of N images per class from the same generator with another
seed (seed + 1000), never seen by training or model selection. After every epoch the weights of that moment
are scored on it, and the kept model at the end. At 60 images per class the test and val splits hold 27 images,
so one image moves their accuracy by 3.7 points; the probe's 300 images give the learning curve and the final
accuracy with a tenth of that grain. "Probe steps to 90 %" is the first epoch at or above 0.9 × the kept model's
probe accuracy: the issue's "90 % of the final accuracy", read off the curve itself rather than off val's
best. Scoring the probe uses no RNG, so every run trains exactly as without it. --out also keeps each epoch's
probe and test accuracy (`probe_curve`, `test_curve`) and val loss, so that other model-selection rules can be
compared on the same runs afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISA_ENV = {
    "own": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
}


def params_with(overrides: list[str], source: Path):
    import yaml
    from attention_cnn.params import parse_params
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
        node[last] = yaml.safe_load(value)  # 0.1 -> float, true -> bool, flatten -> str, as `dvc exp run -S`
    return parse_params(raw)


def steps_to_fraction(history: list[dict], steps_per_epoch: int, fraction: float = 0.9) -> int:
    """Steps until the first validation at or above `fraction` of the run's best val accuracy."""
    best = max(h["val_accuracy"] for h in history)
    first = next(h["epoch"] for h in history if h["val_accuracy"] >= fraction * best)
    return first * steps_per_epoch


def write_images(folder: Path, kind: str, per_class: int, seed: int) -> None:
    from attention_cnn.data.sample import write_sample
    from attention_cnn.data.synthetic import write_folder
    if kind == "sample":
        write_sample(folder, seed, per_class, image_size=150)
    else:
        write_folder(folder, kind, per_class, seed=seed)


def probe_images(folder: Path, overrides: list[str], prepared: Path, classes: list[str]):
    """Every image of `folder`, prepared as training's images are: (N, 3, S, S) uint8 and (N,) labels."""
    import torch
    from attention_cnn.data.prepare import prepare
    from attention_cnn.data.prepared import load_split
    prepare(params_with(overrides, folder), prepared, progress=False)
    splits = [load_split(prepared, name) for name in ("train", "val", "test")]
    assert splits[0].classes == classes, (splits[0].classes, classes)
    return torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits])


def steps_to_probe_fraction(curve: list[float], final: float, steps_per_epoch: int, fraction: float = 0.9) -> int:
    """Steps until the first epoch whose probe accuracy is at or above `fraction` of the kept model's."""
    first = next((epoch for epoch, accuracy in enumerate(curve, 1) if accuracy >= fraction * final), len(curve))
    return first * steps_per_epoch


def one_run(kind: str, per_class: int, overrides: list[str], seed: int, probe: int = 0) -> dict:
    """In this process: write, prepare, train, score. The caller set the thread count and kernel path."""
    import torch
    from attention_cnn.data.prepare import prepare
    from attention_cnn.data.prepared import load_split
    from attention_cnn.inference import load_for_inference, predict_logits
    from attention_cnn.model import AttentionCNN
    from attention_cnn.training.schedule import plan_training
    from attention_cnn.training.train import train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "folder", kind, per_class, seed)
        params = params_with([f"seed={seed}", *overrides], tmp / "folder")
        prepare(params, tmp / "prepared", progress=False)
        train_split, test = load_split(tmp / "prepared", "train"), load_split(tmp / "prepared", "test")
        classes = train_split.classes
        curve, test_curve, on_epoch_end = [], [], None
        if probe:
            write_images(tmp / "probe", kind, probe, seed + 1000)
            probe_x, probe_y = probe_images(tmp / "probe", [f"seed={seed}", *overrides], tmp / "probe-prepared",
                                            classes)
            # Built before train seeds its RNGs, so that building it draws nothing from them.
            now = AttentionCNN(len(classes), params.img_size, params.model).eval()

            def on_epoch_end(_result) -> None:  # the weights of this moment: the checkpoint just written
                (checkpoint,) = (tmp / "ckpt").glob("*.pt")
                now.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
                curve.append((predict_logits(now, probe_x, 256).argmax(1).cpu() == probe_y).float().mean().item())
                test_curve.append((predict_logits(now, test.images, 256).argmax(1).cpu() == test.labels)
                                  .float().mean().item())

        started = time.perf_counter()
        result = train(params, tmp / "prepared", tmp / "model.pt", tmp / "ckpt", metrics_dir=None, progress=False,
                       on_epoch_end=on_epoch_end)
        seconds = time.perf_counter() - started
        plan = plan_training(params.train, len(train_split))
        model = load_for_inference(tmp / "model.pt").model
        accuracy = (predict_logits(model, test.images, 256).argmax(1).cpu() == test.labels).float().mean().item()
        probe_accuracy = ((predict_logits(model, probe_x, 256).argmax(1).cpu() == probe_y).float().mean().item()
                          if probe else None)
    history = [{"epoch": h.epoch, "val_accuracy": h.val_accuracy, "val_loss": h.val_loss, "train_loss": h.train_loss}
               for h in result.history]
    steps_per_epoch = plan.passes * plan.steps_per_pass
    run = {"test_accuracy": accuracy, "best_val_accuracy": result.best_val_accuracy, "epochs": result.epochs_run,
           "best_epoch": result.best_epoch, "steps_run": result.epochs_run * steps_per_epoch,
           "steps_to_90": steps_to_fraction(history, steps_per_epoch), "budget": params.train.steps,
           "train_s": seconds, "test_images": len(test), "history": history}
    if probe:
        run.update(probe_images=len(probe_y), probe_accuracy=probe_accuracy, probe_curve=curve, test_curve=test_curve,
                   probe_steps_to_90=steps_to_probe_fraction(curve, probe_accuracy, steps_per_epoch))
    return run


def run_in_process(job: dict, logs: Path) -> dict:
    """One run in a fresh process; its training log goes to a file in `logs`, to follow a long run with tail."""
    env = {**os.environ, **ISA_ENV[job["isa"]], "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = ["nice", sys.executable, __file__, "--one", json.dumps(job)]
    log = logs / f"{job['config']}-{job['kind']}{job['per_class']}-s{job['seed']}-{job['isa']}.log".replace(" ", "_")
    with log.open("w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"{job}: exit {code}, see {log}")
    return {**job, **json.loads(lines[-1])}


def parse_configs(args) -> list[tuple[str, list[str]]]:
    """(label, overrides) per config: each --config LABEL k=v ..., or one config of --set / -S alone."""
    common = ["img_size=64", *args.set]
    if not args.config:
        return [("defaults" if not args.set else " ".join(args.set), common)]
    return [(label, [*common, *items]) for label, *items in args.config]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["sample", "shapes", "textures", "cluttered"])
    parser.add_argument("--per-class", nargs="+", type=int, default=[20, 60, 150, 300])
    parser.add_argument("--set", "-S", nargs="+", action="extend", default=[],
                        help="params overrides for every config, key=value as for `dvc exp run -S`")
    parser.add_argument("--config", nargs="+", action="append", metavar="LABEL [KEY=VALUE ...]",
                        help="a candidate: a label and its overrides (repeat to compare several)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--isa", nargs="+", default=["own", "default"], choices=sorted(ISA_ENV),
                        help="CPU kernel paths: own (torch's choice here), default, avx2, avx512")
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--probe", type=int, default=100, metavar="N",
                        help="images per class of the unseen probe folder scored after every epoch (0: none)")
    parser.add_argument("--out", type=Path, help="append each run as a JSON line")
    parser.add_argument("--logs", type=Path, help="folder for each run's training log (default: a temporary one)")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="JSONL",
                        help="print the min / mean table of runs saved by --out, and run nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker process: one run, its JSON on stdout
    args = parser.parse_args(argv)
    if args.summarize:
        print(summary([json.loads(line) for path in args.summarize for line in path.read_text().splitlines()]))
        return
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(one_run(job["kind"], job["per_class"], job["overrides"], job["seed"], job.get("probe", 0))),
              flush=True)
        return

    jobs = [{"config": label, "overrides": overrides, "kind": kind, "per_class": n, "seed": seed, "isa": isa,
             "probe": args.probe}
            for label, overrides in parse_configs(args) for kind in args.kinds for n in args.per_class
            for seed in args.seeds for isa in args.isa]
    print("| config | folder | images/class | seed | kernels | test acc | best val | steps run | steps to 90 % | "
          "probe acc | probe steps to 90 % | train s |\n|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
          flush=True)
    results = []
    logs = args.logs or Path(tempfile.mkdtemp(prefix="small_data-"))
    logs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.workers) as pool:
        for r in pool.map(lambda job: run_in_process(job, logs), jobs):
            results.append(r)
            print(f"| {r['config']} | {r['kind']} | {r['per_class']} | {r['seed']} | {r['isa']} | "
                  f"{r['test_accuracy']:.3f} | {r['best_val_accuracy']:.3f} | {r['steps_run']} | "
                  f"{r['steps_to_90']} | {_probe(r, 'probe_accuracy')} | {_probe(r, 'probe_steps_to_90')} | "
                  f"{r['train_s']:.0f} |", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    print(summary(results))


def _probe(run: dict, key: str) -> str:
    value = run.get(key)
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def summary(results: list[dict]) -> str:
    """Min and mean per config × folder × images per class, over seeds and kernel paths."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["config"], r["kind"], r["per_class"]), []).append(r)
    lines = ["", "| config | folder | images/class | runs (seed/kernels) | min test acc | mean test acc | "
             "max steps to 90 % (budget) | mean steps run | min probe acc | mean probe acc | max probe steps to 90 % |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (config, kind, n), rs in sorted(groups.items()):
        acc = [r["test_accuracy"] for r in rs]
        which = " ".join(f"{r['seed']}/{r['isa']}" for r in rs)
        probed = [r for r in rs if r.get("probe_accuracy") is not None]
        probe = (f"{min(r['probe_accuracy'] for r in probed):.3f} | "
                 f"{statistics.mean(r['probe_accuracy'] for r in probed):.3f} | "
                 f"{max(r['probe_steps_to_90'] for r in probed)}") if len(probed) == len(rs) else "– | – | –"
        lines.append(f"| {config} | {kind} | {n} | {len(rs)}: {which} | {min(acc):.3f} | {statistics.mean(acc):.3f} | "
                     f"{max(r['steps_to_90'] for r in rs)} ({rs[0]['budget']}) | "
                     f"{statistics.mean(r['steps_run'] for r in rs):.0f} | {probe} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
