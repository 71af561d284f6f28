"""The grid pointing game on mosaics of real prepared images, and the native map of a cam head: its identity,
its skip for other heads, and both through the evaluate scoring and report."""

import pytest
import torch
from captum.attr import Occlusion

from attention_cnn.data.prepare import prepare
from attention_cnn.data.prepared import load_split
from attention_cnn.data.sample import write_sample
from attention_cnn.explain.base import Explainer
from attention_cnn.explain.methods import NativeMap, OcclusionMap, occlusion_window
from attention_cnn.explain.metrics.deletion_insertion import deletion_fill
from attention_cnn.explain.metrics.grid import (CONFIDENCE, build_mosaics, confident, grid_scores,
                                                grid_unsupported, layout_for)
from attention_cnn.explain.report import metric_files, summarize, verdict
from attention_cnn.explain.scoring import build_methods, score_methods, skipped_methods
from attention_cnn.model import AttentionCNN
from attention_cnn.params import ModelParams, parse_params

S = 32


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The built-in sample, 4 images per class at 48 px, prepared at 32 px: real images, as evaluate sees them."""
    root = tmp_path_factory.mktemp("grid")
    write_sample(root / "sample", seed=3, images_per_class=4, image_size=48)
    params = parse_params({"img_size": S, "seed": 3, "data": {"source": str(root / "sample"), "val_fraction": 0.25,
                                                               "test_fraction": 0.25, "workers": 1}})
    prepare(params, out_dir=root / "prepared", progress=False)
    return load_split(root / "prepared", "train")


def everything(split):
    return torch.ones(len(split), dtype=torch.bool)


def test_a_map_exactly_on_the_cell_scores_one_and_a_constant_map_one_over_cells(split):
    mosaics = build_mosaics(split.images, split.labels, everything(split), len(split.classes), count=5, seed=0)
    assert mosaics.layout == (2, 2) and mosaics.images.shape == (20, 3, 2 * S, 2 * S)
    exact = mosaics.cells.float() / 255
    assert torch.equal(grid_scores(exact, mosaics), torch.ones(5))
    constant = torch.zeros(20, 2 * S, 2 * S)  # no positive mass at all: read as uniform
    assert torch.allclose(grid_scores(constant, mosaics), torch.full((5,), 0.25))
    assert torch.allclose(grid_scores(torch.full((20, 2 * S, 2 * S), 0.7), mosaics), torch.full((5,), 0.25))
    # The wrong cell: no mass inside.
    assert torch.equal(grid_scores(exact.roll(1, dims=0), mosaics), torch.zeros(5))


class Scripted(Explainer):
    name = "scripted"

    def __init__(self, maps):
        self.maps = maps

    def raw(self, model, images, targets):
        return self.maps


def test_the_grid_game_shares_out_the_positive_part_of_the_raw_map_not_the_min_max_scaled_map(split):
    mosaics = build_mosaics(split.images, split.labels, everything(split), len(split.classes), count=2, seed=0)
    cells = mosaics.cells.float() / 255
    # Evidence in the cell, and a negative background of two levels (as occlusion's drops can be): all the
    # positive mass is in the cell; min-max scaling lifts the -0.2 half of the background to 1/7 (share 0.82).
    background = -0.2 - 0.2 * (torch.arange(2 * S) % 2).float().expand(2 * S, 2 * S)
    raw = torch.where(cells > 0, cells, background)
    method = Scripted(raw)
    positive = method.positive(None, mosaics.images.float(), mosaics.targets)
    assert torch.equal(positive, cells)
    assert torch.equal(grid_scores(positive, mosaics), torch.ones(2))
    assert (grid_scores(method(None, mosaics.images.float(), mosaics.targets), mosaics) < 0.9).all()


def test_two_or_three_classes_make_one_by_two_mosaics_and_a_constant_map_scores_one_half(split):
    keep = split.labels < 3
    images, labels = split.images[keep], split.labels[keep]
    assert layout_for(3) == (1, 2) and layout_for(2) == (1, 2) and layout_for(4) == (2, 2)
    mosaics = build_mosaics(images, labels, torch.ones(len(labels), dtype=torch.bool), 3, count=4, seed=1)
    assert mosaics.images.shape == (8, 3, S, 2 * S)
    assert torch.allclose(grid_scores(torch.zeros(8, S, 2 * S), mosaics), torch.full((4,), 0.5))
    assert torch.equal(grid_scores(mosaics.cells.float() / 255, mosaics), torch.ones(4))


def test_mosaics_hold_the_source_images_of_different_eligible_classes_and_are_seeded(split):
    eligible = torch.arange(len(split)) % 2 == 0
    mosaics = build_mosaics(split.images, split.labels, eligible, len(split.classes), count=6, seed=7)
    for m in range(6):
        sources = mosaics.sources[m]
        assert eligible[sources].all()
        assert len(set(split.labels[sources].tolist())) == 4          # each cell a different class
        mosaic = mosaics.images[4 * m]
        for c, index in enumerate(sources.tolist()):
            r, q = divmod(c, 2)
            assert torch.equal(mosaic[:, r * S:(r + 1) * S, q * S:(q + 1) * S], split.images[index])
            assert mosaics.targets[4 * m + c] == split.labels[index]
            assert torch.equal(mosaics.images[4 * m + c], mosaic)
    again = build_mosaics(split.images, split.labels, eligible, len(split.classes), count=6, seed=7)
    other = build_mosaics(split.images, split.labels, eligible, len(split.classes), count=6, seed=8)
    assert torch.equal(again.sources, mosaics.sources) and not torch.equal(other.sources, mosaics.sources)


def test_too_few_confident_classes_make_no_mosaics(split):
    eligible = split.labels < 3  # three classes for a 2 x 2 layout
    assert build_mosaics(split.images, split.labels, eligible, len(split.classes), count=3, seed=0) is None


def test_only_correct_and_confident_images_are_eligible():
    probabilities = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.05, 0.95], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 0, 1])
    assert CONFIDENCE == 0.9
    assert confident(probabilities, labels).tolist() == [True, False, False, False]


def test_heads_that_fix_the_input_size_are_left_out_with_one_line():
    assert "model.head=flatten" in grid_unsupported("conv", "flatten")
    assert "model.attention=dense" in grid_unsupported("dense", "cam")
    assert grid_unsupported("conv", "cam") is None and grid_unsupported("ltpa", "gmp") is None


def cam_model(attention: str = "conv", head: str = "cam", classes: int = 6) -> AttentionCNN:
    torch.manual_seed(0)
    model = AttentionCNN(classes, S, ModelParams(attention=attention, channels=8, hidden=16, head=head))
    model.train()  # non-trivial batch-norm statistics
    with torch.no_grad():
        model(torch.rand(16, 3, S, S))
    return model.eval()


@pytest.mark.parametrize("attention, head", [("conv", "cam"), ("spatial", "cam"), ("none", "cam"), ("ltpa", "cam"),
                                             ("conv", "class_attention"), ("none", "class_attention"),
                                             ("conv", "gmp"), ("none", "gmp"), ("conv", "gap")])
def test_the_native_map_is_the_class_map_of_the_explained_class_which_sums_to_its_logit(attention, head, split):
    model = cam_model(attention, head)
    images = split.images[:5].float() / 255
    targets = torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        out = model(images)
        maps = model.class_maps(out.attended)[torch.arange(5), targets]           # (5, h, w)
    logits = out.logits[torch.arange(5), targets]
    offsets = model.class_offsets(out.attended)[torch.arange(5), targets]
    assert torch.allclose(maps.sum(dim=(1, 2)) + offsets, logits, atol=1e-5)
    assert torch.equal(NativeMap().raw(model, images, targets), maps.clamp_min(0))


@pytest.mark.parametrize("head", ["gmp", "gap", "flatten", "cam", "class_attention"])
def test_every_head_has_a_native_map_and_only_a_model_without_attention_skips_methods(head):
    model = cam_model(head=head)
    assert skipped_methods(["native", "mask", "gradcam"], model) == {}
    assert [m.name for m in build_methods(["native", "gradcam"], model, 0, 8)] == ["native", "gradcam"]
    plain_model = cam_model(attention="none", head=head)
    assert set(skipped_methods(["native", "mask", "gradcam"], plain_model)) == {"mask"}


class CellOracle(Explainer):
    """A map that knows where each class's cell is: used to check that scoring hands each mosaic copy's
    explained class to the method."""
    name = "oracle"

    def __init__(self, mosaics):
        self.mosaics, self.calls = mosaics, 0

    def raw(self, model, images, targets):
        if images.shape[-1] == S:  # the single images: any map
            return torch.rand(images.shape[0], S, S)
        out = self.mosaics.cells[self.calls:self.calls + images.shape[0]].float()
        assert torch.equal(targets.cpu(), self.mosaics.targets[self.calls:self.calls + images.shape[0]])
        self.calls += images.shape[0]
        return out


def test_scoring_plays_the_grid_game_for_every_method_and_reports_native_against_post_hoc(split):
    model = cam_model()
    mosaics = build_mosaics(split.images, split.labels, everything(split), len(split.classes), count=4, seed=0)
    methods = [*build_methods(["native", "gradcam", "random"], model, 0, 8), CellOracle(mosaics)]
    images = split.images[:6].float() / 255
    scored = score_methods(model, images, split.masks[:6], methods, steps=4, batch_size=6, seed=0,
                           sanity_images=0, mosaics=mosaics)
    for name, result in scored.methods.items():
        grid = result.scores["gpg"]
        assert grid.shape == (4,) and ((grid >= 0) & (grid <= 1)).all(), name
        assert result.mosaic_maps.shape == (4, 2 * S, 2 * S)
    assert torch.equal(scored.methods["oracle"].scores["gpg"], torch.ones(4))
    summary = summarize(scored, seed=0)
    assert summary["mosaics"] == {"count": 4, "layout": [2, 2]}
    assert set(summary["native"]) == {"gradcam"} and "gpg" in summary["native"]["gradcam"]
    files = metric_files(summary)
    assert "gpg" in files["maps/native.json"] and "gpg" in files["ci/native.json"]
    assert "gpg" in files["ci/vs-gradcam.json"]


def entry(mean):
    return {"mean": mean, "low": mean - 0.01, "high": mean + 0.01}


@pytest.mark.parametrize("p_grid, p_road, native_road, start", [
    (0.001, 0.02, 0.41, "the native map explains this model better than Grad-CAM:"),
    (0.001, 0.4, 0.37, "the native map explains this model better than Grad-CAM on one score and no worse"),
    (0.3, 0.4, 0.37, "the native map and Grad-CAM explain this model equally well"),
])
def test_the_verdict_is_one_sentence_that_follows_the_paired_tests(p_grid, p_road, native_road, start):
    summary = {"methods": {"native": {"gpg": entry(0.81), "road": entry(native_road)},
                           "gradcam": {"gpg": entry(0.56), "road": entry(0.38)}},
               "native": {"gradcam": {"gpg": {"difference": 0.25, "p": p_grid},
                                      "road": {"difference": native_road - 0.38, "p": p_road}}}}
    sentence = verdict(summary)
    assert sentence.startswith(start) and sentence.endswith(".") and "grid pointing game 0.81 vs 0.56" in sentence
    assert verdict({"methods": {"gradcam": {}}}) is None


def test_panels_add_the_native_map_of_the_predicted_runner_up_or_named_class(split):
    from attention_cnn.panels import PanelFigure, compute_panels, explained_classes, native_maps

    model = cam_model()
    images = split.images[:4]
    panels = compute_panels(model, images)
    assert torch.equal(panels.native_class, panels.predictions)
    with torch.no_grad():
        out = model(images.float() / 255)
    assert torch.allclose(panels.native, native_maps(model, out.attended, panels.predictions, S), atol=1e-6)
    runner = compute_panels(model, images, explain="runner-up")
    assert torch.equal(runner.native_class, panels.probs.topk(2, dim=1).indices[:, 1])
    assert torch.equal(compute_panels(model, images, explain=5).native_class, torch.full((4,), 5))
    assert torch.equal(explained_classes(torch.tensor([[0.1, 0.6, 0.3]]), "runner-up"), torch.tensor([2]))
    gmp = cam_model(head="gmp")
    with torch.no_grad():
        gmp_out = gmp(images.float() / 255)
    gmp_panels = compute_panels(gmp, images)
    assert torch.allclose(gmp_panels.native, native_maps(gmp, gmp_out.attended, gmp_panels.predictions, S), atol=1e-6)
    figure = PanelFigure(1, "jet", 0.5, classes=split.classes)
    figure.draw_row(0, runner, 0, "")
    assert figure.axes[0][-1].get_title() == f"native map: {split.classes[int(runner.native_class[0])]}"
    assert len(figure.axes[0]) == 5


def test_class_averages_of_the_native_map_are_the_mean_of_each_class_own_maps(split):
    from attention_cnn.panels import class_average_native, native_maps

    model = cam_model()
    averages = class_average_native(model, split.images, split.labels, len(split.classes), batch_size=5)
    assert sorted(averages) == sorted(split.labels.unique().tolist())
    k = int(split.labels[0])
    chosen = split.labels == k
    with torch.no_grad():
        out = model(split.images[chosen].float() / 255)
    expected = native_maps(model, out.attended, split.labels[chosen], S).mean(dim=0)
    assert torch.allclose(averages[k], expected, atol=1e-5)


def test_predict_draws_the_named_class_of_any_head_and_refuses_an_unknown_one(split, tmp_path):
    from PIL import Image

    from attention_cnn.errors import UserError
    from attention_cnn.model import save_model
    from attention_cnn.predict import predict_folder

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    cam = save_model(tmp_path / "cam.pt", cam_model(), split.classes, resize="stretch")
    done = predict_folder(cam, folder, tmp_path / "out", explain_class=split.classes[2], progress=False, workers=1)
    assert len(done.predictions) == 2 and len(list((tmp_path / "out").glob("*.png"))) == 2
    with pytest.raises(UserError, match="not one of predicted, runner-up"):
        predict_folder(cam, folder, tmp_path / "out2", explain_class="zebra", progress=False, workers=1)
    gmp = save_model(tmp_path / "gmp.pt", cam_model(head="gmp"), split.classes, resize="stretch")
    done = predict_folder(gmp, folder, tmp_path / "out3", explain_class="runner-up", progress=False, workers=1)
    assert len(done.predictions) == 2 and len(list((tmp_path / "out3").glob("*.png"))) == 2


@pytest.mark.parametrize("attention", ["conv", "spatial"])
def test_grad_cam_at_the_mask_output_of_a_cam_head_is_the_native_map_itself(attention, split):
    """Why evaluate's Grad-CAM explains the trunk (before the mask): at the attended map, a linear head after
    average pooling makes Grad-CAM's channel weights W_k / (h*w), so its map is the native map exactly."""
    model = cam_model(attention)
    images, targets = split.images[:4].float() / 255, torch.tensor([0, 2, 4, 5])
    out = model(images)
    out.attended.retain_grad()
    out.logits[torch.arange(4), targets].sum().backward()
    weights = out.attended.grad.mean(dim=(2, 3))                                   # (B, C)
    gradcam = (weights[:, :, None, None] * out.attended).sum(dim=1).relu().detach()
    assert torch.allclose(gradcam, NativeMap().raw(model, images, targets), atol=1e-6)


