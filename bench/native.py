"""Which design makes the best native map? Each design trained and evaluated by the project's own train and
evaluate functions at params.yaml's defaults (plus the design's model keys), on one folder; one JSON per run.

    # the built-in sample at 64 px (drawn and prepared once into --work), one design per process:
    OMP_NUM_THREADS=1 nice .venv/bin/python bench/native.py run --design cam-conv --work /tmp/native-bench
    # a synthetic folder (data/synthetic.py) instead of the sample:
    OMP_NUM_THREADS=1 nice .venv/bin/python bench/native.py run --design cam-conv --folder shapes --per-class 300
    # the design x score table, mean [95 % bootstrap interval], and native's paired p-values:
    .venv/bin/python bench/native.py table --work /tmp/native-bench
    # two finished designs' native maps on the same mosaics (does the attention earn its place?):
    .venv/bin/python bench/native.py paired --runs gmp-conv gmp-none --work /tmp/native-bench

Designs: the model keys each sets (DESIGNS). Training never sees a score: it is the project's training run with
its own loss. Every evaluate score comes from output/evaluate/explain.json of that run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from attention_cnn.data.prepare import prepare
from attention_cnn.data.sample import write_sample
from attention_cnn.data.synthetic import write_folder
from attention_cnn.evaluate import evaluate
from attention_cnn.params import parse_params
from attention_cnn.training.train import train

REPO = Path(__file__).resolve().parents[1]
DESIGNS = {
    "cam-conv": {"head": "cam", "attention": "conv"},
    "cam-none": {"head": "cam", "attention": "none"},
    "cam-spatial": {"head": "cam", "attention": "spatial"},
    "cam-ltpa": {"head": "cam", "attention": "ltpa"},
    "ca-conv": {"head": "class_attention", "attention": "conv"},
    "ca-none": {"head": "class_attention", "attention": "none"},
    "ca-spatial": {"head": "class_attention", "attention": "spatial"},
    "gmp-conv": {"head": "gmp", "attention": "conv"},  # the default: native is its gated head's exact decomposition
    "gmp-none": {"head": "gmp", "attention": "none"},
}
SHOWN = ("native", "mask", "gradcam", "ig", "smoothgrad", "occlusion", "random")
SCORES = (("gpg", "grid PG"), ("road", "ROAD"), ("mass", "rel. mass"), ("pg", "PG"))


def base_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def folder_name(args) -> str:
    return "sample" if args.folder == "sample" else f"{args.folder}{args.per_class}"


def prepared_folder(args, raw: dict) -> Path:
    """Draw and prepare the folder once per --work; concurrent runs of other designs reuse it."""
    work = Path(args.work) / folder_name(args)
    prepared = work / "prepared"
    if (prepared / "test.pt").is_file():
        return prepared
    source = work / "source"
    if not source.is_dir():
        if args.folder == "sample":
            write_sample(source, seed=raw["seed"], images_per_class=raw["sample"]["images_per_class"],
                         image_size=raw["sample"]["image_size"], jpeg_quality=raw["sample"]["jpeg_quality"])
        else:
            write_folder(source, args.folder, args.per_class, seed=raw["seed"])
    params = parse_params({**raw, "data": {**raw["data"], "source": str(source)}})
    prepare(params, out_dir=prepared, progress=False)
    return prepared


def run(args) -> None:
    torch.set_num_threads(1)
    raw = base_params()
    prepared = prepared_folder(args, raw)
    raw["model"] = {**raw["model"], **DESIGNS[args.design]}
    for item in args.set or []:
        key, value = item.split("=", 1)
        if "." not in key:  # a top-level key: seed, img_size
            raw[key] = yaml.safe_load(value)
            continue
        section, name = key.split(".")
        raw[section] = {**raw[section], name: yaml.safe_load(value)}
    params = parse_params({**raw, "data": {**raw["data"], "source": str(prepared.parent / "source")}})
    out = Path(args.work) / folder_name(args) / (args.design + (f"-{args.tag}" if args.tag else ""))
    start = time.perf_counter()
    train(params, prepared_dir=prepared, model_path=out / "model.pt", checkpoint_dir=out / "checkpoints",
          metrics_dir=out / "metrics/train", progress=False)
    trained = time.perf_counter() - start
    if args.train_only:
        print(json.dumps({"design": args.design, "tag": args.tag, "train_s": trained}))
        return
    result = evaluate(params, prepared, out / "model.pt", out / "metrics/evaluate", out / "output/evaluate")
    row = {"design": args.design, "tag": args.tag, "folder": folder_name(args), "model": raw["model"],
           "accuracy": result.report.accuracy, "train_s": trained,
           "evaluate_s": time.perf_counter() - start - trained, "explained": result.explained}
    (out / "row.json").write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps({k: row[k] for k in ("design", "folder", "accuracy", "train_s", "evaluate_s")}))
    print(result.explained.get("verdict", "no native map"))


def regrid(args) -> None:
    """Re-score only the grid pointing game of a finished run with the current code (its other scores stay):
    the same mosaics, methods and statistics as evaluate (evaluate.grid_mosaics, report.paired_scores)."""
    from attention_cnn.data.prepared import load_split
    from attention_cnn.evaluate import grid_mosaics
    from attention_cnn.explain.report import POST_HOC
    from attention_cnn.explain.scoring import build_methods, channels_last, positive_maps
    from attention_cnn.explain.metrics.grid import grid_scores
    from attention_cnn.explain.statistics import bootstrap_ci, paired_p_value
    from attention_cnn.inference import load_for_inference, predict_logits

    torch.set_num_threads(1)
    out = Path(args.work) / folder_name(args) / (args.design + (f"-{args.tag}" if args.tag else ""))
    row = json.loads((out / "row.json").read_text())
    raw = base_params()
    raw["model"] = row["model"]
    params = parse_params(raw)
    trained = load_for_inference(out / "model.pt")
    test = load_split(Path(args.work) / folder_name(args) / "prepared", "test")
    logits = predict_logits(trained.model, test.images, params.evaluate.batch_size)
    mosaics, skipped = grid_mosaics(trained.model, test.images, test.labels, logits, len(test.classes), params)
    if mosaics is None:
        raise SystemExit(skipped)
    model, _ = channels_last(trained.model, test.images[:1].float())
    x = (mosaics.images.float() / 255).contiguous(memory_format=torch.channels_last)
    results = {}
    for method in build_methods(params.evaluate.methods, model, params.seed, params.evaluate.batch_size):
        grid = grid_scores(positive_maps(method, model, x, mosaics.targets, params.evaluate.batch_size), mosaics)
        interval = bootstrap_ci(grid, seed=params.seed)
        row["explained"]["methods"][method.name]["gpg"] = {"mean": interval.mean, "low": interval.low,
                                                            "high": interval.high}
        row["explained"]["methods"][method.name].pop("grid", None)
        results[method.name] = grid
    for other in (m for m in POST_HOC if "native" in results and m in results):
        tests = row["explained"]["native"][other]
        tests.pop("grid", None)
        tests["gpg"] = {"difference": float((results["native"] - results[other]).double().mean()),
                        "p": paired_p_value(results["native"], results[other], seed=params.seed)}
    row["regrid"] = "grid pointing game re-scored on the positive part of the raw maps"
    (out / "row.json").write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps({m: round(row["explained"]["methods"][m]["gpg"]["mean"], 3) for m in results}))


def paired(args) -> None:
    """Finished runs' native maps on the same mosaics, paired: `--runs A B` (run folders: design[-tag]), or
    `--runs A1 B1 A2 B2 ...` for A against B at several training seeds. Each run's own evaluate draws its mosaics
    from the test images its model classifies confidently, so two designs' grid scores come from different
    mosaics and only their intervals can be compared. Here the mosaics are drawn (with evaluate's rules, seed and
    count) from the test images every listed model classifies confidently, and each mosaic's score difference is
    bootstrapped, as evaluate pairs native with a post-hoc method."""
    from attention_cnn.data.prepared import load_split
    from attention_cnn.explain.metrics.grid import build_mosaics, confident, grid_scores
    from attention_cnn.explain.methods import NativeMap
    from attention_cnn.explain.scoring import channels_last, positive_maps
    from attention_cnn.explain.statistics import bootstrap_ci, paired_p_value
    from attention_cnn.inference import load_for_inference, predict_logits

    if len(args.runs) % 2:
        raise SystemExit("--runs takes pairs: A B, or A1 B1 A2 B2 ...")
    torch.set_num_threads(1)
    params = parse_params(base_params())
    folder = Path(args.work) / folder_name(args)
    test = load_split(folder / "prepared", "test")
    models = [load_for_inference(folder / run / "model.pt").model for run in args.runs]
    eligible = torch.ones(len(test), dtype=torch.bool)
    for model in models:
        logits = predict_logits(model, test.images, params.evaluate.batch_size)
        eligible &= confident(logits.softmax(dim=1), test.labels, params.evaluate.grid_confidence)
    count = args.mosaics or params.evaluate.mosaics
    mosaics = build_mosaics(test.images, test.labels, eligible, len(test.classes), count, params.seed)
    if mosaics is None:
        raise SystemExit("too few test images that every model classifies confidently")
    print(f"{count} mosaics of the {int(eligible.sum())} of {len(test)} test images every model classifies with "
          f"p >= {params.evaluate.grid_confidence}")
    x = mosaics.images.float() / 255
    scores = {}
    for run, model in zip(args.runs, models):
        fast, fast_x = channels_last(model, x)
        scores[run] = grid_scores(positive_maps(NativeMap(), fast, fast_x, mosaics.targets,
                                                params.evaluate.batch_size), mosaics)
        interval = bootstrap_ci(scores[run], seed=params.seed)
        print(f"- {run}: native grid PG {interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]")
    pairs = list(zip(args.runs[0::2], args.runs[1::2]))
    for a, b in pairs:
        difference = bootstrap_ci(scores[a] - scores[b], seed=params.seed)
        print(f"- {a} − {b}: {difference.mean:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}], "
              f"paired p {p_text(paired_p_value(scores[a], scores[b], seed=params.seed))}")
    if len(pairs) > 1:  # each mosaic's score averaged over the training seeds, then paired as above
        first = torch.stack([scores[a] for a, _ in pairs]).mean(0)
        second = torch.stack([scores[b] for _, b in pairs]).mean(0)
        difference = bootstrap_ci(first - second, seed=params.seed)
        print(f"- mean over the {len(pairs)} pairs: {difference.mean:+.3f} [{difference.low:+.3f}, "
              f"{difference.high:+.3f}], paired p {p_text(paired_p_value(first, second, seed=params.seed))}")


def cell(entry: dict, key: str) -> str:
    if key not in entry:
        return "–"
    e = entry[key]
    return f"{e['mean']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def renamed(row: dict) -> dict:
    """Rows written before the score's key became "gpg" call it "grid"."""
    for entry in [*row["explained"]["methods"].values(), *row["explained"].get("native", {}).values()]:
        if "grid" in entry:
            entry.setdefault("gpg", entry.pop("grid"))
    return row


