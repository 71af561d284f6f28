"""Write the list of `error:` lines on the troubleshooting page (docs/troubleshooting.md) from the code.

    python tools/error_messages.py           # rewrite the list in docs/troubleshooting.md
    python tools/error_messages.py --check   # exit 1 when the page and the code disagree

A command prints `error: <message>` and exits with status 2 for every UserError it raises (errors.py), and the
stage scripts print one more line themselves when the venv is missing (startup.py). This tool reads src/ and
stages/ with `ast` and collects every such message:

- `raise X(...)` where X is UserError or a subclass of it (ParamsError, DiskFullError, ...); a subclass that
  builds its message in `__init__` contributes the string it passes to `super().__init__`;
- the message may be a string, an f-string, `+` of them or `a if c else b`; a local variable or a call of a
  function of the same module is followed to the strings assigned to it or returned;
- `print("error: ...")`.

An f-string's expressions are shown as `<name>`, so the page matches the message whatever the values.
A message the tool cannot follow (built elsewhere, or by str.format) is reported, and fails the test: give it
as a literal or an f-string where it is raised or returned.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_markers import DOCS, ROOT, check_or_write  # noqa: E402

PAGE = DOCS / "troubleshooting.md"
MARKER = "error-messages"
SOURCES = ("src", "stages")

# Sections of the page, by the module that raises: first match of the path's prefix wins.
SECTIONS = (
    ("src/attention_cnn/startup.py", "Environment"),
    ("src/attention_cnn/params.py", "params.yaml"),
    ("src/attention_cnn/data/prepared.py", "Prepared data"),
    ("src/attention_cnn/data/", "Your image folder (`data.source`)"),
    ("src/attention_cnn/atomic.py", "Output folders and disk space"),
    ("src/attention_cnn/training/distributed.py", "Devices and several machines"),
    ("src/attention_cnn/training/", "Training"),
    ("src/attention_cnn/memory.py", "Training"),
    ("src/attention_cnn/model.py", "Model files"),
    ("src/attention_cnn/inference.py", "Model files"),
    ("src/attention_cnn/predict.py", "`attention-cnn predict`"),
    ("src/attention_cnn/cli.py", "`attention-cnn` commands"),
    ("src/attention_cnn/panels.py", "Figures"),
    ("src/attention_cnn/explain/", "Evaluate"),
    ("src/attention_cnn/evaluate.py", "Evaluate"),
    ("src/attention_cnn/clean.py", "`attention-cnn clean`"),
    ("", "Other"),
)

# "What to do" for the messages that do not say it themselves: {a piece of the message as the page shows it:
# the advice}. A piece that matches no message fails the test, so advice cannot outlive its message.
ADVICE = {
    "img_size must be at least 8": "Set `img_size` to 16 or more in `params.yaml` (the params check allows 16 "
                                   "to 1024).",
    "--batch-size must be at least 1": "Pass a positive `--batch-size`, or leave it out (256).",
    "--alpha must be between 0 and 1": "Pass an opacity between 0 and 1, or leave it out.",
    "--top-k must be between 1 and": "Pass a `--top-k` no larger than the number of classes, or leave it out.",
    "not valid YAML": "The message gives the line and column. A value with `:` or `#` in it needs quotes.",
    "holds no image files (looked for": "Point `--images` at the folder that holds the pictures; every "
                                       "sub-folder is searched.",
    "named like an image <verb>": "The line counts the files named like an image that failed to decode and "
                                  "names up to three with the reason (e.g. `none of its 3 files named like an "
                                  "image could be decoded (a.jpg: ...)`), then, apart, the entries it did not read "
                                  "(`; 1 other entry not read (notes.txt: not an image file)`). Nothing is written "
                                  "to `--out`. Re-export the images as JPEG or PNG, or point `--images` at the "
                                  "folder that holds them.",
    "has several validation folders": "Keep one of them (`val/`, `valid/` or `validation/`).",
}


@dataclass(frozen=True)
class Message:
    path: str       # relative to the repository root
    line: int
    text: str       # as the page shows it: literal parts verbatim, expressions as <name>


@dataclass(frozen=True)
class Unresolved:
    path: str
    line: int
    expression: str


_NOT_NAMES = {"len", "str", "repr", "join", "sorted", "split", "strip", "name", "type", "format", "relpath",
              "expanduser", "os", "path", "sys", "if", "else", "for", "in", "and", "or", "not", "exc", "strerror"}


def _placeholder(expr: ast.expr) -> str:
    """How an f-string's expression shows on the page: `<path>`, `<number>` for a count, `[s]` for a plural."""
    if isinstance(expr, ast.IfExp) and all(isinstance(e, ast.Constant) for e in (expr.body, expr.orelse)):
        return "[" + "|".join(str(e.value) for e in (expr.body, expr.orelse) if e.value) + "]"
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "len":
        return "<number>"
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "Path":
        return "<path>"
    if isinstance(expr, ast.Attribute) and expr.attr == "__name__":
        return "<type>"
    if isinstance(expr, ast.Name):
        return f"<{expr.id.lstrip('_')}>"
    if isinstance(expr, ast.Attribute):
        return f"<{expr.attr.lstrip('_')}>"
    names = [n.lstrip("_") for n in re.findall(r"[A-Za-z_]\w*", ast.unparse(expr)) if n not in _NOT_NAMES]
    return f"<{names[0] if names else 'value'}>"


