"""`attention-cnn predict` on a folder with good, odd and broken files; the command line itself."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attention_cnn.cli import main
from attention_cnn.data.decode import decode_image
from attention_cnn.errors import UserError
from attention_cnn.model import AttentionCNN, load_model, save_model
from attention_cnn.params import ModelParams
from attention_cnn.predict import decode_files, figure_names, predict_folder

S = 32
CLASSES = ["forest", "sea", "street"]
VALID = ["a.jpg", "nested/grey image.png", "nested/rgba.PNG"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AttentionCNN(len(CLASSES), S, ModelParams(channels=8, hidden=16))
    return save_model(tmp_path_factory.mktemp("model") / "model.pt", model.eval(), CLASSES, resize="stretch")


@pytest.fixture
def folder(tmp_path) -> Path:
    """An unlabelled folder like Intel's seg_pred, plus what real folders hold: sub-folders, odd modes and
    extensions, a broken image, a text file and a hidden file."""
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(root / "nested/grey image.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(root / "nested/rgba.PNG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"never read")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_writes_one_row_per_valid_image_and_reports_bad_files(model_path, folder, tmp_path, capsys):
    out = tmp_path / "out"
    result = predict_folder(model_path, folder, out, top_k=2, batch_size=2, workers=1, progress=False)
    rows = read_csv(out / "predictions.csv")
    assert [r["file"] for r in rows] == VALID
    assert list(rows[0]) == ["file", "predicted_class", "confidence", "top1_class", "top1_prob", "top2_class",
                             "top2_prob"]

    # The same predictions as the model gives on the prepare stage's decoding of each file.
    model = load_model(model_path).model
    expected = torch.stack([torch.from_numpy(decode_image(folder / f, S, "stretch").pixels) for f in VALID])
    with torch.no_grad():
        probs = model(expected.float() / 255).logits.softmax(dim=1)
    for row, p in zip(rows, probs):
        assert row["predicted_class"] == CLASSES[int(p.argmax())]
        assert float(row["confidence"]) == pytest.approx(float(p.max()), abs=1e-3)
        top = [[row[f"top{r}_class"], row[f"top{r}_prob"]] for r in (1, 2)]
        assert top[0] == [row["predicted_class"], row["confidence"]]
        values = [float(v) for _, v in top]
        assert values == sorted(values, reverse=True) and 0 <= sum(values) <= 1 + 1e-3
        assert {name for name, _ in top} <= set(CLASSES)

    skipped = {r["file"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert set(skipped) == {"broken.jpg", "notes.txt"}  # the hidden file is not read at all
    assert "not an image file" == skipped["notes.txt"]
    assert "broken.jpg" in capsys.readouterr().err
    assert [s.file for s in result.skipped] == ["broken.jpg", "notes.txt"]

    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == sorted(figure_names(VALID))
    with Image.open(out / figure_names(VALID)[1]) as figure:
        assert figure.size[0] > 4 * S


def test_full_top_k_sums_to_one_and_a_rerun_replaces_the_output(model_path, folder):
    out = folder / "predictions"  # inside the images folder: a rerun must not classify the figures
    for _ in range(2):
        predict_folder(model_path, folder, out, top_k=3, figures=False, workers=1, progress=False)
        rows = read_csv(out / "predictions.csv")
        assert len(rows) == len(VALID)
        for row in rows:
            assert sum(float(row[f"top{r}_prob"]) for r in (1, 2, 3)) == pytest.approx(1, abs=2e-3)
    assert not list(out.glob("*.png"))
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".hidden.jpg"]  # no temp dirs


def test_cli_predict_and_its_errors(model_path, folder, tmp_path, capsys):
    main(["predict", "--model", str(model_path), "--images", str(folder), "--out", str(tmp_path / "cli"),
          "--top-k", "1", "--no-figures", "--workers", "1"])
    assert len(read_csv(tmp_path / "cli/predictions.csv")) == len(VALID)

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(tmp_path / "missing.pt"), "--images", str(folder),
              "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bad_input_is_a_user_error(model_path, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        predict_folder(model_path, tmp_path / "empty", tmp_path / "o1", workers=1, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/x.jpg").write_text("text")
    with pytest.raises(UserError, match="its 1 file named like an image could not be decoded"):
        predict_folder(model_path, tmp_path / "bad", tmp_path / "o2", workers=1, progress=False)
    with pytest.raises(UserError, match="--top-k"):
        predict_folder(model_path, folder, tmp_path / "o3", top_k=4, workers=1, progress=False)
    with pytest.raises(UserError, match="not a folder"):
        predict_folder(model_path, tmp_path / "nowhere", tmp_path / "o4", workers=1, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(UserError, match="new or empty folder"):
        predict_folder(model_path, folder, mine, workers=1, progress=False)
    assert (mine / "thesis.txt").read_text() == "precious"
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_parallel_decoding_equals_serial_decoding(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(130):  # enough files for two worker processes
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (12, 9, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    paths[7].write_bytes(b"broken")
    serial = decode_files(paths, 8, "stretch", workers=1, progress=False)
    parallel = decode_files(paths, 8, "stretch", workers=2, progress=False)
    assert [d.error is None for d in parallel] == [i != 7 for i in range(130)]
    assert [d.error for d in parallel] == [d.error for d in serial]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(serial, parallel) if a.error is None)


def test_figure_names_are_safe_unique_and_short():
    files = ["a_b.jpg", "a b.jpg", "sub/c.png", "sub__c.png", "café.jpg", "caf.jpg", "caf_.jpg",
             "x" * 250 + "1.jpg", "x" * 250 + "2.jpg", "/".join(["deep"] * 60) + "/y.jpg", "bad\udcff.jpg"]
    names = figure_names(files)
    assert names[0] == "a_b.jpg.png" and names[1].startswith("a_b.jpg~")  # a safe name is kept as it is
    assert names[2].startswith("sub__c.png~") and names[3] == "sub__c.png.png"
    assert len(set(names)) == len(files) and names == figure_names(files)  # unique, and stable
    assert all(re.fullmatch(r"[A-Za-z0-9_.~-]{1,120}", name) for name in names), names


def test_help_lists_every_command():
    script = Path(sys.executable).parent / "attention-cnn"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("predict", "evaluate", "visualize"):
        assert command in done.stdout
