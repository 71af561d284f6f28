"""The docs cannot drift from the code: the site builds with --strict (no broken link or anchor) and fetches
nothing at view time; its generated parts (params reference, error list, results tables) are what the tools in
tools/ write from the code today; and every file, key and command the README and the docs name exists."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attention_cnn import params as schema
from attention_cnn.cli import build_parser
from attention_cnn.explain.report import FILE_KEYS
from attention_cnn.explain.scoring import SCORES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import attention_table  # noqa: E402
import error_messages  # noqa: E402
import params_reference  # noqa: E402
from docs_markers import generated_part  # noqa: E402

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _code(page: Path) -> str:
    """The page's code: fenced blocks and inline code spans, where commands, paths and keys are written."""
    text = _text(page)
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"``(.+?)``|`([^`\n]+)`", prose)
    return "\n".join(blocks + [a or b for a, b in spans])


# ---------------------------------------------------------------------------------------------------------
# The site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_every_page_is_in_the_site(site):
    for page in (REPO / "docs").glob("*.md"):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{page.name} was not built"


def test_the_site_fetches_nothing_when_viewed(site):
    """No script, style sheet or font from another host: the theme's fonts are off (theme.font: false) and its
    search index and code are files of the site. Material's bundle loads mermaid from a CDN only for a mermaid
    diagram, so the pages must have none."""
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        external = re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//[^\"]+\"", text)
        assert not external, f"{html.relative_to(site)} loads {external}"
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, html
        assert 'class="mermaid"' not in text, html
    assert (site / "search" / "search_index.json").is_file()


def test_the_readme_reads_in_five_minutes():
    lines = _text(REPO / "README.md").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move the detail to docs/"
    for history in ("issue", "the seed", "before issue", "2^17", "multigrid"):
        assert history not in _text(REPO / "README.md").lower(), f"README.md speaks of {history!r}"


# ---------------------------------------------------------------------------------------------------------
# Generated parts


def test_params_reference_is_the_schema():
    page = _text(params_reference.PAGE)
    assert generated_part(page, params_reference.MARKER) == params_reference.reference_tables(), \
        "docs/params.md is stale: run `python tools/params_reference.py`"


def test_every_params_key_has_a_meaning():
    assert params_reference.missing_meanings() == [], "add the key's one-line meaning to params.MEANINGS"
    assert params_reference.stale_meanings() == [], "params.MEANINGS names a key the schema no longer has"


def test_a_key_without_a_meaning_is_caught(monkeypatch):
    monkeypatch.setattr(schema, "MEANINGS", {k: v for k, v in schema.MEANINGS.items() if k != "train.lr"})
    assert params_reference.missing_meanings() == ["train.lr"]
    assert "no meaning in params.MEANINGS" in params_reference.reference_tables()


def test_params_reference_shows_defaults_and_allowed_values():
    tables = params_reference.reference_tables()
    assert "| `model.head` | `gmp` | one of 'gmp', 'gap', 'flatten', 'cam', 'class_attention' |" in tables
    assert "| `train.rdzv_endpoint` | `\"\"` |" in tables
    assert "| `evaluate.methods` | `[native, mask, attended, gradcam, ig, smoothgrad, occlusion, random, edge]` |" in tables


def test_troubleshooting_lists_every_error_line():
    messages, unresolved = error_messages.collect()
    assert unresolved == [], "tools/error_messages.py cannot follow these messages: " + "; ".join(
        f"{u.path}:{u.line} {u.expression}" for u in unresolved)
    assert error_messages.unused_advice(messages) == []
    assert generated_part(_text(error_messages.PAGE), error_messages.MARKER) == error_messages.page_part(messages), \
        "docs/troubleshooting.md is stale: run `python tools/error_messages.py`"


def test_troubleshooting_follows_messages_through_f_strings_variables_and_helpers(tmp_path):
    """A new error, raised in any of the shapes the code uses, is collected with its literal words."""
    src = tmp_path / "src" / "attention_cnn"
    src.mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    (src / "errors.py").write_text("class UserError(Exception):\n    pass\n")
    (src / "thing.py").write_text(
        "from attention_cnn.errors import UserError\n"
        "class ThingError(UserError):\n"
        "    def __init__(self, path):\n"
        "        super().__init__(f'{path}: the thing is broken. Mend it.')\n"
        "def _why(n):\n"
        "    return f'{n} widget' + ('s' if n > 1 else '') + ' missing. Add them.'\n"
        "def check(folder, n, items):\n"
        "    if n:\n"
        "        raise UserError(_why(n))\n"
        "    message = f'{folder}: holds {len(items)} file(s), none usable. Replace them.'\n"
        "    raise UserError(message)\n"
        "def other(x):\n"
        "    raise ThingError(x)\n"
        "def relay(exc):\n"
        "    raise UserError(str(exc).upper())\n")
    messages, unresolved = error_messages.collect(tmp_path)
    texts = sorted(m.text for m in messages)
    assert texts == ["<folder>: holds <number> file(s), none usable. Replace them.",
                     "<n> widget missing. Add them.", "<n> widgets missing. Add them.",
                     "<path>: the thing is broken. Mend it."]
    assert [u.expression for u in unresolved] == ["UserError(str(exc).upper())"]


