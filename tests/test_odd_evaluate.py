"""Odd inputs on evaluate, visualize, predict and DVC experiments: a true answer or one clear line.

Each test runs the real command (`attention-cnn`, a stage script, `dvc`) on tiny fixtures and checks the exit
code, the message and the files on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from attention_cnn.data.prepared import PreparedSplit, save_split
from attention_cnn.model import AttentionCNN, save_model
from attention_cnn.params import ModelParams
from e2e import GIT_USER, REPO, VENV_BIN, run
from test_safety import assert_one_line_error, noise, run_cli, snapshot

ENV = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO / "src"),
       "DVC_NO_ANALYTICS": "1"}
S = 16
CLASSES = ["forest", "sea", "street"]


# ---------------------------------------------------------------------------- predict


def test_predict_on_a_folder_of_non_images_counts_what_it_names(tmp_path, capsys):
    torch.manual_seed(0)
    model = save_model(tmp_path / "model.pt", AttentionCNN(len(CLASSES), S, ModelParams(channels=4, hidden=8)).eval(),
                       CLASSES, resize="stretch")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_text("a letter, saved as .jpg")
    (images / "notes.txt").write_text("not an image")
    code, err = run_cli(capsys, "predict", "--model", model, "--images", images, "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, f"--images {images}: its 1 file named like an image could not be decoded (a.jpg: ",
                          "; 1 other entry not read (notes.txt: not an image file).")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- evaluate: what it cannot score


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """data/prepared without ground-truth masks (as a user's folder), a `conv` and a `none` model, tiny."""
    root = tmp_path_factory.mktemp("workspace")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        save_split(root / "data/prepared", split, PreparedSplit(
            images=torch.randint(0, 256, (6, 3, S, S), generator=g, dtype=torch.uint8), labels=torch.arange(6) % 3,
            masks=None, files=[f"{CLASSES[i % 3]}/{i}.png" for i in range(6)], classes=CLASSES))
    for attention in ("conv", "none"):
        torch.manual_seed(0)
        model = AttentionCNN(len(CLASSES), S, ModelParams(attention=attention, channels=4, hidden=8))
        save_model(root / f"models/{attention}.pt", model.eval(), CLASSES, resize="stretch")
    return root


def declared_score_files() -> list[str]:
    """The metrics files dvc.yaml declares under metrics/maps and metrics/ci."""
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["metrics"]
    return sorted(p.removeprefix("metrics/") for p in declared if p.startswith(("metrics/maps/", "metrics/ci/")))


def run_evaluate(root: Path, attention: str, **evaluate) -> tuple[subprocess.CompletedProcess, Path]:
    """The evaluate stage script, as DVC runs it, in a fresh copy of `root` with `attention`'s model."""
    ws = root / f"run_{attention}_{'_'.join(evaluate['methods'])}"
    ws.mkdir()
    (ws / "data").symlink_to(root / "data")
    (ws / "models").mkdir()
    (ws / "models/model.pt").symlink_to(root / f"models/{attention}.pt")
    params = {"img_size": S, "evaluate": {"batch_size": 4, "faithfulness_steps": 2, "sanity_images": 0,
                                          "figures": 0, **evaluate}}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(["python", str(REPO / "stages/evaluate.py")], cwd=ws, env=ENV, capture_output=True,
                          text=True, timeout=300)
    return done, ws


def read_scores(ws: Path) -> dict[str, dict]:
    return {p.relative_to(ws / "metrics").as_posix(): json.loads(p.read_text())
            for p in sorted((ws / "metrics").glob("*/*.json")) if p.parent.name in ("maps", "ci")}


def test_a_model_without_a_mask_says_which_methods_it_skips_and_writes_every_declared_file(workspace):
    done, ws = run_evaluate(workspace, "none", methods=["mask", "attended", "random"], faithfulness_images=6)
    assert done.returncode == 0, done.stderr
    assert ("evaluate: mask, attended not scored: the model was trained with model.attention none, so it has no "
            "mask to explain with; their metrics/maps and metrics/ci files hold null\n") in done.stdout
    scores = read_scores(ws)
    assert sorted(scores) == declared_score_files()  # `dvc metrics show` finds every file it is told to load
    assert set(scores["maps/mask.json"].values()) == {None} and set(scores["ci/paired.json"].values()) == {None}
    assert scores["maps/random.json"]["del"] is not None
    explained = json.loads((ws / "output/evaluate/explain.json").read_text())
    assert list(explained["methods"]) == ["random"]
    assert explained["notes"][0].startswith("evaluate: mask, attended not scored")


def test_a_model_without_a_mask_and_only_mask_methods_says_nothing_is_left_to_score(workspace):
    done, ws = run_evaluate(workspace, "none", methods=["mask", "attended"], faithfulness_images=6)
    assert done.returncode == 0, done.stderr
    assert ("evaluate: mask, attended not scored: the model was trained with model.attention none, so it has no "
            "mask to explain with; their metrics/maps and metrics/ci files hold null. No explanation method is left "
            "to score, so only the test metrics are written: add e.g. gradcam to evaluate.methods to score "
            "explanations\n") in done.stdout
    assert "pointing game (pg)" not in done.stdout and "intervals" not in done.stdout  # nothing else to explain
    assert "evaluate: test accuracy" in done.stdout
    scores = read_scores(ws)
    assert sorted(scores) == declared_score_files()
    assert {v for content in scores.values() for v in content.values()} == {None}
    assert json.loads((ws / "metrics/evaluate/metrics.json").read_text())["accuracy"] is not None


def test_one_image_gives_no_interval_and_no_p_value_and_no_masks_no_pointing_game(workspace):
    done, ws = run_evaluate(workspace, "conv", methods=["mask", "gradcam"], faithfulness_images=1)
    assert done.returncode == 0, done.stderr
    assert ("evaluate: pointing game (pg) and relevance mass (mass) not scored: they need ground-truth masks, and "
            "the test images have none (data.source has no .masks/ folder); their columns hold null\n") in done.stdout
    assert ("evaluate: no 95 % intervals and no p-values: they need at least 10 images and 1 is scored "
            "(evaluate.faithfulness_images, at most the test split); metrics/ci holds null\n") in done.stdout
    scores = read_scores(ws)
    assert sorted(scores) == declared_score_files()
    for method in ("mask", "gradcam"):
        assert scores[f"maps/{method}.json"]["del"] is not None and scores[f"maps/{method}.json"]["pg"] is None
        assert set(scores[f"ci/{method}.json"].values()) == {None}
    assert set(scores["ci/paired.json"].values()) == {None}  # not p = 0.0005 from one image
    explained = json.loads((ws / "output/evaluate/explain.json").read_text())
    assert explained["methods"]["mask"]["del"]["low"] is None and explained["paired"]["scores"]["del"]["p"] is None
    table = subprocess.run(["python", str(REPO / "tools/attention_table.py"), str(ws / "output/evaluate/explain.json")],
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "[–]" in table.stdout and "(p –)" in table.stdout and "p = " not in table.stdout
    assert "[–], p –: no interval or p-value from fewer than 10 scored images." in table.stdout


# ---------------------------------------------------------------------------- data.source and DVC's temp workspaces


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_an_untracked_source_inside_the_repo_is_named_by_the_plain_run_and_works_once_dvc_tracks_it(
        built_repo, tmp_path):
    """DVC hashes a stage's dependencies before its command runs, so under --temp an untracked folder fails in DVC
    itself, before prepare; the plain run, which reads it in place, says so and what to type."""
    repo = tmp_path / "repo"
    repo.mkdir()
    built_repo(repo)
    run(["git", "add", "-A"], repo)
    run(["git", *GIT_USER, "commit", "-qm", "results"], repo)
    for k in range(12):
        noise(repo / "photos" / ("cats", "dogs")[k % 2] / f"{k}.png", k)

    done = dvc(["exp", "run", "--temp", "-S", "data.source=photos", "prepare"], repo)
    assert done.returncode != 0
    assert "failed to reproduce 'prepare': [Errno 2] No such file or directory" in done.stderr
    assert "/.dvc/tmp/exps/" in done.stderr and "photos" in done.stderr

    done = dvc(["exp", "run", "-S", "data.source=photos", "prepare"], repo)  # plain: in this workspace
    assert done.returncode == 0, done.stderr
    assert (f"prepare: warning: data.source 'photos' is inside the repo, but git does not track 12 of its files "
            f"and DVC does not track the folder: this run reads them in place, but `dvc exp run --temp` and "
            f"`dvc exp run --queue` run in a copy without them") in done.stdout
    assert f"Run `dvc add photos` and commit photos.dvc, or give the absolute path: data.source={repo / 'photos'}" \
        in done.stdout
    assert json.loads((repo / "data/prepared/report.json").read_text())["source"] == "photos"

    run(["dvc", "add", "photos"], repo)  # what the line says to type
    run(["git", "add", "photos.dvc", ".gitignore", "params.yaml", "dvc.lock"], repo)
    run(["git", *GIT_USER, "commit", "-qm", "photos tracked by DVC"], repo)
    done = dvc(["exp", "run", "--temp", "-f", "prepare"], repo)
    assert done.returncode == 0, done.stderr
    assert "Running stage 'prepare'" in done.stdout and "warning" not in done.stdout


# ---------------------------------------------------------------------------- params.yaml as DVC writes it back


def test_an_experiments_params_diff_is_the_change_itself(tmp_path):
    """`dvc exp run -S` writes params.yaml back through its YAML round trip: the file is kept in the form that
    trip writes (block lists, '' for the empty string), so the diff of a one-key change is one line."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"echo": {
        "cmd": "echo done > out.txt", "params": ["seed"], "outs": ["out.txt"]}}}))
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", *GIT_USER, "commit", "-qm", "params"], tmp_path)
    run(["dvc", "exp", "run", "-S", "seed=43"], tmp_path)
    assert run(["git", "diff", "--numstat", "params.yaml"], tmp_path) == "1\t1\tparams.yaml\n"
    diff = run(["git", "diff", "-U0", "params.yaml"], tmp_path)
    assert "\n-seed: 42 " in diff and "\n+seed: 43 " in diff


# ---------------------------------------------------------------------------- the ablation's outputs


def test_an_applied_run_without_attention_loads_every_metric_and_draws_no_mask(built_repo, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    built_repo(repo)
    run(["git", "add", "-A"], repo)
    run(["git", *GIT_USER, "commit", "-qm", "results"], repo)
    log = run(["dvc", "exp", "run", "-n", "ablation", "-S", "model.attention=none"], repo)
    assert "evaluate: mask, attended not scored: the model was trained with model.attention none" in log
    run(["dvc", "exp", "apply", "ablation"], repo)

    shown = run(["dvc", "metrics", "show"], repo)
    assert "failed to load" not in shown
    rows = {line.split()[0]: line.split()[1:] for line in shown.splitlines()[1:]}
    assert set(rows) == set(yaml.safe_load((repo / "dvc.yaml").read_text())["metrics"])
    assert set(rows["metrics/maps/mask.json"]) == {"-"} and set(rows["metrics/maps/gradcam.json"]) != {"-"}

    descriptions = []
    for figure in sorted((repo / "output/visualize").glob("*.png")):
        with Image.open(figure) as image:
            descriptions.append(image.text.get("Description", ""))
    # e2e's tiny model has the cam head: its class map is drawn beside the one feature map
    assert "panels: input | feature map (no attention) | native map" in descriptions
    assert not any("mask" in d for d in descriptions)
