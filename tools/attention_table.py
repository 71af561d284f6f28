"""The docs' tables of the evaluate stage's results, from its outputs.

    python tools/attention_table.py [output/evaluate/explain.json]   # print the methods x scores table
    python tools/attention_table.py --update   # copy a `dvc repro`'s outputs into docs/data/, then --write
    python tools/attention_table.py --write    # rewrite the tables of docs/results.md and README.md
    python tools/attention_table.py --check    # exit 1 when those pages and docs/data/ disagree

docs/results.md shows two tables the code produces, and README.md the first: the methods x scores table (each
score's mean with its 95 % bootstrap interval, and the paired test of the learned mask against Grad-CAM:
explain.report.markdown_table) and the rows `dvc metrics show` prints (explain.report.metric_files). Both are
written from docs/data/explain.json (a copy of output/evaluate/explain.json) and docs/data/metrics.json (of
metrics/evaluate/metrics.json), committed because the pipeline's outputs are not. Run `dvc repro evaluate` on
the default params, then `python tools/attention_table.py --update`.

The explain.json committed first holds the published numbers at the precision they were published (3 decimals;
the full-precision file of that run was not kept), so a half-width in the `dvc metrics show` rows may differ in
the third decimal from what that run printed. `--update` replaces it with a run's own file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

from attention_cnn.explain.report import markdown_table, metric_files  # noqa: E402
from docs_markers import DOCS, ROOT, generated_part, write_generated_part  # noqa: E402

# The pages that show the tables: the marker names each page holds, all from the same docs/data/.
PAGES = {DOCS / "results.md": ("attention-table", "metrics-show"), ROOT / "README.md": ("attention-table",)}
DATA = DOCS / "data"
OUTPUTS = {"explain.json": ROOT / "output/evaluate/explain.json",
           "metrics.json": ROOT / "metrics/evaluate/metrics.json"}


def _shown(value: object) -> str:
    """A metric as `dvc metrics show` prints it: `-` for a key the file lacks or holds as null."""
    return "-" if value is None else str(value)


def metrics_show(headline: dict, summary: dict) -> str:
    """The table `dvc metrics show` prints: one row per metrics file of dvc.yaml that the run wrote, in
    dvc.yaml's order, one column per key (sorted, as DVC does)."""
    files = {"metrics/evaluate/metrics.json": headline}
    files.update({f"metrics/{path}": content for path, content in metric_files(summary).items()})
    order = yaml.safe_load((ROOT / "dvc.yaml").read_text())["metrics"]
    rows = [(path, files[path]) for path in order if path in files]
    keys = sorted({key for _, content in rows for key in content})
    table = [["Path", *keys]] + [[path, *(_shown(content.get(k)) for k in keys)] for path, content in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "```text\n" + "\n".join(lines) + "\n```\n"


def page_parts(data: Path = DATA) -> dict[str, str]:
    """{marker name: generated content} for docs/results.md."""
    summary = json.loads((data / "explain.json").read_text(encoding="utf-8"))
    headline = json.loads((data / "metrics.json").read_text(encoding="utf-8"))
    return {"attention-table": markdown_table(summary) + "\n", "metrics-show": metrics_show(headline, summary)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("explain", nargs="?", default=str(OUTPUTS["explain.json"]),
                        help="explain.json to print the table of (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true",
                      help="copy the pipeline's outputs to docs/data/, then write")
    mode.add_argument("--write", action="store_true",
                      help="rewrite the tables of docs/results.md and README.md from docs/data/")
    mode.add_argument("--check", action="store_true", help="exit 1 when those tables are stale")
    args = parser.parse_args()
    if not (args.update or args.write or args.check):
        path = Path(args.explain)
        if not path.is_file():
            sys.exit(f"{path}: not found. Run `dvc repro evaluate` first.")
        print(markdown_table(json.loads(path.read_text(encoding="utf-8"))))
        return 0
    if args.update:
        for name, source in OUTPUTS.items():
            if not source.is_file():
                sys.exit(f"{source}: not found. Run `dvc repro evaluate` on the default params first.")
            shutil.copyfile(source, DATA / name)
    parts = page_parts()
    stale = False
    for page, names in PAGES.items():
        where = page.relative_to(ROOT)
        if args.check:
            text = page.read_text(encoding="utf-8")
            for name in (n for n in names if generated_part(text, n) != parts[n]):
                print(f"error: {where}: {name} is stale: run `python tools/attention_table.py --write`",
                      file=sys.stderr)
                stale = True
        else:
            changed = [name for name in names if write_generated_part(page, name, parts[name])]
            print(f"{where}: {'rewrote ' + ', '.join(changed) if changed else 'up to date'}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
