"""What the end-to-end tests share: a tiny git + DVC copy of the pipeline, and running commands in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@t"]
TINY = {
    "img_size": 32,
    "sample": {"images_per_class": 14, "image_size": 48},
    "data": {"val_fraction": 0.2, "test_fraction": 0.2, "workers": 2},
    "model": {"channels": 8, "hidden": 16, "head": "class_attention"},  # a head with class maps: native is scored too
    "train": {"epochs": 2, "batch_size": 16},
    # grid_confidence 0: any correctly classified image enters a mosaic, so a 2-epoch model plays the grid game
    "evaluate": {"faithfulness_images": 6, "faithfulness_steps": 4, "sanity_images": 2, "mosaics": 2,
                 "grid_confidence": 0.0},
    "visualize": {"num_images": 3, "per_class": 2},
}


def merge_params(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_params(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run(args: list[str], cwd: Path) -> str:
    """Run a command with the venv first on PATH (the stages call `python`); fail the test with its output."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def stages_run(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]


def tiny_repo(root: Path, extra: dict | None = None) -> Path:
    """A committed git + DVC copy of the repo's tracked pipeline files with TINY params (plus `extra`)."""
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src", ".dvc"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__"))
    params = merge_params(yaml.safe_load((root / "params.yaml").read_text()), merge_params(TINY, extra or {}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", *GIT_USER, "commit", "-qm", "empty", "--allow-empty"], root)
    run(["git", "add", "-A"], root)
    run(["git", *GIT_USER, "commit", "-qm", "tiny"], root)
    return root
