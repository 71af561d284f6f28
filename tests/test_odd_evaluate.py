"""Odd inputs on evaluate, visualize, predict and DVC experiments: a true answer or one clear line.

Each test runs the real command (`attention-cnn`, a stage script, `dvc`) on tiny fixtures and checks the exit
code, the message and the files on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from attention_cnn.data.prepared import PreparedSplit, save_split
from attention_cnn.model import AttentionCNN, save_model
from attention_cnn.params import ModelParams
from e2e import REPO, VENV_BIN
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
