"""What a person reads: the metrics files `dvc metrics show` lists, the plot data, and the README's table.

`dvc metrics show` makes one column of every key of every file it lists, shared by all rows, and must fit 160
columns beside the headline's seven. So each method's file holds seven short keys, the same in every file:
    del   deletion AUC (mean fill), lower is better      ins   insertion AUC (from blur), higher is better
    road  ROAD, mean of (LeRF - MoRF) / 2, higher        pg    pointing game hit rate, higher
    mass  relevance mass accuracy, higher                mprt  sanity check: Spearman correlation with the
    gpg   grid pointing game: share of the map's positive      intact model's maps once every layer is
          mass in the explained class's cell, per mosaic,      randomised, lower is better (a pass is near 0)
          higher (three letters: a four-letter key would make the table 161 columns wide)
and the uncertainty comes in extra ROWS that share those columns, not in more columns:
    metrics/maps/<method>.json   the means over images          (rounded to 3 decimals, pg to 2: the intervals
                                                                are wider; see SHORT)
    metrics/ci/<method>.json     the 95 % bootstrap interval's half-width, (high - low) / 2
    metrics/ci/paired.json       p-values of the learned mask against Grad-CAM, paired bootstrap, per score
    metrics/ci/vs-<m>.json       p-values of the native map against post-hoc method m (gradcam, ig, smoothgrad,
                                 occlusion), the same test (a short name: the path column counts too)
Everything at full precision, with both interval ends, is in output/evaluate/explain.json, which
`python tools/attention_table.py` prints as the README's markdown table.
Every file dvc.yaml declares is written on every run, so `dvc metrics show` never fails to load one: a method
that was not scored (not in evaluate.methods, or the mask of a model without one) and a score that was not
(no ground-truth masks) hold null. So does an interval or p-value from fewer than MIN_IMAGES images
(statistics.py): null in JSON, "–" in the table.
"""

from __future__ import annotations

import math

from attention_cnn.explain.scoring import METHODS, SCORES, Scored
from attention_cnn.explain.statistics import MIN_IMAGES, bootstrap_ci, paired_p_value

FILE_KEYS = ("del", "ins", "road", "pg", "mass", "gpg")  # + "mprt"
PAIRED = ("mask", "gradcam")
NATIVE = "native"
POST_HOC = ("gradcam", "ig", "smoothgrad", "occlusion")  # the field's methods the native map must beat
DECIMALS = 3
# The pointing game's hit rate moves in steps of 1/images (0.017 at 60) and its interval is +-0.07 or wider:
# two decimals say all it knows, and keep `dvc metrics show` within 160 columns (DVC makes each column as wide as
# its header + 4 or its widest value + 2).
SHORT = {"pg": 2}


def summarize(scored: Scored, seed: int) -> dict:
    """The content of output/evaluate/explain.json: per method and score {mean, low, high}, `mprt`, the paired
    test of PAIRED, and the sanity-check layers."""
    methods = {}
    for name, result in scored.methods.items():
        entry = {}
        for key in SCORES:
            interval = bootstrap_ci(result.scores[key], seed=seed)
            if not math.isnan(interval.mean):
                entry[key] = {"mean": interval.mean, "low": _number(interval.low), "high": _number(interval.high)}
        if scored.cascade is not None:
            entry["mprt"] = scored.cascade.correlation[name][-1]
        methods[name] = entry
    summary = {"methods": methods, "images": int(scored.targets.numel())}
    if scored.mosaics is not None:
        summary["mosaics"] = {"count": scored.mosaics.count, "layout": list(scored.mosaics.layout)}
    a, b = PAIRED
    if a in scored.methods and b in scored.methods:
        summary["paired"] = {"methods": list(PAIRED), "scores": paired_scores(scored, a, b, seed)}
    if NATIVE in scored.methods:
        summary["native"] = {other: paired_scores(scored, NATIVE, other, seed) for other in POST_HOC
                             if other in scored.methods}
    if scored.cascade is not None:
        summary["sanity_layers"] = scored.cascade.layers
    return summary


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _rounded(key: str, value: float | None) -> float | None:
    return None if value is None else round(value, SHORT.get(key, DECIMALS))


def paired_scores(scored: Scored, a: str, b: str, seed: int) -> dict[str, dict[str, float | None]]:
    """{score: {"difference": mean(a - b), "p": paired bootstrap p-value}} over the units both scored; p is None
    below MIN_IMAGES units."""
    paired = {}
    for key in SCORES:
        diff = scored.methods[a].scores[key] - scored.methods[b].scores[key]
        diff = diff[~diff.isnan()]
        if diff.numel():
            p = paired_p_value(scored.methods[a].scores[key], scored.methods[b].scores[key], seed=seed)
            paired[key] = {"difference": float(diff.double().mean()), "p": _number(p)}
    return paired