def test_the_attention_tables_are_their_data():
    """README's and results.md's tables are what tools/attention_table.py writes from docs/data/, which holds
    what the evaluate stage writes (explain.json) for every method and score."""
    parts = attention_table.page_parts()
    for page, names in attention_table.PAGES.items():
        for name in names:
            assert generated_part(_text(page), name) == parts[name], \
                f"{page.name}: {name} is stale: run `python tools/attention_table.py --write`"
    summary = json.loads(_text(attention_table.DATA / "explain.json"))
    # every method, the native map included (every head has one), in evaluate's order
    assert list(summary["methods"]) == list(schema.EXPLAIN_METHODS)
    for entry in summary["methods"].values():
        assert set(entry) == set(SCORES) | {"mprt"}


def test_the_attention_table_tool_prints_the_readme_table(monkeypatch, capsys):
    """The tool's printing mode, run in this process (a second torch import would cost seconds)."""
    monkeypatch.setattr(sys, "argv", ["attention_table.py", str(attention_table.DATA / "explain.json")])
    assert attention_table.main() == 0
    assert capsys.readouterr().out.strip() == generated_part(_text(REPO / "README.md"), "attention-table").strip()
    monkeypatch.setattr(sys, "argv", ["attention_table.py", "--check"])
    assert attention_table.main() == 0


# ---------------------------------------------------------------------------------------------------------
# Every name the docs use exists


def _dvc_paths() -> list[str]:
    """What dvc.yaml declares: every stage's outs, the metrics files and the plots' files and folders."""
    dvc = yaml.safe_load(_text(REPO / "dvc.yaml"))
    paths = [out for stage in dvc["stages"].values() for out in stage.get("outs", [])]
    paths += dvc["metrics"]
    for plot in dvc["plots"]:
        if isinstance(plot, str):
            paths.append(plot)
        else:
            (spec,) = plot.values()
            paths += list(spec.get("y", {}))
    return paths


def _expand(path: str) -> list[str]:
    """A path as the docs write it, with `<method>` standing for each explanation method's file."""
    if "<method>" in path:
        return [path.replace("<method>", m) for m in schema.EXPLAIN_METHODS]
    return [path]


def test_docs_name_only_metrics_and_outputs_the_pipeline_writes():
    declared = _dvc_paths()
    source_text = "\n".join(_text(p) for p in (REPO / "src").rglob("*.py"))
    checked = 0
    for page in PAGES:
        for found in set(re.findall(r"(?<![\w./-])((?:metrics|output)/[\w./<>*-]*[\w>/])(?::(\w+|<score>))?",
                                    _code(page))):
            path, column = found
            for concrete in _expand(path.rstrip("/")):
                under = [d for d in declared if concrete == d or concrete.startswith(d.rstrip("/") + "/")]
                assert under, f"{page.name}: {concrete} is not an output, metric or plot of dvc.yaml"
                if concrete not in declared:  # a file inside an output folder: the code must name it
                    name = re.sub(r"<[^>]*>|\*", "", concrete.rsplit("/", 1)[-1])
                    assert name in source_text, f"{page.name}: nothing in src/ writes {concrete}"
            if column and column != "<score>":
                assert column in (*FILE_KEYS, "mprt"), f"{page.name}: {path} has no key {column}"
            checked += 1
    assert checked > 20  # the extraction found the docs' paths


def test_the_wrong_column_names_are_gone():
    for page in PAGES:
        assert "metrics/evaluate/<method>" not in _text(page), page.name
        assert "attention.json" not in _text(page), page.name


