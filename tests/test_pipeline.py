"""End to end: the real `dvc repro` in a temporary copy of the repo, with tiny params."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from attention_cnn.model import load_model

VENV_BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _stages_run(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(built_repo, tmp_path_factory) -> Path:
    """A git + DVC copy of the repo's tracked pipeline files, with tiny params, after one `dvc repro`
    (tests/conftest.py builds it once per session)."""
    return built_repo(tmp_path_factory.mktemp("pipeline"))


def test_repro_writes_metrics_model_and_images(repo):
    metrics = json.loads((repo / "metrics/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo))
    assert "accuracy" in json.dumps(shown)

    trained = load_model(repo / "models/model.pt")
    assert trained.classes == ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    assert trained.img_size == 32
    with torch.no_grad():
        out = trained.model(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 6)

    pngs = sorted((repo / "output/visualize").glob("*.png"))
    assert len(pngs) >= 3
    with Image.open(pngs[0]) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    confusion = json.loads((repo / "output/evaluate/confusion.json").read_text())
    assert {row["actual"] for row in confusion} <= set(trained.classes)


def test_second_repro_is_a_no_op(repo):
    log = _run(["dvc", "repro"], repo)
    assert _stages_run(log) == []
    assert "up to date" in _run(["dvc", "status"], repo)


def test_visualize_param_reruns_only_visualize(repo):
    log = _run(["dvc", "repro", "--dry"], repo)
    assert _stages_run(log) == []
    log = _run(["dvc", "exp", "run", "-S", "visualize.alpha=0.3"], repo)
    assert _stages_run(log) == ["visualize"]


def test_img_size_reruns_everything_but_sample(repo):
    log = _run(["dvc", "exp", "run", "-S", "img_size=24"], repo)
    assert _stages_run(log) == ["prepare", "train", "evaluate", "visualize"]
    assert load_model(repo / "models/model.pt").img_size == 24


def test_bad_param_fails_before_any_work(repo):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["dvc", "exp", "run", "-S", "model.attention=softmax"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "'model.attention' must be one of 'none', 'dense', 'conv', 'spatial', 'ltpa'" in done.stdout + done.stderr