def verdict(summary: dict, other: str = "gradcam") -> str | None:
    """One plain sentence: does the native map explain THIS model better than `other` on the grid pointing game
    and ROAD? None when either map was not scored."""
    methods, tests = summary["methods"], summary.get("native", {}).get(other)
    if NATIVE not in methods or tests is None:
        return None
    title = {"gradcam": "Grad-CAM"}.get(other, other)
    parts, wins, losses = [], 0, 0
    for key, label in (("gpg", "grid pointing game"), ("road", "ROAD")):
        if key not in methods[NATIVE] or key not in methods[other] or key not in tests:
            continue
        ours, theirs, p = methods[NATIVE][key]["mean"], methods[other][key]["mean"], tests[key]["p"]
        parts.append(f"{label} {ours:.2f} vs {theirs:.2f} (paired {_p_text(p)})")
        significant = p is not None and p < 0.05
        wins += significant and ours > theirs
        losses += significant and ours < theirs
    if not parts:
        return None
    if wins == len(parts):
        claim = f"the native map explains this model better than {title}"
    elif losses == len(parts):
        claim = f"the native map explains this model worse than {title}"
    elif wins and not losses:
        claim = f"the native map explains this model better than {title} on one score and no worse on the other"
    elif losses and not wins:
        claim = f"the native map explains this model worse than {title} on one score and no better on the other"
    elif wins and losses:
        claim = f"the native map and {title} each explain this model better on one score"
    else:
        claim = f"the native map and {title} explain this model equally well, as far as these images can tell"
    return f"{claim}: {', '.join(parts)}."


def metric_files(summary: dict) -> dict[str, dict[str, float | None]]:
    """{relative path under metrics/: content}: maps/<method>.json and ci/<method>.json of every method,
    ci/paired.json and ci/vs-<m>.json of every post-hoc method, each with every key; null where nothing was
    scored."""
    files = {}
    for name in METHODS:
        entry = summary["methods"].get(name, {})
        means = {k: _rounded(k, entry[k]["mean"]) if k in entry else None for k in FILE_KEYS}
        means["mprt"] = _rounded("mprt", entry.get("mprt"))
        files[f"maps/{name}.json"] = means
        files[f"ci/{name}.json"] = {k: _half_width(k, entry.get(k)) for k in FILE_KEYS}
    tests = {"paired": summary.get("paired", {}).get("scores", {}),
             **{f"vs-{other}": summary.get("native", {}).get(other, {}) for other in POST_HOC}}
    for name, scores in tests.items():
        files[f"ci/{name}.json"] = {k: _rounded(k, scores[k]["p"]) if k in scores else None for k in FILE_KEYS}
    return files


def _half_width(key: str, score: dict | None) -> float | None:
    if score is None or score["low"] is None:
        return None
    return _rounded(key, (score["high"] - score["low"]) / 2)


def road_records(scored: Scored, fractions: tuple[float, ...]) -> dict[str, list[dict]]:
    """Plot data: {"morf": [...], "lerf": [...]}, one {"method", "removed", "probability"} record per point."""
    return {order: [{"method": name, "removed": f, "probability": float(getattr(r, order)[i])}
                    for name, r in scored.methods.items() for i, f in enumerate(fractions)]
            for order in ("morf", "lerf")}


def sanity_records(scored: Scored) -> list[dict]:
    """Plot data: one {"method", "layers", "layer", "spearman"} record per method and cascade step."""
    cascade = scored.cascade
    if cascade is None:
        return []
    names = ["none", *cascade.layers]
    return [{"method": method, "layers": step, "layer": names[step], "spearman": value}
            for method, values in cascade.correlation.items() for step, value in enumerate(values)]


HEADERS = {"del": "deletion AUC ↓", "ins": "insertion AUC ↑", "morf": "ROAD MoRF ↓", "lerf": "ROAD LeRF ↑",
           "road": "ROAD ↑", "pg": "pointing game ↑", "mass": "relevance mass ↑", "gpg": "grid pointing game ↑"}


def markdown_table(summary: dict) -> str:
    """The methods x scores table, each cell `mean [low, high]` (95 % bootstrap interval over images)."""
    keys = [k for k in SCORES if any(k in e for e in summary["methods"].values())]
    has_mprt = any("mprt" in e for e in summary["methods"].values())
    head = ["method", *[HEADERS[k] for k in keys]] + (["sanity ρ ↓"] if has_mprt else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in summary["methods"].items():
        cells = [f"`{name}`"]
        for k in keys:
            cells.append("–" if k not in entry else f"{entry[k]['mean']:.3f} [–]" if entry[k]["low"] is None
                         else f"{entry[k]['mean']:.3f} [{entry[k]['low']:.3f}, {entry[k]['high']:.3f}]")
        if has_mprt:
            cells.append(f"{entry['mprt']:.2f}" if "mprt" in entry else "–")
        lines.append("| " + " | ".join(cells) + " |")
    pairs = []
    if "paired" in summary:
        pairs.append((*summary["paired"]["methods"], summary["paired"]["scores"]))
    pairs += [(NATIVE, other, tests) for other, tests in summary.get("native", {}).items()]
    for a, b, scores in pairs:
        tests = ", ".join(f"{HEADERS[k].rstrip(' ↑↓')} {v['difference']:+.3f} ({_p_text(v['p'])})"
                          for k, v in scores.items())
        units = f"{summary['images']} images" + (f" ({summary['mosaics']['count']} mosaics for the grid pointing game)"
                                                 if "mosaics" in summary else "")
        lines += ["", f"`{a}` − `{b}`, paired bootstrap over the same {units}: {tests}."]
    if any("[–]" in line or "p –" in line for line in lines):
        lines += ["", f"[–], p –: no interval or p-value from fewer than {MIN_IMAGES} scored images."]
    return "\n".join(lines)


def _p_text(p: float | None) -> str:
    return "p –" if p is None else "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
