"""Write the params reference (docs/params.md) from params.py's schema: every key of params.yaml with its
default, the values it accepts and its one-line meaning (params.MEANINGS).

    python tools/params_reference.py           # rewrite the table in docs/params.md
    python tools/params_reference.py --check   # exit 1 when the page and the code disagree

Run it after adding or changing a key in src/attention_cnn/params.py (add the key's line to MEANINGS first).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_cnn import params as schema  # noqa: E402
from docs_markers import DOCS, check_or_write  # noqa: E402

PAGE = DOCS / "params.md"
MARKER = "params-reference"


def schema_keys(cls: type = schema.Params, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf key of the schema, dotted (`train.lr`), in params.yaml's order, with its field."""
    keys = []
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys += schema_keys(f.default_factory, prefix + f.name + ".")
        else:
            keys.append((prefix + f.name, f))
    return keys


def missing_meanings() -> list[str]:
    return [key for key, _ in schema_keys() if not schema.MEANINGS.get(key, "").strip()]


def stale_meanings() -> list[str]:
    keys = {key for key, _ in schema_keys()}
    return sorted(set(schema.MEANINGS) - keys)


def _yaml_value(value: object) -> str:
    """A default as params.yaml spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_tables() -> str:
    """One markdown table per section of params.yaml: key, default, allowed values, meaning."""
    sections: dict[str, list[str]] = {}
    for key, f in schema_keys():
        section = key.split(".")[0] if "." in key else "Top-level keys"
        allowed = schema._describe(f.metadata)
        meaning = schema.MEANINGS.get(key, "").strip() or "**(no meaning in params.MEANINGS)**"
        row = f"| `{key}` | `{_yaml_value(f.default)}` | {_cell(allowed)} | {_cell(meaning)} |"
        sections.setdefault(section, []).append(row)
    out = []
    for section, rows in sections.items():
        out += [f"## {section}", "", "| key | default | allowed | meaning |", "| --- | --- | --- | --- |", *rows, ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when docs/params.md is stale")
    args = parser.parse_args()
    problems = [f"params.MEANINGS has no line for '{k}'" for k in missing_meanings()]
    problems += [f"params.MEANINGS names '{k}', which is not a key of the schema" for k in stale_meanings()]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    fresh, said = check_or_write(PAGE, MARKER, reference_tables(), args.check, "python tools/params_reference.py")
    print(said, file=sys.stdout if fresh else sys.stderr)
    return 0 if fresh and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
