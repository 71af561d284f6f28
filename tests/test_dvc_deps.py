"""dvc.yaml's deps cover the code each stage runs, so a code change re-runs the stages it can affect.

A stage runs its script (found in its `cmd`) and every `attention_cnn` module that script imports, directly
or through other modules, at the top of a file or inside a function. Each of those files must be a dep of the
stage: listed itself, or under a listed folder. The closure is read from the source with `ast`, nothing is
imported, so the test also covers stages whose imports need a GPU or torchrun.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "attention_cnn"


def module_file(src: Path, dotted: str) -> Path | None:
    """The file that `import dotted` executes last, or None when it is not a module under `src`."""
    base = src.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, src: Path) -> set[str]:
    """Dotted names of every module `path` imports, relative imports resolved, function-level ones included."""
    if path.is_relative_to(src):
        package = list(path.relative_to(src).parts[:-1])  # the package a relative import starts from
    else:
        package = []  # a stage script: only absolute imports make sense
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import name`: name may be a submodule, which is then imported too.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_closure(script: Path, src: Path) -> set[Path]:
    """Every file under src/PACKAGE that running `script` executes through imports, packages' __init__ too."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for dotted in imported_modules(todo.pop(), src):
            if dotted.split(".")[0] != PACKAGE:
                continue
            parts = dotted.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
                found = module_file(src, ".".join(parts[:depth]))
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def stage_scripts(cmd: str, root: Path) -> list[Path]:
    return [root / token for token in re.findall(r"[\w./-]+\.py\b", cmd) if (root / token).is_file()]


def missing_deps(root: Path) -> list[str]:
    """One line per (stage, file) where the stage runs the file but does not list it among its deps."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        deps = [root / d for d in stage.get("deps", []) if "${" not in d]
        scripts = stage_scripts(stage["cmd"], root)
        if not scripts:
            problems.append(f"stage '{name}': no script found in its cmd {stage['cmd']!r}")
        needed = set(scripts)
        for script in scripts:
            needed |= import_closure(script, root / "src")
        for path in sorted(needed):
            if not any(path == dep or dep in path.parents for dep in deps):
                problems.append(f"stage '{name}': runs {path.relative_to(root)} but dvc.yaml does not list it "
                                f"in its deps")
        for dep in deps:  # a module the stage never runs would re-run it for nothing
            if dep.suffix == ".py" and dep.is_relative_to(root / "src") and dep not in needed:
                problems.append(f"stage '{name}': lists {dep.relative_to(root)} in its deps but never imports it")
    return problems


def test_every_stage_lists_every_module_it_imports():
    problems = missing_deps(REPO)
    assert not problems, "dvc.yaml is missing deps:\n" + "\n".join(problems)


def test_a_module_the_stage_never_imports_is_not_a_dep(tmp_path):
    for name in ("dvc.yaml", "stages", "src"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, tmp_path / name)
    dvc_yaml = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    dvc_yaml["stages"]["evaluate"]["deps"].append("src/attention_cnn/panels.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    assert missing_deps(tmp_path) == [
        "stage 'evaluate': lists src/attention_cnn/panels.py in its deps but never imports it"]


def test_closure_follows_relative_function_level_and_package_imports(tmp_path):
    pkg = tmp_path / "src" / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from .sub.c import VALUE\n")
    (pkg / "sub" / "c.py").write_text("from .. import d\nVALUE = 1\n")
    (pkg / "d.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "s.py").write_text("from attention_cnn.a import f\n")
    stage = {"cmd": "PYTHONPATH=src python stages/s.py",
             "deps": ["stages/s.py", "src/attention_cnn/__init__.py", "src/attention_cnn/a.py",
                      "src/attention_cnn/sub"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    assert missing_deps(tmp_path) == [
        "stage 's': runs src/attention_cnn/b.py but dvc.yaml does not list it in its deps",
        "stage 's': runs src/attention_cnn/d.py but dvc.yaml does not list it in its deps",
    ]
    stage["deps"] += ["src/attention_cnn/b.py", "src/attention_cnn/d.py"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    assert missing_deps(tmp_path) == []


def test_an_import_added_without_a_dep_is_caught(tmp_path):
    """The real pipeline, with one new import inside a function of a module every stage runs."""
    for name in ("src", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    assert missing_deps(tmp_path) == []
    errors = tmp_path / "src" / PACKAGE / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from attention_cnn import cli\n")
    problems = missing_deps(tmp_path)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert f"stage '{name}': runs src/attention_cnn/cli.py but dvc.yaml does not list it in its deps" in problems


# Keys that change how fast a stage runs or where its processes meet, never what it writes: dvc.yaml leaves
# them out on purpose.
SPEED_ONLY = {"data.workers", "train.rdzv_endpoint", "train.rdzv_timeout"}


def test_sections_listed_key_by_key_list_every_key_that_can_change_results():
    """A new key in such a section (say data.*) must be declared, or changing it would not re-run the stage."""
    import dataclasses

    from attention_cnn.params import Params

    sections = {f.name: f.default_factory for f in dataclasses.fields(Params) if isinstance(f.default_factory, type)}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        declared = set(stage.get("params", []))
        for section in {key.split(".")[0] for key in declared if "." in key}:
            keys = {f"{section}.{f.name}" for f in dataclasses.fields(sections[section])}
            assert declared >= keys - SPEED_ONLY, f"stage '{name}': {sorted(keys - SPEED_ONLY - declared)} undeclared"
            assert not declared & SPEED_ONLY, f"stage '{name}' declares speed-only {sorted(declared & SPEED_ONLY)}"
