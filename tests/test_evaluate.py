"""The evaluate and visualize stages end to end, on a tiny model briefly trained on a tiny prepared split."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attention_cnn.data.prepared import PreparedSplit, load_split, save_split
from attention_cnn.errors import UserError
from attention_cnn.evaluate import confusion_records, evaluate, write_misclassified
from attention_cnn.explain.base import upsample
from attention_cnn.explain.scoring import build_methods, score_methods
from attention_cnn.metrics import classification_report
from attention_cnn.model import AttentionCNN, load_model, save_model
from attention_cnn.params import EXPLAIN_METHODS, ModelParams, parse_params
from attention_cnn.atomic import atomic_dir
from attention_cnn.figures import DPI, safe_name
from attention_cnn.inference import images_to_float, predict_logits, spread_over_classes
from attention_cnn.panels import MASK_BAR_INCHES, PANEL_INCHES, compute_panels
from attention_cnn.visualize import visualize

S = 32
CLASSES = ["red", "green", "blue"]
PER_CLASS = 8


def make_split(seed: int, per_class: int = PER_CLASS) -> PreparedSplit:
    """Grey noise with a coloured square (the class evidence) at a random place; the mask marks the square."""
    g = torch.Generator().manual_seed(seed)
    n = per_class * len(CLASSES)
    labels = torch.arange(n) % len(CLASSES)
    images = (torch.rand(n, 1, S, S, generator=g) * 100 + 60).expand(n, 3, S, S).clone()
    masks = torch.zeros(n, S, S, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(0, S - 10, (2,), generator=g).tolist()
        images[i, :, r:r + 10, c:c + 10] = 30
        images[i, labels[i], r:r + 10, c:c + 10] = 230
        masks[i, r:r + 10, c:c + 10] = 255
    return PreparedSplit(images=images.to(torch.uint8), labels=labels, masks=masks,
                         files=[f"{CLASSES[k]}/img {i}.jpg" for i, k in enumerate(labels.tolist())],
                         classes=list(CLASSES))


def train_briefly(model: AttentionCNN, split: PreparedSplit, steps: int = 30) -> AttentionCNN:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = split.images.float() / 255
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x).logits, split.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    save_split(root / "prepared", "test", make_split(seed=1))
    for attention in ("conv", "none"):
        torch.manual_seed(0)
        model = AttentionCNN(len(CLASSES), S, ModelParams(attention=attention, channels=8, hidden=16, dropout=0.0))
        save_model(root / f"model_{attention}.pt", train_briefly(model, make_split(seed=0)), CLASSES,
                   resize="stretch", best_epoch=7)
    return root


# The one evaluate run with every method (a short last batch: 10 images in batches of 8, 10 the fewest that get
# intervals); the other tests name a few methods, the cascade on 2 images, and no figures: every method on every
# score costs seconds per run. Any correctly classified image enters the grid pointing game's 1 x 2 mosaics
# (3 classes), so the briefly trained model plays it whatever its confidence; 10 mosaics get intervals too.
PARAMS = parse_params({"img_size": S, "evaluate": {"batch_size": 8, "faithfulness_images": 10,
                                                    "faithfulness_steps": 4, "sanity_images": 2, "figures": 2,
                                                    "mosaics": 10, "grid_confidence": 0.0},
                       "visualize": {"num_images": 4, "per_class": 2}})
# The stochastic parts: SmoothGrad's noise, the random map's seed, ROAD's noise, the bootstrap, the cascade's draws.
FEW = parse_params({"img_size": S, "evaluate": {"batch_size": 8, "faithfulness_images": 9, "faithfulness_steps": 4,
                                                 "sanity_images": 2, "figures": 1,
                                                 "methods": ["mask", "smoothgrad", "random"]}})


@pytest.fixture(scope="module")
def evaluated(workspace):
    return evaluate(PARAMS, workspace / "prepared", workspace / "model_conv.pt", workspace / "metrics/evaluate",
                    workspace / "output/evaluate")


def test_evaluate_writes_metrics_confusion_and_gallery(workspace, evaluated):
    metrics = json.loads((workspace / "metrics/evaluate/metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1
    assert metrics["accuracy"] == pytest.approx(evaluated.report.accuracy)
    assert metrics["macro_f1"] == pytest.approx(evaluated.report.macro_f1)
    # The headline only, so `dvc metrics show` fits a terminal: per-class numbers live in per_class.json.
    assert set(metrics) == {"accuracy", "guess", "macro_f1", "loss", "top2_accuracy", "ece", "best_epoch"}
    methods = ["native", "mask", "attended", "gradcam", "ig", "smoothgrad", "occlusion", "random", "edge"]
    for method in methods:
        scores = json.loads((workspace / f"metrics/maps/{method}.json").read_text())
        assert set(scores) == {"del", "ins", "road", "pg", "mass", "gpg", "mprt"}, method
        assert 0 <= scores["gpg"] <= 1, method
        assert all(0 <= scores[k] <= 1 for k in ("del", "ins", "pg", "mass")), method
        assert -0.5 <= scores["road"] <= 0.5 and -1 <= scores["mprt"] <= 1
        full = evaluated.explained["methods"][method]
        assert scores["del"] == round(full["del"]["mean"], 3)
        assert full["del"]["low"] <= full["del"]["mean"] <= full["del"]["high"]
        half = json.loads((workspace / f"metrics/ci/{method}.json").read_text())
        assert half["del"] == round((full["del"]["high"] - full["del"]["low"]) / 2, 3)
    assert list(evaluated.explained["methods"]) == methods
    paired = json.loads((workspace / "metrics/ci/paired.json").read_text())
    # p-values rounded to 3 decimals: a clear difference on 10 images reads 0.0
    assert set(paired) == {"del", "ins", "road", "pg", "mass", "gpg"} and all(0 <= p <= 1 for p in paired.values())
    assert json.loads((workspace / "metrics/maps/edge.json").read_text())["mprt"] == 1.0  # model-free: fails
    for order in ("morf", "lerf"):
        records = json.loads((workspace / f"output/evaluate/road_{order}.json").read_text())
        assert len(records) == 9 * len(methods) and {r["method"] for r in records} == set(methods)
    sanity = json.loads((workspace / "output/evaluate/sanity.json").read_text())
    assert {r["layers"] for r in sanity} == set(range(len(evaluated.explained["sanity_layers"]) + 1))
    figures = sorted(p.name for p in (workspace / "output/evaluate/maps").iterdir())
    assert figures == ["01_img_0.png", "02_img_1.png"]
    with Image.open(workspace / "output/evaluate/maps/01_img_0.png") as figure:
        assert figure.size[0] > 9 * 1.4 * DPI  # the input and eight maps side by side

    per_class = json.loads((workspace / "output/evaluate/per_class.json").read_text())
    assert len(per_class) == 3 * len(CLASSES)
    red_f1 = next(r for r in per_class if r["class"] == "red" and r["metric"] == "f1")
    assert red_f1["value"] == evaluated.report.per_class["red"].f1
    assert red_f1["support"] == PER_CLASS

    records = json.loads((workspace / "output/evaluate/confusion.json").read_text())
    assert len(records) == PER_CLASS * len(CLASSES)
    assert {r["actual"] for r in records} == set(CLASSES) and {r["predicted"] for r in records} <= set(CLASSES)
    right = sum(r["actual"] == r["predicted"] for r in records)
    assert right / len(records) == pytest.approx(metrics["accuracy"])
    with Image.open(workspace / "output/evaluate/misclassified.png") as gallery:
        assert gallery.size[0] > 100 and gallery.size[1] > 50
    # Only the declared outputs: no temp folders left next to them.
    assert sorted(p.name for p in (workspace / "metrics").iterdir()) == ["ci", "evaluate", "maps"]
    assert sorted(p.name for p in (workspace / "metrics/evaluate").iterdir()) == ["metrics.json"]
    # every method's file
    assert sorted(p.name for p in (workspace / "metrics/maps").iterdir()) == sorted(f"{m}.json" for m in EXPLAIN_METHODS)
    assert sorted(p.name for p in (workspace / "output/evaluate").iterdir()) == [
        "confusion.json", "explain.json", "maps", "misclassified.png", "mosaic.png", "per_class.json",
        "road_lerf.json", "road_morf.json", "sanity.json"]
    assert evaluated.explained["mosaics"] == {"count": 10, "layout": [1, 2]}


def test_evaluate_is_deterministic(workspace):
    first = evaluate(FEW, workspace / "prepared", workspace / "model_conv.pt", workspace / "m1", workspace / "o1")
    again = evaluate(FEW, workspace / "prepared", workspace / "model_conv.pt", workspace / "m2", workspace / "o2")
    assert set(first.explained["methods"]) == {"mask", "smoothgrad", "random"}
    assert again.metrics == first.metrics
    assert json.dumps(again.explained, sort_keys=True) == json.dumps(first.explained, sort_keys=True)


def test_a_model_without_attention_reports_no_attention_metrics(workspace):
    params = parse_params({"img_size": S, "evaluate": {"batch_size": 5, "faithfulness_images": 6,
                                                        "faithfulness_steps": 2, "sanity_images": 0, "figures": 0,
                                                        "methods": ["mask", "gradcam", "random"]}})
    result = evaluate(params, workspace / "prepared", workspace / "model_none.pt", workspace / "none/evaluate",
                      workspace / "output_none")
    assert set(result.explained["methods"]) == {"gradcam", "random"}
    # Every file dvc.yaml declares, so `dvc metrics show` loads them all: null for what was not scored.
    assert json.loads((workspace / "none/maps/mask.json").read_text()) == dict.fromkeys(
        ["del", "ins", "road", "pg", "mass", "gpg", "mprt"])
    assert set(json.loads((workspace / "none/ci/paired.json").read_text()).values()) == {None}  # no mask to compare


def test_the_best_epoch_comes_from_the_model_file(workspace, evaluated):
    metrics = json.loads((workspace / "metrics/evaluate/metrics.json").read_text())
    assert metrics["best_epoch"] == 7 == evaluated.headline["best_epoch"]  # save_model(..., best_epoch=7) above


def test_batched_logits_equal_one_batch_with_a_short_last_batch(workspace):
    model = load_model(workspace / "model_conv.pt").model
    split = make_split(seed=1)  # 24 images: batches of 5 leave a last batch of 4
    batched, whole = predict_logits(model, split.images, 5), predict_logits(model, split.images, 24)
    assert torch.allclose(batched, whole, atol=1e-5)
    a, b = classification_report(batched, split.labels, CLASSES), classification_report(whole, split.labels, CLASSES)
    assert a.accuracy == b.accuracy == pytest.approx((whole.argmax(1) == split.labels).float().mean().item())
    assert a.loss == pytest.approx(F.cross_entropy(whole, split.labels).item(), rel=1e-5)


def test_gradcam_beats_random_and_edges_on_a_trained_model(workspace):
    """The tiny model learned coloured squares; Grad-CAM on it must point at them more often than noise."""
    model = load_model(workspace / "model_conv.pt").model
    split = make_split(seed=1)
    methods = build_methods(["gradcam", "random", "edge"], model, seed=0, batch_size=128)
    scored = score_methods(model, images_to_float(split.images), split.masks, methods, steps=4, batch_size=128,
                           seed=0, sanity_images=0)
    gradcam, random = scored.methods["gradcam"].scores, scored.methods["random"].scores
    assert gradcam["pg"].mean() > random["pg"].mean()
    assert gradcam["mass"].mean() > random["mass"].mean()
    assert gradcam["del"].mean() < random["del"].mean()


def test_stale_model_is_refused(workspace, tmp_path):
    torch.manual_seed(0)
    other = AttentionCNN(2, S, ModelParams(channels=8, hidden=16))
    save_model(tmp_path / "other.pt", other, ["cat", "dog"], resize="stretch")
    with pytest.raises(UserError, match="trained on classes"):
        evaluate(PARAMS, workspace / "prepared", tmp_path / "other.pt", tmp_path / "m", tmp_path / "o")
    assert not (tmp_path / "m").exists() and not (tmp_path / "o").exists()


def test_missing_model_is_a_user_error(workspace, tmp_path):
    with pytest.raises(UserError, match="model not found"):
        evaluate(PARAMS, workspace / "prepared", tmp_path / "nope.pt", tmp_path / "m", tmp_path / "o")


def test_gallery_says_so_when_nothing_is_misclassified(tmp_path):
    split = make_split(seed=2, per_class=2)
    logits = F.one_hot(split.labels, 3).float() * 5  # every prediction right
    report = classification_report(logits, split.labels, CLASSES)
    write_misclassified(tmp_path / "g.png", split.images, split.labels, report, CLASSES)
    with Image.open(tmp_path / "g.png") as image:
        assert image.size[0] > 50


def test_confusion_records_use_class_names():
    assert confusion_records(torch.tensor([0, 2]), torch.tensor([1, 2]), CLASSES) == [
        {"actual": "red", "predicted": "green"}, {"actual": "blue", "predicted": "blue"}]


def test_output_dir_keeps_the_old_folder_when_a_run_fails(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in final.iterdir()] == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left
    with atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("second")
    assert [p.name for p in final.iterdir()] == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------------------
# visualize


def test_spread_over_classes_is_round_robin():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    assert spread_over_classes(labels, 5) == [0, 3, 4, 1, 5]
    assert spread_over_classes(labels, 10) == [0, 3, 4, 1, 5, 2]


def test_visualize_writes_one_figure_per_image_and_a_grid_per_class(workspace):
    out = workspace / "output/visualize"
    result = visualize(PARAMS, workspace / "prepared", workspace / "model_conv.pt", out)
    # Test images are ordered red, green, blue, red, ...: round-robin picks the first of each class, then red.
    assert [p.name for p in result.image_files] == ["01_img_0.png", "02_img_1.png", "03_img_2.png", "04_img_3.png"]
    assert [p.name for p in result.grid_files] == ["grid_red.png", "grid_green.png", "grid_blue.png"]
    assert result.native_file == out / "native_per_class.png"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in [*result.image_files, *result.grid_files,
                                                                            result.native_file])
    with Image.open(result.image_files[0]) as single, Image.open(result.grid_files[0]) as grid:
        assert single.mode in ("RGB", "RGBA") and grid.mode in ("RGB", "RGBA")
        assert single.size[0] > 4 * PANEL_INCHES * DPI  # four panels side by side
        assert grid.size[0] == single.size[0]
        assert grid.size[1] > 1.8 * single.size[1] - 80  # two rows of panels, shared header
    # The figure is not blank: the panels hold the image and coloured overlays.
    with Image.open(result.image_files[0]) as single:
        colours = single.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 500


def test_a_model_without_attention_draws_no_mask_panel(workspace, tmp_path):
    with_mask = visualize(PARAMS, workspace / "prepared", workspace / "model_conv.pt", tmp_path / "conv")
    without = visualize(PARAMS, workspace / "prepared", workspace / "model_none.pt", tmp_path / "none")
    with Image.open(with_mask.image_files[0]) as four, Image.open(without.image_files[0]) as two:
        # The mask, "after" (the same map as "before") and the mask's colour bar fewer; the height and the other
        # margins stay.
        assert four.size[0] - two.size[0] == pytest.approx((2 * PANEL_INCHES + MASK_BAR_INCHES) * DPI, abs=2)
        assert four.size[1] == two.size[1]
        assert four.text["Description"] == ("panels: input | before the mask | attention mask | after the mask | "
                                            "native map")
        assert two.text["Description"] == "panels: input | feature map (no attention) | native map"


def test_images_to_float_is_the_unit_scale():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.equal(images_to_float(images), torch.tensor([0.0, 0.2, 1.0]).view(1, 3, 1, 1))
    assert images.dtype == torch.uint8  # the input is left alone


def test_panels_draw_a_sigmoid_mask_raw_and_keep_its_range(workspace):
    model = load_model(workspace / "model_conv.pt").model
    images = load_split(workspace / "prepared", "test").images[:5]
    panels = compute_panels(model, images, batch_size=2)
    with torch.no_grad():
        out = model(images.float() / 255)
    raw = upsample(out.mask.mean(dim=1), S)                                # (5, S, S) as the model made it
    low, high = raw.amin(dim=(1, 2)), raw.amax(dim=(1, 2))
    torch.testing.assert_close(panels.mask_range, torch.stack([low, high], dim=1))
    assert (high - low).min() > 1e-4  # a real, if narrow, range, which the panel does not stretch
    assert not panels.mask_stretched
    torch.testing.assert_close(panels.mask, raw)
    # Before and after share one scale per image: together, not each, they span [0, 1].
    both = torch.cat([panels.before, panels.after], dim=1).flatten(1)
    torch.testing.assert_close(both.amin(1), torch.zeros(5))
    torch.testing.assert_close(both.amax(1), torch.ones(5))
    assert torch.equal(panels.predictions, out.logits.argmax(dim=1))


def test_visualize_refuses_an_unknown_colormap(workspace, tmp_path):
    params = parse_params({"img_size": S, "visualize": {"colormap": "no-such-map"}})
    with pytest.raises(UserError, match="colormap"):
        visualize(params, workspace / "prepared", workspace / "model_conv.pt", tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_safe_name():
    assert safe_name("forêt/img 1.jpg") == "for_t_img_1.jpg"
    assert safe_name("..") == "image"


def test_a_skipped_grid_game_says_so_in_one_line_and_in_its_figure(workspace, tmp_path, capsys):
    params = parse_params({"img_size": S, "evaluate": {"batch_size": 8, "faithfulness_images": 3,
                                                        "faithfulness_steps": 2, "sanity_images": 0, "figures": 0,
                                                        "methods": ["random"], "mosaics": 0}})
    result = evaluate(params, workspace / "prepared", workspace / "model_conv.pt", tmp_path / "metrics/evaluate",
                      tmp_path / "output")
    out = capsys.readouterr().out
    assert "evaluate: grid pointing game skipped: evaluate.mosaics is 0" in out
    assert json.loads((tmp_path / "metrics/maps/random.json").read_text())["gpg"] is None
    assert "mosaics" not in result.explained
    with Image.open(tmp_path / "output/mosaic.png") as note:
        assert note.size[0] > 100
