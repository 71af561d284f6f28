"""Small folders: the step budget, learning from a small folder of our own making with the default
recipe's machinery, and the warning when a run is no better than guessing."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from attention_cnn.data.prepare import prepare
from attention_cnn.data.prepared import load_split
from attention_cnn.data.synthetic import KINDS, draw_image, write_folder
from attention_cnn.inference import predict_logits
from attention_cnn.metrics import chance_level, near_chance, not_learned_warning
from attention_cnn.model import load_model
from attention_cnn.params import parse_params
from attention_cnn.training.schedule import EpochResult, TrainingState, plan_training
from attention_cnn.training.train import train

from test_train import one_thread  # noqa: F401 (an autouse fixture: tiny tensors, one thread)

REPO = Path(__file__).resolve().parents[1]
IMG = 32


def params_for(source: Path, **train):
    """params.yaml's defaults (the recipe under test) at a tiny size: only the width and the budget shrink."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(img_size=IMG)
    raw["data"].update(source=str(source), workers=1)
    raw["model"].update(channels=8, hidden=32)
    raw["train"].update(device="cpu", **train)
    return parse_params(raw)


def prepared(tmp: Path, kind: str, per_class: int, **train):
    source = write_folder(tmp / kind, kind, per_class, seed=3, size=48)
    params = params_for(source, **train)
    prepare(params, tmp / f"{kind}-prepared", progress=False)
    return params, tmp / f"{kind}-prepared"


def test_folders_are_seeded_and_their_classes_differ_in_shape_not_colour(tmp_path):
    assert np.array_equal(np.asarray(draw_image(1, "shapes", "circle", 5)),
                          np.asarray(draw_image(1, "shapes", "circle", 5)))
    folder = write_folder(tmp_path / "f", "shapes", 4, seed=1, size=32)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*KINDS["shapes"], ".masks"])
    # Colour says nothing: the mean colour of the classes is about the same over many images.
    means = [np.mean([np.asarray(draw_image(0, "shapes", name, i, 32), dtype=float) for i in range(40)])
             for name in KINDS["shapes"]]
    assert max(means) - min(means) < 15


def test_shapes_come_with_a_mask_of_the_shape_that_prepare_reads_and_textures_with_none(tmp_path):
    from PIL import Image

    params, out = prepared(tmp_path, "shapes", 4)
    folder = Path(params.data.source)
    for name in KINDS["shapes"]:
        image = np.asarray(Image.open(folder / name / f"{name}_0000.png"), dtype=float)
        mask = np.asarray(Image.open(folder / ".masks" / name / f"{name}_0000.png")) > 0
        assert 0.05 < mask.mean() < 0.5
        # Foreground and background are at least 150 apart (summed over RGB); the pixel noise has sigma 8.
        assert np.abs(image[mask].mean(0) - image[~mask].mean(0)).sum() > 100
    test = load_split(out, "test")
    assert test.masks is not None and (test.masks.flatten(1) > 0).any(dim=1).all()
    textures = write_folder(tmp_path / "t", "textures", 2, seed=1, size=32)
    assert not (textures / ".masks").exists()


@pytest.mark.parametrize("num_train, batch, epochs, expected", [
    (60, 32, "auto", (30, 25, 2)),    # 2 steps a pass: 25 passes make an epoch of 50 steps, 30 of them 1500
    (840, 32, "auto", (28, 2, 27)),   # the built-in sample: 27 steps a pass
    (6000, 32, "auto", (8, 1, 188)),  # a big folder: one pass is an epoch
    (60, 32, 15, (15, 1, 2)),         # explicit epochs: the seed's way, one pass each
])
def test_auto_epochs_make_the_step_budget_whatever_the_folder_size(num_train, batch, epochs, expected):
    tp = parse_params({"train": {"epochs": epochs, "batch_size": batch, "steps": 1500, "val_every": 50}}).train
    plan = plan_training(tp, num_train)
    assert (plan.epochs, plan.passes, plan.steps_per_pass) == expected
    if epochs == "auto":
        assert 1500 <= plan.steps < 1500 + plan.passes * plan.steps_per_pass


def test_default_recipe_learns_a_small_texture_folder_in_a_few_hundred_steps(tmp_path, capsys):
    params, folder = prepared(tmp_path, "textures", 30, steps=300, val_every=30)
    result = train(params, folder, tmp_path / "model.pt", tmp_path / "ckpt", tmp_path / "metrics", progress=False)
    plan = plan_training(params.train, len(load_split(folder, "train")))
    assert plan.passes > 1 and plan.steps >= 300 and result.epochs_run <= plan.epochs
    test = load_split(folder, "test")
    logits = predict_logits(load_model(tmp_path / "model.pt").model, test.images, 64)
    accuracy = (logits.argmax(1) == test.labels).float().mean().item()
    # 15 test images: a guesser gets 9 or more right 2 % of the time; this tiny model (8 channels, 32 px) gets 10.
    assert accuracy >= 0.6, accuracy
    assert "warning:" not in capsys.readouterr().out


def test_a_run_that_learns_nothing_says_so_in_one_warning_line(tmp_path, capsys):
    params, folder = prepared(tmp_path, "noise", 20, steps=40, val_every=20)
    train(params, folder, tmp_path / "model.pt", tmp_path / "ckpt", tmp_path / "metrics", progress=False)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "chance (0.333 for 3 classes" in warnings[0], warnings
    assert '"Small folders"' in warnings[0]
    assert json.loads((tmp_path / "metrics" / "metrics.json").read_text())["guess"] == 0.333


def test_near_chance_allows_for_the_luck_of_a_small_split():
    assert chance_level(4) == 0.25
    assert near_chance(0.29, 4, 10_000) and not near_chance(0.31, 4, 10_000)  # 5 points on a big split
    assert near_chance(0.55, 3, 27) and not near_chance(0.70, 3, 27)          # 3 standard errors on 27 images
    assert not_learned_warning("test accuracy", 0.9, 3, 100) is None
    assert not_learned_warning("test accuracy", 0.34, 3, 100).startswith("warning: test accuracy 0.340")


def epoch(n: int, accuracy: float, loss: float):
    return EpochResult(epoch=n, train_loss=loss, train_accuracy=accuracy, val_loss=loss, val_accuracy=accuracy,
                       lr=1e-3, images_per_s=1.0)


def test_early_stopping_ignores_tiny_loss_gains_and_waits_while_val_is_at_chance():
    converged = TrainingState(patience=3, epochs=100, chance_ceiling=0.5)
    for n, loss in enumerate([0.2, 0.004, 0.002, 0.001, 0.0005], start=1):
        converged.update(epoch(n, 1.0, loss))
    # The best weights follow the lowest loss, but drops under LOSS_MIN_DELTA are no progress: it stops.
    assert converged.best_epoch == 5 and converged.last_progress_epoch == 2 and converged.stopping_early
    looking = TrainingState(patience=3, epochs=100, chance_ceiling=0.5)
    for n in range(1, 10):  # at chance for 9 epochs: still looking, not converged
        looking.update(epoch(n, 0.34 + 0.001 * (n == 1), 1.1))
    assert not looking.stopping_early
    looking.update(epoch(10, 0.9, 0.3))
    for n in range(11, 14):
        looking.update(epoch(n, 0.8, 0.5))
    assert looking.stopping_early and looking.best_epoch == looking.last_progress_epoch == 10