class _Module:
    """One source file: its functions by name (nested ones too), to follow a message to where it is built."""

    def __init__(self, path: Path, root: Path):
        self.path = path.relative_to(root).as_posix()
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.functions: dict[str, list[ast.FunctionDef]] = {}
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, []).append(node)

    def enclosing_function(self, node: ast.AST) -> ast.AST:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return self.tree

    def texts(self, expr: ast.expr, scope: ast.AST, seen: frozenset = frozenset()) -> list[str]:
        """Every message `expr` can be, as the page shows it; [] when it cannot be followed."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [expr.value]
        if isinstance(expr, ast.JoinedStr):
            return ["".join(v.value if isinstance(v, ast.Constant) else _placeholder(v.value) for v in expr.values)]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return [a + b for a in self.texts(expr.left, scope, seen) for b in self.texts(expr.right, scope, seen)]
        if isinstance(expr, ast.IfExp):
            return self.texts(expr.body, scope, seen) + self.texts(expr.orelse, scope, seen)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id not in seen:
            found = []
            for function in self.functions.get(expr.func.id, []):
                for node in ast.walk(function):
                    if isinstance(node, ast.Return) and node.value is not None \
                            and self.enclosing_function(node) is function:
                        found += self.texts(node.value, function, seen | {expr.func.id})
            return found
        if isinstance(expr, ast.Name) and expr.id not in seen:
            found = []
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == expr.id
                                                        for t in node.targets):
                    found += self.texts(node.value, scope, seen | {expr.id})
            return found
        return []


def _modules(root: Path) -> list[_Module]:
    return [_Module(p, root) for folder in SOURCES for p in sorted((root / folder).rglob("*.py"))]


def _user_error_classes(modules: list[_Module]) -> dict[str, list[str]]:
    """{class name: messages its __init__ builds ([] when the raise passes the message)} for UserError and its
    subclasses, by name across the modules."""
    classes: dict[str, ast.ClassDef] = {}
    for module in modules:
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
    names = {"UserError"}
    grown = True
    while grown:
        grown = False
        for name, node in classes.items():
            bases = {getattr(b, "id", getattr(b, "attr", None)) for b in node.bases}
            if name not in names and bases & names:
                names.add(name)
                grown = True
    built: dict[str, list[str]] = {name: [] for name in names}
    for module in modules:
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef) and node.name in names:
                for init in (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"):
                    for call in ast.walk(init):
                        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                                and call.func.attr == "__init__" and call.args:
                            built[node.name] += module.texts(call.args[0], init)
    return built


def collect(root: Path = ROOT) -> tuple[list[Message], list[Unresolved]]:
    """Every `error:` message the commands of the repository at `root` can print, and the raises whose message
    could not be followed."""
    modules = _modules(root)
    classes = _user_error_classes(modules)
    messages: list[Message] = []
    unresolved: list[Unresolved] = []
    for module in modules:
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = getattr(func, "id", getattr(func, "attr", None))
                if name not in classes:
                    continue
                texts = classes[name] or (module.texts(node.exc.args[0], module.enclosing_function(node))
                                          if node.exc.args else [])
                if not texts:
                    unresolved.append(Unresolved(module.path, node.lineno, ast.unparse(node.exc)))
                messages += [Message(module.path, node.lineno, t) for t in texts if _says_something(t)]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and node.args:
                for text in module.texts(node.args[0], module.enclosing_function(node)):
                    if text.startswith("error: ") and _says_something(text.removeprefix("error: ")):
                        messages.append(Message(module.path, node.lineno, text.removeprefix("error: ")))
    return messages, unresolved


def _says_something(text: str) -> bool:
    """False for '' (a check that passed) and for a bare `<exc>`, which only relays another message."""
    return bool(re.sub(r"<[^<>]*>", "", text).strip())


def section_of(path: str) -> str:
    return next(title for prefix, title in SECTIONS if path.startswith(prefix))


def unused_advice(messages: list[Message]) -> list[str]:
    return [piece for piece in ADVICE if not any(piece in m.text for m in messages)]


def page_part(messages: list[Message]) -> str:
    """The generated list: one heading per section, one code block per distinct message, with its advice."""
    order = [title for _, title in SECTIONS]
    by_section: dict[str, list[str]] = {}
    for message in sorted(messages, key=lambda m: (order.index(section_of(m.path)), m.path, m.line)):
        texts = by_section.setdefault(section_of(message.path), [])
        if message.text not in texts:
            texts.append(message.text)
    out = []
    for title in dict.fromkeys(order):
        if title not in by_section:
            continue
        out += [f"### {title}", ""]
        for text in by_section[title]:
            out += ["```text", "error: " + " ".join(text.split()), "```", ""]
            advice = [a for piece, a in ADVICE.items() if piece in text]
            out += [f"What to do: {' '.join(advice)}", ""] if advice else []
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only check; exit 1 when docs/troubleshooting.md is stale")
    args = parser.parse_args()
    messages, unresolved = collect()
    problems = [f"{u.path}:{u.line}: cannot follow the message of `{u.expression}`; give it as a literal or an "
                f"f-string where it is raised or returned" for u in unresolved]
    problems += [f"tools/error_messages.py: ADVICE['{p}'] matches no message" for p in unused_advice(messages)]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    fresh, said = check_or_write(PAGE, MARKER, page_part(messages), args.check, "python tools/error_messages.py")
    print(f"{said} ({len(messages)} messages)", file=sys.stdout if fresh else sys.stderr)
    return 0 if fresh and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
