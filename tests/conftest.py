"""The end-to-end tests' shared start: one tiny `dvc repro` per test session, copied for each module that uses it."""

import shutil
from pathlib import Path
from typing import Callable

import pytest
import yaml

from test_pipeline import _run, _stages_run

REPO = Path(__file__).resolve().parents[1]
GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@t"]
TINY = {
    "img_size": 32,
    "sample": {"images_per_class": 14, "image_size": 48},
    "data": {"val_fraction": 0.2, "test_fraction": 0.2, "workers": 2},
    "model": {"channels": 8, "hidden": 16},
    "train": {"epochs": 2, "batch_size": 16},
    "evaluate": {"faithfulness_images": 6, "faithfulness_steps": 4},
    "visualize": {"num_images": 3, "per_class": 2},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _init_tiny_repo(root: Path) -> Path:
    """A git + DVC copy of the repo's tracked pipeline files with tiny params, committed, after one `dvc repro`
    (its dvc.lock staged by core.autostage, not committed)."""
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src", ".dvc"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
    params = _merge(yaml.safe_load((root / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", *GIT_USER, "commit", "-qm", "empty", "--allow-empty"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", *GIT_USER, "commit", "-qm", "tiny"], root)
    assert _stages_run(_run(["dvc", "repro"], root)) == ["sample", "prepare", "train", "evaluate", "visualize"]
    return root


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory) -> Callable[[Path], Path]:
    """Returns `copy(dest)`: a private copy, at dest, of the tiny repo after its one `dvc repro` (built once).

    Each module gets its own copy because its tests change the repo (experiments, deleted outs, remotes).
    """
    template = _init_tiny_repo(tmp_path_factory.mktemp("tiny_repo"))

    def copy(dest: Path) -> Path:
        shutil.rmtree(dest)  # an empty folder from tmp_path_factory; copytree wants to create it
        shutil.copytree(template, dest, symlinks=True)
        return dest

    return copy
