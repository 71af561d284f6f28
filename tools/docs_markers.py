"""The generated parts of the docs: a page's text between `<!-- BEGIN name -->` and `<!-- END name -->`.

The tools in tools/ write those parts from the code; tests/test_docs.py checks that the committed pages still
hold what the tools would write, so the docs cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- BEGIN {re.escape(name)}[^>]*-->\n)(.*?)(<!-- END {re.escape(name)} -->)", re.S)


def generated_part(text: str, name: str) -> str:
    """The text between the markers `name` (without them); KeyError when the page lacks them."""
    match = _pattern(name).search(text)
    if match is None:
        raise KeyError(f"no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
    return match.group(2)


def with_generated_part(text: str, name: str, content: str) -> str:
    """`text` with the part between the markers `name` replaced by `content` (which ends with a newline)."""
    generated_part(text, name)  # the markers must be there
    return _pattern(name).sub(lambda m: m.group(1) + content + m.group(3), text, count=1)


def check_or_write(page: Path, name: str, content: str, check: bool, command: str) -> tuple[bool, str]:
    """A tool's two modes on `page`'s part `name`: with `check`, (False, an error line naming `command`) when the
    committed part is not `content`; else write it. (True, what happened) otherwise."""
    label = page.relative_to(ROOT)
    if check:
        stale = generated_part(page.read_text(encoding="utf-8"), name) != content
        return (False, f"error: {label} is stale: run `{command}`") if stale else (True, f"{label}: up to date")
    return True, f"{label}: {'rewritten' if write_generated_part(page, name, content) else 'up to date'}"


def write_generated_part(page: Path, name: str, content: str) -> bool:
    """Rewrite `page`'s part `name`; True when it changed."""
    text = page.read_text(encoding="utf-8")
    new = with_generated_part(text, name, content)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text
