"""The paths users take every day give true answers, or one line that says what to do.

Each test runs the real command (a stage script or `attention-cnn ...`) on folders built here and checks the exit
code, the message and the files on disk. One module fixture prepares, trains, evaluates and visualizes a tiny
model on a folder with every awkward name at once: tall and wide images under data.resize=pad, class names
that collide once made file-safe (`café`, `caf`), one that breaks a packed CSV column (`a:0.9;b`), one of 250
characters, and one whose name is not valid UTF-8.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attention_cnn.data.decode import decode_image
from attention_cnn.data.prepared import load_split
from attention_cnn.inference import load_for_inference, predict_logits
from attention_cnn.model import AttentionCNN, save_model
from attention_cnn.params import ModelParams
from test_safety import (PROGRESS_BAR, REPO, assert_one_line_error, classes, noise, run_cli, run_prepare, snapshot,
                         stage_repo, users_folder)

LONG = "x" * 250
BAD = os.fsdecode(b"bad\xff")                       # how os.listdir hands over a name that is not UTF-8
NAMES = ["café", "caf", "a:0.9;b", LONG, BAD]
SHOWN = ["a:0.9;b", "bad\\xff", "caf", "café", LONG]  # as the reports write them, in class order
TINY = {"model": {"channels": 4, "hidden": 8}, "train": {"epochs": 1, "batch_size": 8},
        "evaluate": {"batch_size": 8, "faithfulness_images": 2, "faithfulness_steps": 2},
        "visualize": {"num_images": 2, "per_class": 1}}
# Root reads any folder; without these capabilities it is refused as any user is (tests run as root in CI).
NO_OVERRIDE = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
               "--bounding-set=-dac_override,-dac_read_search")


def as_plain_user() -> tuple[str, ...]:
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: root reads a folder whatever its permissions")
    return NO_OVERRIDE


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_stage(root: Path, stage: str) -> tuple[int, str]:
    """stages/STAGE.py run in this process from `root` (no second torch import); its exit code and output."""
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(f"stages/{stage}.py", run_name="__main__")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        os.chdir(cwd)
    return code, out.getvalue()


def awkward_source(source: Path) -> Path:
    for k, name in enumerate(NAMES):
        for i in range(5):  # tall and wide: stretch and pad give different pixels
            noise(Path(os.fsdecode(os.path.join(os.fsencode(source), os.fsencode(name), b"%d.png" % i))),
                  10 * k + i, size=(36, 12) if i % 2 else (12, 36))
    return source


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """prepare, train, evaluate and visualize run as stage scripts on the awkward folder, data.resize=pad."""
    tmp = tmp_path_factory.mktemp("everyday")
    root = stage_repo(tmp, awkward_source(tmp / "source"), resize="pad")
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    logs = {}
    for stage in ("prepare", "train", "evaluate", "visualize"):
        code, logs[stage] = run_stage(root, stage)
        assert code == 0, (stage, logs[stage])
    (root / "logs.json").write_text(json.dumps(logs))
    return root


# ---------------------------------------------------------------------------- the model file


def test_predict_sees_images_as_training_did(repo, tmp_path, capsys):
    """Trained with data.resize=pad: predict pads the raw files too, and agrees with evaluate image by image."""
    code, err = run_cli(capsys, "predict", "--model", repo / "models/model.pt", "--images", repo.parent / "source",
                        "--out", tmp_path / "out", "--no-figures", "--workers", "1")
    assert code == 0, err
    rows = {row["file"]: row for row in read_csv(tmp_path / "out/predictions.csv")}
    test = load_split(repo / "data/prepared", "test")
    assert test.resize == "pad" and len(test) >= 5
    confusion = json.loads((repo / "output/evaluate/confusion.json").read_text())
    probs = predict_logits(load_for_inference(repo / "models/model.pt").model, test.images, 8).softmax(dim=1)
    for i, file in enumerate(test.files):
        assert rows[file]["predicted_class"] == confusion[i]["predicted"] == test.classes[int(probs[i].argmax())]
        assert float(rows[file]["confidence"]) == pytest.approx(float(probs[i].max()), abs=2e-3)
    # The check can fail: stretching these tall and wide files gives other pixels than training saw.
    real = Path(os.fsdecode(os.path.join(os.fsencode(repo.parent / "source"), os.fsencode(NAMES[0]), b"1.png")))
    padded, stretched = (torch.from_numpy(decode_image(real, 16, policy).pixels) for policy in ("pad", "stretch"))
    assert not torch.equal(padded, stretched)


def test_a_model_file_without_its_resize_policy_is_refused(repo, tmp_path, capsys):
    blob = torch.load(repo / "models/model.pt", weights_only=True)
    del blob["resize"], blob["best_epoch"]
    torch.save({**blob, "format": 1}, tmp_path / "old.pt")
    code, err = run_cli(capsys, "predict", "--model", tmp_path / "old.pt", "--images", repo.parent / "source",
                        "--out", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, f"{tmp_path / 'old.pt'}: written by an older attention_cnn", "data.resize",
                          "Re-run `dvc repro train`")
    assert not (tmp_path / "out").exists()


def test_evaluate_reads_the_best_epoch_from_the_model_not_the_train_metrics(repo):
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]["deps"]
    assert "models/model.pt" in deps and not [d for d in deps if d.startswith("metrics/")]
    assert json.loads((repo / "metrics/evaluate/metrics.json").read_text())["best_epoch"] == 1
    assert torch.load(repo / "models/model.pt", weights_only=True)["best_epoch"] == 1


# ---------------------------------------------------------------------------- names


def test_colliding_long_and_undecodable_names_each_get_their_own_files(repo):
    report = json.loads((repo / "data/prepared/report.json").read_text(encoding="utf-8"))
    assert report["classes"] == SHOWN  # escaped, never a crash
    grids = sorted(p.name for p in (repo / "output/visualize").glob("grid_*.png"))
    assert len(grids) == len(NAMES) and all(len(name) < 130 for name in grids)  # one each, short
    assert "grid_caf.png" in grids and any(g.startswith("grid_caf~") for g in grids)
    assert f"{len(grids)} class grids" in json.loads((repo / "logs.json").read_text())["visualize"]


def test_predict_csv_gives_class_names_back_exactly(repo, tmp_path, capsys):
    deep = tmp_path / "images" / "/".join(["a_long_folder_name_of_thirty_c"] * 8)
    noise(deep / (LONG[:200] + ".png"), 1)
    noise(tmp_path / "images" / os.fsdecode(b"\xfe.png"), 2)
    code, err = run_cli(capsys, "predict", "--model", repo / "models/model.pt", "--images", tmp_path / "images",
                        "--out", tmp_path / "out", "--top-k", str(len(NAMES)), "--workers", "1")
    assert code == 0, err
    rows = read_csv(tmp_path / "out/predictions.csv")
    assert sorted(row["file"] for row in rows)[0] == "\\xfe.png"
    for row in rows:
        assert sorted(row[f"top{r}_class"] for r in range(1, len(NAMES) + 1)) == sorted(SHOWN)
        assert sum(float(row[f"top{r}_prob"]) for r in range(1, len(NAMES) + 1)) == pytest.approx(1, abs=3e-3)
    figures = [p.name for p in (tmp_path / "out").glob("*.png")]
    assert len(figures) == 2 and all(len(name) < 130 for name in figures)


# ---------------------------------------------------------------------------- folders that cannot be read or written


def test_a_folder_that_cannot_be_listed_is_reported_with_the_class_it_empties(tmp_path):
    prefix = as_plain_user()
    source = classes(tmp_path / "source")
    for i in range(2):
        noise(source / "forest" / "private" / f"{i}.png", 50 + i)
    (source / "forest" / "private").chmod(0)
    try:
        done = run_prepare(stage_repo(tmp_path, source), prefix=prefix)
        assert done.returncode == 0, done.stderr
        report = json.loads((tmp_path / "repo/data/prepared/report.json").read_text())
        assert report["kept"] == 10 and report["unreadable"] == [{
            "path": "forest/private/", "reason": "cannot be listed (Permission denied): its images are not read",
            "class": "forest"}]
        assert "WARNING: 1 folder could not be listed, so their images are missing from class 'forest'" in done.stdout
        assert "unreadable forest/private/: cannot be listed (Permission denied): its images are not read (class " \
               "'forest' loses them)" in done.stdout

        model = tmp_path / "model.pt"
        save_model(model, AttentionCNN(2, 16, ModelParams(channels=4, hidden=8)).eval(), ["a", "b"], resize="stretch")
        predicted = subprocess.run([*prefix, sys.executable, "-m", "attention_cnn.cli", "predict", "--model", model,
                                    "--images", source, "--out", tmp_path / "out", "--no-figures", "--workers", "1"],
                                   capture_output=True, text=True, timeout=120,
                                   env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        assert predicted.returncode == 0, predicted.stderr
        skipped = {row["file"]: row["reason"] for row in read_csv(tmp_path / "out/skipped.csv")}
        assert skipped == {"forest/private/": "cannot be listed (Permission denied): its images are not read"}
        assert "skipped" in predicted.stderr and "forest/private" in predicted.stderr

        (source / "sea").chmod(0)  # a whole class: prepare stops, and says which folder and what to run
        before = snapshot(tmp_path / "repo/data/prepared")
        done = run_prepare(tmp_path / "repo", prefix=prefix)
        assert done.returncode == 2 and snapshot(tmp_path / "repo/data/prepared") == before
        assert_one_line_error(done.stderr, "class 'sea' has no readable image",
                              f"{source / 'sea'}/ cannot be listed (Permission denied)",
                              f"chmod -R u+rX {source / 'sea'}")
    finally:
        for folder in (source / "forest" / "private", source / "sea"):
            folder.chmod(0o755)


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(repo, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(repo, root, ignore=shutil.ignore_patterns("models", "metrics", "output"))
    (root / "models").mkdir(mode=0o555)
    try:
        done = run_prepare(root, stage="train", prefix=as_plain_user())
    finally:
        (root / "models").chmod(0o755)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, f"models/model.pt: cannot be written: {root / 'models'} is not writable",
                          "chmod u+w")
    assert "epoch" not in done.stdout and sorted(p.name for p in root.iterdir()) == sorted(
        ["data", "logs.json", "models", "params.yaml", "stages"])


def test_evaluate_and_visualize_refuse_a_foreign_folder_before_computing(repo, tmp_path, capsys):
    mine = users_folder(tmp_path / "mine")
    for argv in (["evaluate", "--metrics-dir", tmp_path / "m", "--out", mine], ["visualize", "--out", mine]):
        code, err = run_cli(capsys, argv[0], "--params", repo / "params.yaml", "--prepared", repo / "data/prepared",
                            "--model", repo / "models/model.pt", *argv[1:])
        assert code == 2 and not PROGRESS_BAR.search(err)  # refused before any batch ran
        assert_one_line_error(err, str(mine), "did not write")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------- options and params


def test_predict_defaults_fit_a_two_class_model_and_a_wrong_model_path_says_so(tmp_path, capsys):
    model = save_model(tmp_path / "two.pt", AttentionCNN(2, 16, ModelParams(channels=4, hidden=8)).eval(),
                       ["cat", "dog"], resize="stretch")
    noise(tmp_path / "images" / "0.png", 0)
    code, err = run_cli(capsys, "predict", "--model", model, "--images", tmp_path / "images", "--out",
                        tmp_path / "out", "--no-figures", "--workers", "1")
    assert code == 0, err
    assert list(read_csv(tmp_path / "out/predictions.csv")[0])[3:] == ["top1_class", "top1_prob", "top2_class",
                                                                        "top2_prob"]
    code, err = run_cli(capsys, "predict", "--model", tmp_path / "modle.pt", "--images", tmp_path / "images",
                        "--out", tmp_path / "out2")
    assert code == 2 and not (tmp_path / "out2").exists()
    assert_one_line_error(err, f"--model {tmp_path / 'modle.pt'}: no such file. Check the path")
    assert "dvc repro train` first" not in err


def test_a_key_given_twice_in_params_yaml_is_refused_with_its_lines(repo, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text() + "seed: 7\n")  # seed is also given above
    before = snapshot(repo / "output")
    code, err = run_cli(capsys, "visualize", "--params", params, "--prepared", repo / "data/prepared",
                        "--model", repo / "models/model.pt", "--out", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists() and snapshot(repo / "output") == before
    lines = params.read_text().splitlines()
    first = lines.index(next(line for line in lines if line.startswith("seed:"))) + 1
    assert_one_line_error(err, f"{params}: key 'seed' is given twice, on lines {first} and {len(lines)}",
                          "Keep one")


def test_a_class_of_two_images_says_no_fraction_can_split_it(tmp_path):
    source = classes(tmp_path / "source")
    for i in range(2):
        noise(source / "rare" / f"{i}.png", 70 + i)
    code, output = run_stage(stage_repo(tmp_path, source), "prepare")
    assert code == 2 and not (tmp_path / "repo/data/prepared").exists()
    assert_one_line_error(output, "class 'rare' has only 2 readable images",
                          "no data.val_fraction / data.test_fraction can split them",
                          f"Add at least 1 more image to {source / 'rare'}")


def test_numbered_figure_names_stay_short_for_long_file_names():
    """visualize's and evaluate's per-image figures share one name rule: a 250-character stem is cut."""
    from attention_cnn.figures import STEM_CHARS, numbered_name
    name = numbered_name(3, "sub/" + "é" * 250 + ".jpg")
    assert name.startswith("03_") and name.endswith(".png") and len(name) <= STEM_CHARS + 7
    assert numbered_name(12, "forest_0001.jpg") == "12_forest_0001.png"