def test_docs_name_only_params_keys_that_exist():
    keys = {key for key, _ in params_reference.schema_keys()}
    sections = "|".join(f.name for f in dataclasses.fields(schema.Params))
    file_suffixes = ("py", "json", "yaml", "pt", "png", "md", "tsv", "csv", "lock", "sh", "txt")
    checked = 0
    for page in PAGES:
        code = _code(page)
        named = {k for k in re.findall(r"-S\s+'?([\w.]+)=", code) if k != "key"}  # `-S key=value`: a placeholder
        named |= {m for m in re.findall(rf"(?<![\w/.-])((?:{sections})\.\w+)(?![\w/-])", _text(page))
                  if m.rsplit(".", 1)[1] not in file_suffixes}
        for key in named:
            assert key in keys, f"{page.name} names params key {key!r}, which params.py does not have"
            checked += 1
    assert checked > 30


def _bash_commands(page: Path, program: str) -> list[str]:
    """The `<program> ...` commands of the page's bash blocks, one per command: continuation lines joined, `&&`
    chains split, a prompt (`gpu-a$ `) dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", _text(page), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                found = re.match(rf"\s*(?:[\w-]+\$\s+)?({program}\s.*)", part)
                if found:
                    commands.append(found.group(1))
    return commands


def test_docs_name_only_commands_that_exist():
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)
    targets = set(re.findall(r"^([\w-]+):", _text(REPO / "Makefile"), re.M))
    for page in PAGES:
        for command in _bash_commands(page, "attention-cnn"):
            try:
                parser.parse_args(shlex.split(command, comments=True)[1:])
            except SystemExit:
                pytest.fail(f"{page.name}: attention-cnn does not accept `{command}`")
        code = _code(page)
        for command in re.findall(r"attention-cnn[ \t]+([a-z][\w-]*)", code):
            assert command in subcommands, f"{page.name}: `attention-cnn {command}` is not a command"
        for target in re.findall(r"\bmake[ \t]+([a-z][\w-]*)", code):
            assert target in targets, f"{page.name}: `make {target}` is not a Makefile target"
        for path in re.findall(r"(?<![\w/.-])((?:tools|bench|stages|src|tests)/[\w./-]*\.(?:py|sh))", code):
            assert (REPO / path).is_file(), f"{page.name}: {path} does not exist"


def test_the_did_not_learn_warning_points_at_a_section_that_exists():
    from attention_cnn.metrics import SMALL_DATA_SECTION  # 'docs/your-folder.md, "Small folders"'

    page, heading = re.fullmatch(r'(.+), "(.+)"', SMALL_DATA_SECTION).groups()
    assert re.search(rf"^#+ {re.escape(heading)}$", _text(REPO / page), re.M), \
        f"the warning points at {SMALL_DATA_SECTION}, which does not exist"


def test_the_changelog_keeps_a_changelog():
    text = _text(REPO / "CHANGELOG.md")
    assert text.startswith("# Changelog") and "## [Unreleased]" in text
    assert re.findall(r"^### (Added|Changed|Fixed|Removed|Deprecated|Security)$", text, re.M)


def _anchors(page: Path) -> set[str]:
    """The ids the site gives the page's headings (Python-Markdown's toc slugify, as mkdocs.yml uses it)."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", _text(page), flags=re.S | re.M), re.M)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h.replace("`", "")).strip().lower()) for h in headings}


def test_the_readme_links_to_pages_and_headings_that_exist():
    """The README is not part of the site, so mkdocs --strict does not check its links."""
    links = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#([^)]+))?\)", _text(REPO / "README.md"))
    assert len(links) > 10
    for target, anchor in links:
        assert (REPO / target).is_file(), f"README.md links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(REPO / target), f"README.md links to {target}#{anchor}, which has no such heading"


def test_docs_dvc_commands_parse():
    """Every `dvc` command of a bash block is one DVC's own parser accepts (command, sub-command and options);
    a `dvc ...` in the prose names a command that exists."""
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    parser = get_main_parser()
    commands = parser._subparsers._group_actions[0].choices
    parsed = 0
    for page in PAGES:
        for command in _bash_commands(page, "dvc"):
            try:
                parser.parse_args(shlex.split(command, comments=True)[1:])
            except (DvcParserError, SystemExit):
                pytest.fail(f"{page.name}: DVC does not accept `{command}`")
            parsed += 1
        for words in re.findall(r"(?<![\w/-])dvc ([a-z-]+)(?: ([a-z-]+))?", _code(page)):
            name, sub = words
            assert name in commands, f"{page.name}: `dvc {name}` is not a DVC command"
            subcommands = getattr(commands[name], "_subparsers", None)
            if subcommands and sub:
                assert sub in subcommands._group_actions[0].choices, \
                    f"{page.name}: `dvc {name} {sub}` is unknown"
    assert parsed > 30  # the extraction found the docs' commands