def table(args) -> None:
    rows = [renamed(json.loads(p.read_text())) for p in sorted(Path(args.work).glob("*/*/row.json"))]
    for folder in sorted({r["folder"] for r in rows}):
        print(f"\n### {folder}\n")
        print("| design | acc | map | " + " | ".join(label for _, label in SCORES) + " |")
        print("|---|---|---|" + "---|" * len(SCORES))
        for r in (r for r in rows if r["folder"] == folder):
            name = r["design"] + (f" ({r['tag']})" if r["tag"] else "")
            methods = r["explained"]["methods"]
            for method in (m for m in SHOWN if m in methods):
                print(f"| {name} | {r['accuracy']:.3f} | {method} | "
                      + " | ".join(cell(methods[method], k) for k, _ in SCORES) + " |")
        print("\nnative − post-hoc, paired bootstrap (difference, p):\n")
        for r in (r for r in rows if r["folder"] == folder and "native" in r["explained"]):
            name = r["design"] + (f" ({r['tag']})" if r["tag"] else "")
            for other, tests in r["explained"]["native"].items():
                parts = [f"{label} {tests[k]['difference']:+.3f} (p {p_text(tests[k]['p'])})"
                         for k, label in SCORES if k in tests]
                print(f"- {name} vs {other}: " + ", ".join(parts))
        print("\ntimes (1 thread): " + ", ".join(f"{r['design']}{'-' + r['tag'] if r['tag'] else ''} train "
                                                f"{r['train_s']:.0f} s, evaluate {r['evaluate_s']:.0f} s"
                                                for r in rows if r["folder"] == folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("--design", choices=list(DESIGNS), required=True)
    one.add_argument("--folder", choices=["sample", "shapes", "textures"], default="sample")
    one.add_argument("--per-class", type=int, default=300)
    one.add_argument("--work", default="/tmp/native-bench")
    one.add_argument("--set", action="append", help="section.key=value over params.yaml, e.g. train.steps=800")
    one.add_argument("--tag", default="", help="a suffix for the run's folder, for --set variants")
    one.add_argument("--train-only", action="store_true", help="no evaluate (for `paired`, which needs the model)")
    again = sub.add_parser("regrid", help="re-score a finished run's grid pointing game only")
    again.add_argument("--design", choices=list(DESIGNS), required=True)
    again.add_argument("--folder", choices=["sample", "shapes", "textures"], default="sample")
    again.add_argument("--per-class", type=int, default=300)
    again.add_argument("--work", default="/tmp/native-bench")
    again.add_argument("--tag", default="")
    every = sub.add_parser("table")
    every.add_argument("--work", default="/tmp/native-bench")
    pair = sub.add_parser("paired", help="two finished designs' native maps on the same mosaics")
    pair.add_argument("--runs", nargs="+", required=True, help="run folders in pairs, e.g. gmp-conv gmp-none")
    pair.add_argument("--folder", choices=["sample", "shapes", "textures"], default="sample")
    pair.add_argument("--per-class", type=int, default=300)
    pair.add_argument("--mosaics", type=int, default=0, help="how many (default: evaluate.mosaics)")
    pair.add_argument("--work", default="/tmp/native-bench")
    args = parser.parse_args()
    {"run": run, "regrid": regrid, "table": table, "paired": paired}[args.command](args)


if __name__ == "__main__":
    main()