def test_the_widest_metrics_table_with_the_grid_column_fits_160_columns(tmp_path):
    """`dvc metrics show` on dvc.yaml's declarations, every file present and every value as wide as it gets:
    negative ROAD and sanity scores (the others lie in [0, 1]), p-values below 0.1, headline values at DVC's
    5 decimals."""
    import json
    import os
    import subprocess

    import yaml

    from e2e import REPO, VENV_BIN, run

    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["metrics"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"metrics": declared}))
    wide = {"mean": 0.123456, "low": 0.0, "high": 0.2468}
    negative = {"mean": -0.123456, "low": -0.2468, "high": 0.0}
    summary = {"methods": {m: {**{k: wide for k in ("del", "ins", "pg", "mass", "gpg")}, "road": negative,
                               "mprt": -0.123456}
                           for m in ("native", "mask", "attended", "gradcam", "ig", "smoothgrad", "occlusion",
                                     "random", "edge")},
               "paired": {"methods": ["mask", "gradcam"],
                          "scores": {k: {"difference": 0.1, "p": 0.0123} for k in ("road", "gpg")}},
               "native": {m: {k: {"difference": 0.1, "p": 0.0123} for k in ("road", "gpg")}
                          for m in ("gradcam", "ig", "smoothgrad", "occlusion")}}
    files = {f"metrics/{path}": content for path, content in metric_files(summary).items()}
    files["metrics/evaluate/metrics.json"] = {"accuracy": 0.994444444, "guess": 0.167, "macro_f1": 0.99444444,
                                              "loss": 0.023456789, "top2_accuracy": 0.99444444,
                                              "ece": 0.0123456789, "best_epoch": 13}
    assert sorted(files) == sorted(declared)
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(content))
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "160"}
    table = subprocess.run(["dvc", "metrics", "show"], cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    lines = table.splitlines()
    assert "gpg" in lines[0].split() and len(lines) == 1 + len(declared), table
    assert max(len(line.rstrip()) for line in lines) <= 160, table


def test_occlusion_on_mosaics_runs_each_mosaic_once_per_window_with_the_same_maps(split):
    model = cam_model()
    mosaics = build_mosaics(split.images, split.labels, everything(split), len(split.classes), count=3, seed=0)
    images, targets = mosaics.images.float() / 255, mosaics.targets  # each mosaic 4 times in a row, one per cell
    rows = []
    hook = model.trunk.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        occlusion = Occlusion(lambda x: model(x).logits)  # Captum's plain use: every row forwarded
        side = occlusion_window(images.shape[-1])[0]
        window = dict(sliding_window_shapes=(3, side, side), strides=(3, side, side),
                      baselines=deletion_fill(images, model.mean), target=targets, perturbations_per_eval=5)
        expected = occlusion.attribute(images, **window).sum(dim=1)
        every_row, rows[:] = sum(rows), []
        maps = OcclusionMap(batch_size=60).raw(model, images, targets)
    hook.remove()
    assert torch.allclose(maps, expected, atol=1e-5)
    assert sum(rows) * mosaics.per_mosaic == every_row  # a quarter of the forwards on 2 x 2 mosaics
